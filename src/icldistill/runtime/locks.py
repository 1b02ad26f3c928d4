"""An exclusive lock on a file, held while one process does work that others would otherwise repeat.

Converting a packaged model, or a generation teacher's pass over a seed's training queries (a 1.5B decoding
for minutes), must not run twice at once: two sweep workers that need the same result would both pay for it
(and both hold the model in memory). The first takes the lock and does the work; the others wait, then find
the result (a converted model, a cache entry) and use it. ``fcntl.flock`` is released by the kernel when its
holder dies, so a killed worker never leaves a lock behind.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent) for the duration; while another process holds
    it, wait and say so (``what`` names the work being waited for)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent workers there may repeat the work, never corrupt it
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is %s (lock %s): waiting for it", what, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
