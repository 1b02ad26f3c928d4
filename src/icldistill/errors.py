"""The project's exception types: each carries a message that names what is wrong and how to fix it.

The CLI prints these without a traceback; any other exception is a bug and keeps its traceback.
"""

import difflib
from collections.abc import Iterable


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


def did_you_mean(name: str, valid: Iterable[str], *, or_list: str | None = None, n: int = 3) -> str:
    """' Did you mean: a, b?' for the valid names closest to ``name``.

    The one spelling-suggestion helper: every "unknown X" message appends it to its own text. When no name
    is close it returns '' or, given ``or_list`` (e.g. "Valid keys"), ' Valid keys: every, valid, name.'
    """
    valid = [str(v) for v in valid]
    close = difflib.get_close_matches(str(name), valid, n=n)
    if close:
        return f" Did you mean: {', '.join(close)}?"
    return f" {or_list}: {', '.join(valid)}." if or_list else ""
