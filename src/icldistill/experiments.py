"""Sweeps: an experiment file expands into a grid of runs (cells), each run once, resumably, by any worker.

An experiment file holds the options of the single commands plus ``grid:``, a mapping from a key
(``method``, ``teacher``, ``student``, ``shots``, ``seed``, ``alpha``, any option) to its values. Each
cell writes the output of its command to ``<sweep dir>/cells/<cell id>``; :func:`collect` gathers
every cell's ``results.json`` into one table and :func:`aggregate` summarises it over seeds.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import socket
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .config import DistillOptions, IclOptions, PbftOptions, build_config, load_yaml, parse_value, to_dict, validate
from .errors import ConfigError, IcldError
from .records import atomic_write_json, read_json

logger = logging.getLogger(__name__)

CELLS_DIR = "cells"
SWEEP_FILE = "sweep.json"
CELL_FILE = "cell.json"
RESULTS_FILE = "results.json"
ERROR_FILE = "error.json"
LOCK_FILE = ".lock"
# A run that ended as "skipped" (the demonstrations alone exceed the model's context) would end the same way
# again, so it is as final as a complete one.
FINISHED = ("complete", "skipped")


# ---------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One kind of cell: which options class it builds and which of the teacher/student it uses."""

    name: str
    options: type
    models: tuple[str, ...]  # "teacher" and/or "student", in the order the cell id shows them
    model_option: str | None  # the options field that receives the (single) model, None for distill
    command: str  # the single command that does the same run

    @property
    def trains(self) -> bool:
        return self.options is not IclOptions

    def keys(self) -> frozenset[str]:
        """Experiment keys that matter to this method (the rest are dropped from its cells)."""
        names = {f.name for f in dataclasses.fields(self.options)} - {"model", "teacher", "student"}
        return frozenset(names | set(self.models))


METHODS: dict[str, Method] = {
    "icl-teacher": Method("icl-teacher", IclOptions, ("teacher",), "model", "icl"),
    "icl-student": Method("icl-student", IclOptions, ("student",), "model", "icl"),
    "pbft": Method("pbft", PbftOptions, ("student",), "model", "pbft"),
    "distill": Method("distill", DistillOptions, ("teacher", "student"), None, "distill"),
}

_OPTION_CLASSES = (IclOptions, PbftOptions, DistillOptions)
_OPTION_FIELDS: dict[str, type] = {}
for _cls in _OPTION_CLASSES:
    for _f in dataclasses.fields(_cls):
        _OPTION_FIELDS.setdefault(_f.name, _cls)
_DEFAULT_MODELS = {"teacher": DistillOptions.teacher, "student": DistillOptions.student}

# Experiment-level keys besides the options: `seeds` at top level is the seed grid (one seed per cell).
_META_KEYS = ("name", "output_dir", "grid", "method", "seeds")
_NOT_IN_EXPERIMENT = {
    "model": "an experiment names 'teacher' and 'student'; icl-teacher evaluates the teacher, icl-student, pbft and "
             "distill's trained model are the student",
    "resume": "a sweep always resumes: completed cells are skipped and training cells continue from their checkpoint",
}
TOP_KEYS = frozenset((set(_OPTION_FIELDS) - set(_NOT_IN_EXPERIMENT)) | set(_META_KEYS))
GRID_KEYS = frozenset((set(_OPTION_FIELDS) - set(_NOT_IN_EXPERIMENT) - {"output_dir", "seeds"}) | {"method", "seed"})
# Short names in cell ids; other grid keys appear under their own name.
_ID_NAMES = {"teacher": "t", "student": "s", "shots": "k"}
# Options that may differ between a completed cell and the experiment now (where the files are, not what ran).
_LOCATION_OPTIONS = frozenset({"output_dir", "resume", "data_dir", "cache_dir"})


# ---------------------------------------------------------------------------------------------- experiment


@dataclass
class Cell:
    """One run of a sweep: a method, its grid values, and the config its command runs with."""

    id: str
    method: str
    params: dict[str, Any]  # the grid values that apply to this method, plus its models, shots and seed
    config: Any  # IclOptions | PbftOptions | DistillOptions, output_dir = <sweep>/cells/<id>

    @property
    def seed(self) -> int:
        return self.config.seeds[0]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "method": self.method, "command": METHODS[self.method].command,
                "params": self.params, "config": to_dict(self.config)}


