"""BrainLM: a foundation model for brain activity, and the platform to train, evaluate and track it."""

__version__ = "0.1.0"
