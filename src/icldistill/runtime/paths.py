"""Default locations on disk: the data directory and the cache directory.

One home for both defaults, so that every module (data loading, model cache, teacher cache) agrees.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "ICLDISTILL_DATA"
CACHE_ENV = "ICLDISTILL_CACHE"
PREDICTIONS_FILE = "predictions.jsonl"  # per-query answers of a run, in its output directory (every method)


def default_data_dir() -> Path | None:
    """The local JSON Lines data directory named by ``$ICLDISTILL_DATA``, or None when unset."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def default_cache_dir() -> Path:
    """``$ICLDISTILL_CACHE``, else ``$XDG_CACHE_HOME/icldistill``, else ``~/.cache/icldistill``.

    Converted models and cached teacher signals live here, shared by every run of the user.
    """
    value = os.environ.get(CACHE_ENV)
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "icldistill"
