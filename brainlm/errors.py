"""The one base class for failures a user can fix (bad input, missing cohort, unknown preset).

The CLI prints these as one clear message and exits non-zero; anything else is a bug and keeps its traceback.
Each module defines its own subclass next to the code that raises it.
"""

from __future__ import annotations

from typing import Any


class BrainLMError(Exception):
    """A failure the user can act on; the message says what failed and what to do."""


class ConfigError(BrainLMError, ValueError):
    """A configuration value or name that does not exist or does not fit.

    When one field's value is at fault, `field`, `value` and `rule` (e.g. "must be in [0, 1)") say which and
    why, so the CLI can name its own option for that field instead of the config's.
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = None, rule: str | None = None):
        super().__init__(message)
        self.field, self.value, self.rule = field, value, rule