@dataclass
class Experiment:
    """An expanded experiment file: its options, its grid, its cells and where they go."""

    name: str
    source: str
    output_dir: Path
    spec: dict[str, Any]  # the file's mapping, as written
    cells: list[Cell]
    notes: list[str] = field(default_factory=list)  # harmless oddities worth a line (keys no cell uses)

    def methods(self) -> list[str]:
        return list(dict.fromkeys(c.method for c in self.cells))


class ExperimentError(ConfigError):
    """An experiment file has one or more problems; ``problems`` lists each with its key or cell."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem{'s' * (len(problems) != 1)}:\n{lines}")


def load_experiment(path: str | Path, *, output_dir: str | Path | None = None) -> Experiment:
    """Read and expand an experiment file; raise :class:`ExperimentError` listing every problem."""
    path = Path(path)
    spec = load_yaml(path)
    return expand(spec, source=str(path), default_name=path.stem, output_dir=output_dir)


def expand(spec: Mapping[str, Any], *, source: str = "experiment", default_name: str = "sweep",
           output_dir: str | Path | None = None) -> Experiment:
    """Expand an experiment mapping into its cells (deduplicated), checking every key and every cell's config.

    ``output_dir`` overrides the file's; without either the sweep goes to ``runs/<name>``.
    """
    problems: list[str] = []
    notes: list[str] = []
    spec = dict(spec)
    base: dict[str, Any] = {}
    for raw_key, value in spec.items():
        key = str(raw_key).replace("-", "_")
        if key in _NOT_IN_EXPERIMENT:
            problems.append(f"key '{raw_key}' is not used in experiments: {_NOT_IN_EXPERIMENT[key]}.")
        elif key not in TOP_KEYS:
            problems.append(f"unknown key '{raw_key}'.{_suggest(key, TOP_KEYS)}")
        elif key in base:
            problems.append(f"key '{key}' is given twice (as '{raw_key}' and another spelling).")
        else:
            base[key] = value

    name = str(base.pop("name", None) or default_name)
    sweep_dir = Path(output_dir or base.pop("output_dir", None) or Path("runs") / name).expanduser().resolve()
    base.pop("output_dir", None)
    grid = _read_grid(base.pop("grid", None), problems)

    # `method` and `seeds` at top level are one-line grids.
    for top, grid_key in (("method", "method"), ("seeds", "seed")):
        if top in base:
            value = base.pop(top)
            if grid_key in grid:
                problems.append(f"'{grid_key}' is given both at top level (as '{top}') and in grid; keep one.")
            else:
                grid[grid_key] = value if isinstance(value, list) else [value]
    for key in list(base):
        if key in grid:
            problems.append(f"'{key}' is given both at top level and in grid; keep one.")
            base.pop(key)
    if "method" not in grid and not problems:
        problems.append(f"no method: add e.g. 'grid: {{method: [{', '.join(METHODS)}]}}' (or 'method: distill').")

    parsed_base = {key: _parse(key, value, "", problems) for key, value in base.items()}
    parsed_grid = {key: [_parse(key, v, f"grid '{key}': ", problems) for v in values] for key, values in grid.items()}
    for key, values in parsed_grid.items():
        if key == "method":
            for m in values:
                if m not in METHODS:
                    problems.append(f"grid 'method': unknown method '{m}'.{_suggest(str(m), METHODS)} "
                                    f"Methods: {', '.join(METHODS)}.")
        seen: list[Any] = []
        for v in values:
            if v in seen:
                problems.append(f"grid '{key}' lists {v!r} twice.")
            seen.append(v)
    if problems:
        raise ExperimentError(source, problems)

    parsed_grid.setdefault("seed", [0])
    keys = [k for k in parsed_grid if k != "seed"] + ["seed"]  # seed varies fastest
    methods_used = set(parsed_grid["method"])
    for key in list(parsed_base) + keys:
        if key not in ("method", "seed") and not any(key in METHODS[m].keys() for m in methods_used):
            notes.append(f"'{key}' applies to none of the methods {', '.join(sorted(methods_used))}; it is ignored.")

    cells: list[Cell] = []
    seen_cells: set[str] = set()
    errors: dict[str, list[str]] = {}
    for combo in itertools.product(*(parsed_grid[k] for k in keys)):
        point = dict(zip(keys, combo))
        method = METHODS[point["method"]]
        relevant = method.keys()
        grid_values = {k: v for k, v in point.items() if k in relevant or k in ("method", "seed")}
        fingerprint = json.dumps([method.name, sorted(grid_values.items())], default=str)
        if fingerprint in seen_cells:  # differs from an earlier cell only in keys this method does not use
            continue
        seen_cells.add(fingerprint)
        values = {k: v for k, v in parsed_base.items() if k in relevant}
        values.update({k: v for k, v in grid_values.items() if k not in ("method", "seed")})
        values["seeds"] = [point["seed"]]
        models = {m: values.get(m, _DEFAULT_MODELS[m]) for m in method.models}
        if method.model_option:
            values.pop(method.models[0], None)
            values[method.model_option] = models[method.models[0]]
        shots = values.get("shots", method.options.shots)
        params = {**models, "shots": shots,
                  **{k: v for k, v in grid_values.items() if k not in ("method", "seed", *method.models, "shots")},
                  "seed": point["seed"]}
        cell_id = _cell_id(method.name, params)
        if method.trains:
            values["resume"] = True
        cell = Cell(cell_id, method.name, params, None)
        try:
            cell.config = _make_config(method.options, {**values, "output_dir": "."}, source)
        except ConfigError as exc:
            errors.setdefault(str(exc), []).append(cell_id)
            continue
        cells.append(cell)
    _disambiguate(cells)
    for cell in cells:
        cell.config.output_dir = str(sweep_dir / CELLS_DIR / cell.id)
    for message, ids in errors.items():
        more = f" and {len(ids) - 1} more" if len(ids) > 1 else ""
        problems.append(f"{message.removeprefix(source + ': ')} (cell {ids[0]}{more})")
    problems += _check_tasks(cells)
    if problems:
        raise ExperimentError(source, problems)
    return Experiment(name, source, sweep_dir, dict(spec), cells, notes)


def _make_config(cls: type, values: Mapping[str, Any], source: str) -> Any:
    """What ``build_config`` does, for values already parsed by :func:`_parse` (once per value, not per cell:
    parsing resolves type hints, which costs seconds over a paper-sized grid)."""
    config = cls(**{k: list(v) if isinstance(v, list) else v for k, v in values.items()})
    validate(config, source=source)
    return config


def _read_grid(grid: Any, problems: list[str]) -> dict[str, list[Any]]:
    if grid is None:
        return {}
    if not isinstance(grid, Mapping):
        problems.append(f"'grid' must map keys to lists of values, e.g. 'grid: {{shots: [2, 8]}}', "
                        f"not a {type(grid).__name__}.")
        return {}
    out: dict[str, list[Any]] = {}
    for raw_key, values in grid.items():
        key = str(raw_key).replace("-", "_")
        if key == "seeds":  # the plural reads naturally too
            key = "seed"
        if key in _NOT_IN_EXPERIMENT:
            problems.append(f"grid key '{raw_key}' is not used in experiments: {_NOT_IN_EXPERIMENT[key]}.")
        elif key == "output_dir":
            problems.append("grid key 'output_dir': every cell has its own directory under the sweep's output_dir.")
        elif key not in GRID_KEYS:
            problems.append(f"unknown grid key '{raw_key}'.{_suggest(key, GRID_KEYS)}")
        elif key in out:
            problems.append(f"grid key '{key}' is given twice.")
        elif not isinstance(values, list):
            problems.append(f"grid '{raw_key}' must be a list of values, e.g. '{raw_key}: [{values}]'.")
        elif not values:
            problems.append(f"grid '{raw_key}' is an empty list: give at least one value (or remove the key).")
        else:
            out[key] = values
    return out


def _parse(key: str, value: Any, where: str, problems: list[str]) -> Any:
    """A value in its option's type (so that 0.5 and '0.5' are one cell); problems are collected, not raised."""
    if key == "method":
        return str(value)
    name, single = ("seeds", True) if key == "seed" else (key, False)
    try:
        parsed = parse_value(_OPTION_FIELDS[name], name, [value] if single else value, source="")
    except ConfigError as exc:
        problems.append(where + str(exc).removeprefix(": "))
        return value
    return parsed[0] if single else parsed


