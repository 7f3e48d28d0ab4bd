"""The one base class for failures a user can fix (bad input, missing cohort, unknown preset).

The CLI prints these as one clear message and exits non-zero; anything else is a bug and keeps its traceback.
Each module defines its own subclass next to the code that raises it.
"""


class BrainLMError(Exception):
    """A failure the user can act on; the message says what failed and what to do."""


class ConfigError(BrainLMError, ValueError):
    """A configuration value or name that does not exist or does not fit."""
