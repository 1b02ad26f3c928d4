"""What a run writes and measures: atomic files, the environment record, wall time and peak memory.

Every result file is written to a temporary file in the same directory and renamed into place, so a
killed run leaves either the previous complete file or the new complete file, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icldistill.errors import IcldError
from icldistill.runtime import distributed


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN and infinities become None: strict JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, *, option: str = "--output-dir") -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); errors name the path and the fix.

    ``option`` is the command-line option that chose the directory (``--cache-dir``, ``--output``), which
    the error tells the user to change.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise IcldError(f"Cannot write to {path.parent}: {exc.strerror}. Choose a writable {option}.") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared like any file
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise IcldError(f"Writing {path} failed: {exc.strerror or exc}. "
                        f"Free disk space or choose another {option}.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, *, option: str = "--output-dir") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), option=option)


def atomic_write_json(path: str | Path, obj: Any, *, option: str = "--output-dir") -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, default=_json_default, sort_keys=False) + "\n",
                      option=option)


def atomic_write_jsonl(path: str | Path, rows: Iterable[Any], *, option: str = "--output-dir") -> None:
    atomic_write_text(path, "".join(json.dumps(_clean(r), default=_json_default) + "\n" for r in rows),
                      option=option)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def git_revision() -> str | None:
    """The project's git revision (with '+dirty' for local changes), or None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Versions and machine facts needed to reproduce a result."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "num_processes": distributed.num_processes(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_revision": git_revision(),
    }
    for name in ("peft", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    from icldistill import __version__

    info["icldistill"] = __version__
    return info


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


@dataclass
class Measurement:
    """Wall time and peak memory of one measured section."""

    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0
    memory_kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    _running_peak: float = 0.0  # peaks seen before nested sections reset the counter

    def as_dict(self) -> dict[str, Any]:
        return {"wall_time_s": round(self.wall_time_s, 4), "peak_memory_mb": round(self.peak_memory_mb, 1),
                "memory_kind": self.memory_kind, **self.extra}


_ACTIVE: list[Measurement] = []  # enclosing measured sections, outermost first


def release_memory() -> None:
    """Hand freed memory back to the operating system before a measurement starts.

    After a model is deleted, glibc keeps much of its memory in the process heap, so the resident
    size (and a peak measured from it) would still include, say, a teacher freed before training.
    ``malloc_trim`` returns it; on other C libraries this is a no-op.
    """
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _current_peak(on_cuda: bool) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1024 / 1024 if on_cuda else _peak_rss_mb()


def _on_cuda(device: Any) -> bool:
    """Whether ``device`` is a CUDA device that is there (its peaks come from torch, not from the process)."""
    import torch

    return device is not None and str(device).startswith("cuda") and torch.cuda.is_available()


def peak_so_far(device: Any = None) -> float:
    """The peak memory (MB) the innermost open :func:`measure` section would report if it ended now (the
    process's current peak outside any): a long section (training) records it in its checkpoints, so that
    a resumed run's figure covers the attempts before the resume too."""
    return max(_ACTIVE[-1]._running_peak if _ACTIVE else 0.0, _current_peak(_on_cuda(device)))


def over_attempts(before: Mapping[str, float] | None, wall_time_s: float, peak_memory_mb: float
                  ) -> dict[str, float]:
    """A section's cost over the attempts of a resumed run: wall times add up, the peak is the larger of the
    peaks (``before``: the earlier attempts' ``wall_time_s`` and ``peak_memory_mb``, None for none)."""
    before = before or {"wall_time_s": 0.0, "peak_memory_mb": 0.0}
    return {"wall_time_s": before["wall_time_s"] + wall_time_s,
            "peak_memory_mb": max(before["peak_memory_mb"], peak_memory_mb)}


@contextmanager
def measure(device: Any = None) -> Iterator[Measurement]:
    """Measure a section: on CUDA ``max_memory_allocated``; on CPU the process's peak resident memory.

    The peak counter is reset on entry (on CPU through ``/proc/self/clear_refs``), so a section's
    figure is not the peak of an earlier run in the same process. Sections nest: before a nested
    section resets the counter, the peak so far is credited to every enclosing section, and the
    nested peak is credited to them on exit, so an outer figure is never lowered by an inner one.
    Where the CPU reset is unsupported the figure is the process's lifetime peak, and
    ``memory_kind`` says so.
    """
    import torch

    m = Measurement()
    on_cuda = _on_cuda(device)
    if not _ACTIVE:
        release_memory()
    if on_cuda:
        torch.cuda.synchronize()
    peak_before = _current_peak(on_cuda)
    for outer in _ACTIVE:
        outer._running_peak = max(outer._running_peak, peak_before)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        m.memory_kind = "cuda_max_allocated"
    else:
        m.memory_kind = "cpu_peak_rss" if _reset_peak_rss() else "cpu_peak_rss_lifetime"
    _ACTIVE.append(m)
    start = time.perf_counter()
    try:
        yield m
    finally:
        if on_cuda:
            torch.cuda.synchronize()
        m.wall_time_s = time.perf_counter() - start
        m.peak_memory_mb = max(m._running_peak, _current_peak(on_cuda))
        _ACTIVE.remove(m)
        for outer in _ACTIVE:
            outer._running_peak = max(outer._running_peak, m.peak_memory_mb)