def _suggest(key: str, valid: Any) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=3)
    return f" Did you mean: {', '.join(close)}?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def _check_tasks(cells: list[Cell]) -> list[str]:
    """Task, evaluation sets and pattern of each distinct combination, checked without loading data or models."""
    from .prompts import resolve_pattern
    from .tasks import family_of, get_eval_set, get_task

    problems: list[str] = []
    seen: set[str] = set()
    for cell in cells:
        c = cell.config
        key = json.dumps([c.task, c.eval, c.pattern, c.label_words])
        if key in seen:
            continue
        seen.add(key)
        try:
            task = get_task(c.task)
            for name in c.eval:
                get_eval_set(name, task)
            resolve_pattern(family_of(task), c.pattern or task.default_pattern, c.label_words)
        except IcldError as exc:
            problems.append(f"{exc} (cell {cell.id})")
    return list(dict.fromkeys(problems))


# ---------------------------------------------------------------------------------------------- cell ids

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def _short_hash(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def model_label(name: str) -> str:
    """A model as a cell id shows it: a local path by its last component, a hub id with '/' -> '--'."""
    text = str(name)
    local = text.endswith(".gguf") or text.startswith(("/", ".", "~")) or os.sep in text and Path(text).exists()
    text = Path(text).name if local else text.replace("/", "--")
    return _SAFE.sub("-", text) or _short_hash(name)


def _value_label(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_value_label(v) for v in value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    text = str(value)
    if len(text) > 32 or _SAFE.search(text):  # a template: unreadable when sanitised, so a stable hash
        return "h" + _short_hash(text)
    return text


def _cell_id(method: str, params: Mapping[str, Any]) -> str:
    parts = [method]
    for key, value in params.items():
        label = model_label(value) if key in ("teacher", "student") else _value_label(value)
        parts.append(f"{_ID_NAMES.get(key, key)}={label}")
    return "__".join(parts)


def _disambiguate(cells: list[Cell]) -> None:
    """Distinct cells whose readable ids coincide (two local models named 'model') get a hash of their values."""
    by_id: dict[str, list[Cell]] = {}
    for cell in cells:
        by_id.setdefault(cell.id, []).append(cell)
    for group in by_id.values():
        if len(group) > 1:
            for cell in group:  # the hash leaves out the seed, so that a configuration's seeds stay one group
                cell.id = f"{cell.id}__{_short_hash({k: v for k, v in cell.params.items() if k != 'seed'})}"


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
    record = _read(directory / RESULTS_FILE)
    if record and record.get("status") in FINISHED:
        return record["status"]
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


def _changed_cells(experiment: Experiment) -> list[str]:
    """Finished cells that were run with other options than the experiment now gives them."""
    changed = []
    for cell in experiment.cells:
        record = _read(cell_dir(experiment, cell) / RESULTS_FILE)
        if not record or record.get("status") not in FINISHED or not isinstance(record.get("config"), dict):
            continue
        now = json.loads(json.dumps(to_dict(cell.config)))
        diffs = [f"{k}: {record['config'][k]!r} -> {now[k]!r}" for k in now
                 if k in record["config"] and k not in _LOCATION_OPTIONS and record["config"][k] != now[k]]
        if diffs:
            changed.append(f"{cell.id} ({'; '.join(diffs)})")
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


def _is_stale(holder: Mapping[str, Any]) -> bool:
    """A lock is stale when its process, on this host, is gone; locks of other hosts are never judged."""
    try:
        return holder.get("host") == _host() and not _process_alive(int(holder["pid"]), holder.get("start"))
    except (KeyError, TypeError, ValueError):
        return False


def _describe(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "another worker"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {when}"


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
                elif not _is_stale(holder):
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
            return True
        return False

    def holder(self) -> dict[str, Any] | None:
        return _read(self.path)

    def release(self) -> None:
        if self.held:
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
    if cell.method in ("icl-teacher", "icl-student"):
        from .methods.icl import run_icl

        return run_icl(cell.config, progress=progress)
    if cell.method == "pbft":
        from .methods.pbft import run_pbft

        return run_pbft(cell.config, progress=progress)
    from .methods.distill import run_distill

    return run_distill(cell.config, progress=progress)


def write_sweep_record(experiment: Experiment) -> None:
    atomic_write_json(experiment.output_dir / SWEEP_FILE, {
        "name": experiment.name, "source": experiment.source, "experiment": experiment.spec,
        "cells": [c.as_dict() for c in experiment.cells], "updated": time.time(),
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
    experiment.output_dir.mkdir(parents=True, exist_ok=True)
    changed = _changed_cells(experiment)
    if changed:
        listed = "\n".join(f"  - {c}" for c in changed[:5]) + (f"\n  - ... and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ConfigError(
            f"{len(changed)} finished cell(s) in {experiment.output_dir} ran with other options than "
            f"{experiment.source} now gives them:\n{listed}\nA sweep never re-runs a finished cell: choose another "
            "output_dir, or delete those cell directories to run them again."
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
            emit(SweepEvent("busy", done_count(), total, cell.id, detail=_describe(lock.holder())))
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
    atomic_write_json(directory / CELL_FILE, {**cell.as_dict(), "started": start, "host": _host(), "pid": os.getpid()})
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


# ---------------------------------------------------------------------------------------------- results

COLUMNS = [
    "cell", "method", "model", "teacher", "student", "task", "shots", "seed", "alpha", "peft", "pattern", "eval",
    "n", "dropped", "accuracy", "calibrated_accuracy", "auc", "accuracy_full_vocab", "non_label_rate", "macro_f1",
    "ood_accuracy", "peak_memory_mb", "train_time_s", "teacher_time_s", "seconds_per_step", "trainable_parameters",
    "inference_latency_ms", "inference_peak_memory_mb", "status",
]
CONFIG_COLUMNS = ["method", "model", "teacher", "student", "task", "shots", "seed", "alpha", "peft", "pattern", "eval"]
METRIC_COLUMNS = ["n", "dropped", "accuracy", "calibrated_accuracy", "auc", "accuracy_full_vocab", "non_label_rate",
                  "macro_f1", "ood_accuracy"]
RESOURCE_COLUMNS = ["peak_memory_mb", "train_time_s", "teacher_time_s", "seconds_per_step", "trainable_parameters",
                    "inference_latency_ms", "inference_peak_memory_mb"]
SUBCASE_COLUMNS = ["cell", "method", "model", "shots", "seed", "alpha", "eval", "subcase", "n", "accuracy"]


def _cells_on_disk(sweep_dir: Path) -> Iterator[tuple[Path, dict[str, Any], dict[str, Any] | None]]:
    """(directory, cell.json, results.json or None) of every cell a worker has started, in the sweep's order."""
    root = Path(sweep_dir) / CELLS_DIR
    if not root.is_dir():
        raise IcldError(f"{sweep_dir} is not a sweep directory (it has no {CELLS_DIR}/); run `icld sweep` first.")
    order = {c.get("id"): i for i, c in enumerate((_read(Path(sweep_dir) / SWEEP_FILE) or {}).get("cells", []))}
    directories = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (order.get(p.name, len(order)), p.name))
    for directory in directories:
        cell = _read(directory / CELL_FILE)
        if cell:
            yield directory, cell, _read(directory / RESULTS_FILE)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _get(mapping: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _describe_cell(cell: Mapping[str, Any], record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The config columns of a cell (shared by every row of it)."""
    method, config = cell["method"], cell["config"]
    trains = method in ("pbft", "distill")
    teacher = config.get("teacher") if method == "distill" else config.get("model") if method == "icl-teacher" else None
    student = config.get("student") if method == "distill" else config.get("model") if method != "icl-teacher" else None
    pattern = _get(record, "pattern", "name") or config.get("pattern")
    if pattern is None:
        from .tasks import TASKS

        task = TASKS.get(config.get("task"))
        pattern = task.default_pattern if task else None
    return {"cell": cell["id"], "method": method, "model": teacher if method == "icl-teacher" else student,
            "teacher": teacher, "student": student, "task": config.get("task"), "shots": config.get("shots"),
            "seed": config["seeds"][0], "alpha": _number(config.get("alpha")) if method == "distill" else math.nan,
            "peft": config.get("peft") if trains else None, "pattern": pattern}


def _resources(method: str, record: Mapping[str, Any], seed_entry: Mapping[str, Any]) -> dict[str, float]:
    if method.startswith("icl"):
        inference = _get(record, "resources", "inference") or {}
        return {"peak_memory_mb": _number(inference.get("peak_memory_mb")), "train_time_s": math.nan,
                "teacher_time_s": math.nan, "seconds_per_step": math.nan, "trainable_parameters": math.nan,
                "inference_latency_ms": _number(inference.get("latency_ms_per_query")),
                "inference_peak_memory_mb": _number(inference.get("peak_memory_mb"))}
    res = seed_entry.get("resources") or {}
    inference = res.get("inference") or {}
    return {"peak_memory_mb": _number(_get(res, "training", "peak_memory_mb")),
            "train_time_s": _number(res.get("train_seconds")),
            "teacher_time_s": _number(_get(record, "teacher_pass", "wall_time_s")) if method == "distill" else math.nan,
            "seconds_per_step": _number(res.get("seconds_per_step")),
            "trainable_parameters": _number(_get(seed_entry, "trainable", "trainable_parameters")),
            "inference_latency_ms": _number(inference.get("latency_ms_per_query")),
            "inference_peak_memory_mb": _number(inference.get("peak_memory_mb"))}


def collect(sweep_dir: str | Path):
    """Every run of a sweep in one table: one row per (cell, seed, evaluation set), columns :data:`COLUMNS`.

    Cells that failed or have not finished appear with their status and NaN metrics; cells no
    worker has started yet do not appear.
    """
    import pandas as pd

    rows = []
    for directory, cell, record in _cells_on_disk(Path(sweep_dir)):
        described = _describe_cell(cell, record)
        seed = str(described["seed"])
        entry = _get(record, "seeds", seed) or {}
        finished = record is not None and record.get("status") in FINISHED
        status = (record.get("status") if finished else cell_status(directory))
        if finished and "skipped" in entry:
            status = "skipped"
        metrics_by_set = (entry.get("eval") or {}) if finished else {}
        resources = _resources(cell["method"], record, entry) if finished else dict.fromkeys(RESOURCE_COLUMNS, math.nan)
        for name in cell["config"]["eval"]:
            metrics = metrics_by_set.get(name) or {}
            rows.append({**described, "eval": name, **{m: _number(metrics.get(m)) for m in METRIC_COLUMNS},
                         **resources, "status": status})
    frame = _none_for_missing(pd.DataFrame(rows, columns=COLUMNS))
    return frame.astype({"shots": "int64", "seed": "int64"}) if len(frame) else frame


_TEXT_COLUMNS = ["model", "teacher", "student", "task", "peft", "pattern"]


def _none_for_missing(frame):
    """Text columns hold None where a value does not apply (pandas' groupby turns it into NaN)."""
    for col in _TEXT_COLUMNS:
        if col in frame:
            frame[col] = frame[col].astype(object).where(frame[col].notna(), None)
    return frame


def collect_subcases(sweep_dir: str | Path):
    """HANS accuracy per subcase: one row per (cell, seed, evaluation set, subcase), columns :data:`SUBCASE_COLUMNS`."""
    import pandas as pd

    rows = []
    for _, cell, record in _cells_on_disk(Path(sweep_dir)):
        if not record or record.get("status") not in FINISHED:
            continue
        described = _describe_cell(cell, record)
        metrics_by_set = _get(record, "seeds", str(described["seed"]), "eval") or {}
        for name, metrics in metrics_by_set.items():
            for subcase, values in (metrics.get("by_subcase") or {}).items():
                rows.append({**{k: described[k] for k in ("cell", "method", "model", "shots", "seed", "alpha")},
                             "eval": name, "subcase": subcase, "n": _number(values.get("n")),
                             "accuracy": _number(values.get("accuracy"))})
    return pd.DataFrame(rows, columns=SUBCASE_COLUMNS)


def _group_id(cell_id: str) -> str:
    return re.sub(r"__seed=[^_]+", "", cell_id)


def aggregate(df):
    """Mean, sample std (ddof=1), 95% t-interval half-width and count over seeds, per configuration and eval set.

    Groups by every config column but ``seed`` (plus ``group``, the cell id without its seed); for each
    metric and resource column ``<col>_mean``, ``<col>_std``, ``<col>_ci95``; ``n_seeds`` counts the
    complete runs, ``n_failed`` the failed ones, ``seeds`` lists the seeds that count. Only complete runs
    enter the statistics; std is 0 and ci95 NaN for a single seed (as in each run's own aggregate).
    """
    import pandas as pd

    from .evaluate import aggregate_seeds

    df = df.assign(group=df["cell"].map(_group_id))
    keys = ["group"] + [c for c in CONFIG_COLUMNS if c != "seed"]
    values = METRIC_COLUMNS + RESOURCE_COLUMNS
    out = []
    for key, part in df.groupby(keys, dropna=False, sort=False):
        complete = part[part["status"] == "complete"]
        row: dict[str, Any] = dict(zip(keys, key))
        row.update(n_seeds=len(complete), n_failed=int((part["status"] == "failed").sum()),
                   seeds=",".join(str(s) for s in sorted(complete["seed"])))
        for col in values:
            present = [float(v) for v in complete[col] if not math.isnan(v)]
            stats = aggregate_seeds([{"v": v} for v in present])["v"] if present else None
            row[f"{col}_mean"] = stats["mean"] if stats else math.nan
            row[f"{col}_std"] = stats["std"] if stats else math.nan
            row[f"{col}_ci95"] = stats["ci95"] if stats and stats["ci95"] is not None else math.nan
        out.append(row)
    columns = keys + ["n_seeds", "n_failed", "seeds"] + [f"{c}_{s}" for c in values for s in ("mean", "std", "ci95")]
    return _none_for_missing(pd.DataFrame(out, columns=columns))


# ---------------------------------------------------------------------------------------------- validation


@dataclass
class Validation:
    """What ``icld validate`` found: a kind ('experiment' or 'options'), problems, notes and a summary."""

    source: str
    kind: str
    problems: list[str]
    notes: list[str]
    summary: str

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_file(path: str | Path) -> Validation:
    """Check an experiment file (one with ``grid`` or ``method``) or a plain options file for icl/pbft/distill."""
    path = Path(path)
    try:
        spec = load_yaml(path)
    except ConfigError as exc:
        return Validation(str(path), "unreadable", [str(exc)], [], "")
    if "grid" in spec or "method" in spec:
        try:
            experiment = expand(spec, source=str(path), default_name=path.stem)
        except ExperimentError as exc:
            return Validation(str(path), "experiment", exc.problems, [], "")
        counts: dict[str, int] = {}
        for cell in experiment.cells:
            counts[cell.method] = counts.get(cell.method, 0) + 1
        methods = ", ".join(f"{m} {n}" for m, n in counts.items())
        return Validation(str(path), "experiment", [], experiment.notes,
                          f"{len(experiment.cells)} cells ({methods}) -> {experiment.output_dir}")
    fits, problems = [], []
    for command, cls in (("icl", IclOptions), ("pbft", PbftOptions), ("distill", DistillOptions)):
        try:
            build_config(cls, spec, source=str(path))
            fits.append(command)
        except ConfigError as exc:
            problems.append(f"as `icld {command} --config`: {str(exc).removeprefix(str(path) + ': ')}")
    if fits:
        return Validation(str(path), "options", [], [], f"options file for {', '.join(f'icld {c}' for c in fits)}")
    return Validation(str(path), "options", problems, [], "")
