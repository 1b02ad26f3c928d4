"""The project's exception types: each carries a message that names what is wrong and how to fix it.

The CLI prints these without a traceback; any other exception is a bug and keeps its traceback.
"""


class IcldError(Exception):
    """Base class for errors caused by the user's input, configuration or environment."""


class DataError(IcldError):
    """A data file or row is malformed, missing or inconsistent with its task."""


class ConfigError(IcldError):
    """An option or configuration file has an invalid value."""


class ModelError(IcldError):
    """A model cannot be resolved, fetched, converted or used as asked."""


class PromptError(IcldError):
    """A pattern, label word or demonstration set cannot be built as asked."""
