"""Running a sweep: every cell of an experiment once, resumably, by any number of workers.

Workers (``icld sweep`` processes, on one machine or on hosts sharing a file system) share the sweep
directory: each claims a cell with a lock file (:class:`CellLock`) before running it, a failing cell gets
``error.json`` and the others go on, and a cell's state is read back from the files in its directory.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icldistill.config import to_dict
from icldistill.errors import ConfigError, IcldError
from icldistill.experiments.grid import CELLS_DIR, METHODS, Cell, Experiment
from icldistill.runtime.records import atomic_write_json, read_json
from icldistill.runtime.rundir import (
    FINISHED,
    NOT_IDENTITY,
    RESULTS_FILE,
    RunDir,
    RunRecord,
    config_changes,
    identity_of,
    probe_writable,
)

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
CELL_FILE = "cell.json"
ERROR_FILE = "error.json"
LOCK_FILE = ".lock"


# ---------------------------------------------------------------------------------------------- cell state


def cell_dir(experiment: Experiment, cell: Cell) -> Path:
    return experiment.output_dir / CELLS_DIR / cell.id


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def cell_status(directory: Path) -> str:
    """complete / skipped / failed / running / incomplete / pending, from the files in a cell directory."""
    record = read_cell_record(directory)
    if record is not None and record.status in FINISHED:
        return record.status
    if (directory / ERROR_FILE).exists():
        return "failed"
    holder = _read(directory / LOCK_FILE)
    if holder and not _is_stale(holder):
        return "running"
    return "incomplete" if (directory / CELL_FILE).exists() else "pending"


def sweep_progress(experiment: Experiment) -> dict[str, int]:
    """How many cells are in each state."""
    counts: dict[str, int] = {}
    for cell in experiment.cells:
        status = cell_status(cell_dir(experiment, cell))
        counts[status] = counts.get(status, 0) + 1
    return counts


def cell_identity(cell: Cell) -> str:
    """The identity the cell's run records (``runtime.rundir.run_identity`` of its method and options)."""
    return identity_of(METHODS[cell.method].command, cell.config)


def experiment_hash(experiment: Experiment) -> str:
    """The experiment's identity: its cells and each cell's run identity (recorded in sweep.json, cell.json)."""
    import hashlib

    text = json.dumps(sorted((c.id, cell_identity(c)) for c in experiment.cells))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_cell_record(directory: Path) -> RunRecord | None:
    """A cell's run record, None when it has none or it cannot be read (its status then says so)."""
    try:
        return RunDir(directory).read()
    except IcldError:
        return None


def _changed_cells(experiment: Experiment) -> list[str]:
    """Cells claimed (running, unfinished or finished) by a run of other options than the experiment now gives."""
    changed = []
    for cell in experiment.cells:
        record = read_cell_record(cell_dir(experiment, cell))
        if record is None or record.identity == cell_identity(cell):
            continue
        now = json.loads(json.dumps(to_dict(cell.config), default=str))
        if record.identity is None:  # a record without a method: compare the options it names
            now = {k: v for k, v in now.items() if k in record.config}
            if all(record.config[k] == v for k, v in now.items() if k not in NOT_IDENTITY):
                continue
        changed.append(f"{cell.id} ({record.status}; {config_changes(record.config, now)})")
    return changed


# ---------------------------------------------------------------------------------------------- locks


def _host() -> str:
    return socket.gethostname()


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks (Linux), which tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _process_start(pid)
    return start is None or now is None or now == start


# A live worker touches its lock every HEARTBEAT_S; another host's lock untouched for LOCK_TIMEOUT_S is a dead
# worker's (its process cannot be asked from here), and is taken over.
HEARTBEAT_S = 30.0
LOCK_TIMEOUT_S = 600.0


def _is_stale(holder: Mapping[str, Any], heartbeat_age_s: float | None = None) -> bool:
    """A lock is stale when its process, on this host, is gone, or (any host) its heartbeat is too old."""
    if heartbeat_age_s is not None and heartbeat_age_s > LOCK_TIMEOUT_S:
        return True
    try:
        return holder.get("host") == _host() and not _process_alive(int(holder["pid"]), holder.get("start"))
    except (KeyError, TypeError, ValueError):
        return False


def _describe(holder: Mapping[str, Any] | None, lock: Path | None = None) -> str:
    """Who holds a cell, and how to proceed if that worker is gone (wait and rerun, or delete its lock)."""
    if not holder:
        return "another worker"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    now = f", or delete {lock} if you know it is gone" if lock is not None else ""
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {when}; if that worker is gone, its lock is "
            f"taken over {LOCK_TIMEOUT_S / 60:.0f} min after its last heartbeat: run this command again then{now}")


class CellLock:
    """An exclusive claim on a cell: a file created with O_CREAT|O_EXCL holding pid, host and time.

    A lock whose process is dead on this host is stale and is taken over; the take-over itself is
    guarded by a second exclusive file, so two workers never both break the same lock.
    """

    STALE_TAKEOVER_S = 60.0  # a take-over file older than this belongs to a worker that died mid take-over

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> bool:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    if self._age(self.path) is None:
                        continue  # released meanwhile: try again
                    if self._age(self.path) < self.STALE_TAKEOVER_S:
                        return False  # being written right now
                    holder = {}  # an empty lock file from a worker that died while creating it
                elif not _is_stale(holder, self._age(self.path)):
                    return False
                if not self._break(holder):
                    return False
                continue
            pid = os.getpid()
            info = {"pid": pid, "host": _host(), "time": time.time(), "start": _process_start(pid), "token": self.token}
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(info, handle)
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            self._start_heartbeat()
            return True
        return False

    def _start_heartbeat(self) -> None:
        """Touch the lock every HEARTBEAT_S while held, so workers on other hosts can tell it is alive."""
        import threading

        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        threading.Thread(target=beat, name=f"lock-heartbeat-{self.path.parent.name}", daemon=True).start()

    def holder(self) -> dict[str, Any] | None:
        return _read(self.path)

    def release(self) -> None:
        if self.held:
            self._stop.set()
            holder = _read(self.path)
            if holder and holder.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def _break(self, stale: Mapping[str, Any]) -> bool:
        guard = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            age = self._age(guard)
            if age is not None and age > self.STALE_TAKEOVER_S:
                guard.unlink(missing_ok=True)
            return False
        os.close(fd)
        try:
            current = _read(self.path)
            if (current or {}).get("token") == stale.get("token"):  # still the stale one, not a fresh claim
                logger.info("taking over the stale lock of %s (%s)", self.path.parent.name, _describe(stale))
                self.path.unlink(missing_ok=True)
            return True
        finally:
            guard.unlink(missing_ok=True)

    @staticmethod
    def _age(path: Path) -> float | None:
        try:
            return time.time() - path.stat().st_mtime
        except OSError:
            return None


# ---------------------------------------------------------------------------------------------- running


@dataclass
class SweepEvent:
    """What a sweep reports as it goes (``run_sweep(on_event=...)``); the CLI prints these.

    kind: ``start`` (done/total before this worker ran anything), ``cell_start``, ``cell_end``
    (with status, the cell's elapsed time and the estimate of the time left), ``busy`` (a cell held by
    another worker, see ``detail``), ``finish``.
    """

    kind: str
    done: int
    total: int
    cell: str | None = None
    status: str | None = None
    elapsed_s: float | None = None
    remaining_s: float | None = None
    detail: str | None = None


@dataclass
class SweepSummary:
    """What one worker did, and where the sweep stands."""

    total: int
    ran: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Every cell complete (or skipped for a too-long context)."""
        return sum(self.counts.get(s, 0) for s in FINISHED) == self.total


Runner = Callable[[Cell, bool], Mapping[str, Any]]


def run_cell(cell: Cell, progress: bool = True) -> dict[str, Any]:
    """Run one cell with its method's function (exactly what the single command does)."""
    return METHODS[cell.method].spec(cell.config, progress=progress)


def write_sweep_record(experiment: Experiment) -> None:
    atomic_write_json(experiment.output_dir / SWEEP_FILE, {
        "name": experiment.name, "source": experiment.source, "experiment": experiment.spec,
        "cells": [c.as_dict() for c in experiment.cells], "experiment_hash": experiment_hash(experiment),
        "updated": time.time(),
    })


def run_sweep(
    experiment: Experiment,
    *,
    retry_failed: bool = False,
    on_event: Callable[[SweepEvent], None] | None = None,
    progress: bool = True,
    runner: Runner = run_cell,
) -> SweepSummary:
    """Run every cell that is not finished yet, in order; several workers may share one sweep directory.

    A cell is claimed with a lock file before it runs and re-checked after the claim, so each cell runs
    once however many workers there are. A failing cell gets ``error.json`` (type, message, traceback)
    and the sweep goes on; failed cells are left alone unless ``retry_failed`` (each retried once per
    call). A cell that finished with other options than the experiment now gives raises ConfigError
    before anything runs: completed runs are never re-run, and never silently mixed with new ones.
    """
    emit = on_event or (lambda event: None)
    probe_writable(experiment.output_dir, "--output-dir")  # before any cell: one line, not a cell's traceback
    for cache in sorted({c.config.cache_dir for c in experiment.cells if getattr(c.config, "cache_dir", None)}):
        probe_writable(cache, "cache_dir")
    changed = _changed_cells(experiment)
    if changed:
        more = f"\n  - ... and {len(changed) - 5} more" if len(changed) > 5 else ""
        listed = "\n".join(f"  - {c}" for c in changed[:5]) + more
        raise ConfigError(
            f"{len(changed)} cell(s) in {experiment.output_dir} were run by another experiment (other options than "
            f"{experiment.source} now gives them):\n{listed}\nA sweep never mixes runs in one directory: choose "
            "another output_dir, or delete those cell directories to run them again."
        )
    write_sweep_record(experiment)
    started = time.time()
    total = len(experiment.cells)
    summary = SweepSummary(total)

    def done_count() -> int:
        counts = sweep_progress(experiment)
        summary.counts = counts
        return sum(counts.get(s, 0) for s in (*FINISHED, "failed"))

    def wanted(directory: Path) -> bool:
        status = cell_status(directory)
        if status in FINISHED:
            return False
        if status == "failed":
            error = _read(directory / ERROR_FILE) or {}
            return retry_failed and error.get("time", 0) < started  # not one failed again in this call
        return True

    emit(SweepEvent("start", done_count(), total))
    durations: list[float] = []
    for cell in experiment.cells:
        directory = cell_dir(experiment, cell)
        if not wanted(directory):
            continue
        directory.mkdir(parents=True, exist_ok=True)
        lock = CellLock(directory)
        if not lock.acquire():
            summary.busy.append(cell.id)
            emit(SweepEvent("busy", done_count(), total, cell.id, detail=_describe(lock.holder(), lock.path)))
            continue
        try:
            if not wanted(directory):  # another worker finished it between our look and our claim
                continue
            status, elapsed, message = _run_one(cell, directory, runner, progress, emit, done_count, total)
        finally:
            lock.release()
        summary.ran.append(cell.id)
        if status == "failed":
            summary.failed.append(cell.id)
        durations.append(elapsed)
        done = done_count()
        remaining = sum(durations) / len(durations) * (total - done)
        emit(SweepEvent("cell_end", done, total, cell.id, status, elapsed, remaining, message))
    emit(SweepEvent("finish", done_count(), total))
    return summary


def _run_one(cell: Cell, directory: Path, runner: Runner, progress: bool, emit: Callable[[SweepEvent], None],
             done_count: Callable[[], int], total: int) -> tuple[str, float, str | None]:
    """Run a claimed cell: (status, seconds, error message). Errors are recorded in error.json, not raised
    (KeyboardInterrupt still stops the sweep)."""
    start = time.time()
    atomic_write_json(directory / CELL_FILE, {**cell.as_dict(), "identity": cell_identity(cell), "started": start,
                                              "host": _host(), "pid": os.getpid()})
    (directory / ERROR_FILE).unlink(missing_ok=True)
    emit(SweepEvent("cell_start", done_count(), total, cell.id))
    try:
        record = runner(cell, progress)
        status = record.get("status")
        if status not in FINISHED:
            raise IcldError(f"the run ended with status {status!r}, not complete; see {directory / RESULTS_FILE}.")
        return status, time.time() - start, None
    except Exception as exc:  # one cell's failure must not stop the others
        logger.debug("cell %s failed", cell.id, exc_info=True)
        atomic_write_json(directory / ERROR_FILE, {
            "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(),
            "time": time.time(), "elapsed_s": time.time() - start, "host": _host(), "pid": os.getpid(),
        })
        return "failed", time.time() - start, f"{type(exc).__name__}: {exc}"
