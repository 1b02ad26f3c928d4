"""Experiment files: a sweep's options and grid, expanded into its cells (one run each) and checked.

An experiment file holds the options of the single commands plus ``grid:``, a mapping from a key
(``method``, ``teacher``, ``student``, ``shots``, ``seed``, ``alpha``, any option) to its values. Each
cell writes the output of its command to ``<sweep dir>/cells/<cell id>``; :mod:`icldistill.experiments.sweep` runs
the cells and :mod:`icldistill.experiments.results` gathers what they wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icldistill.config import (
    DistillOptions,
    GenDistillOptions,
    GenerationOptions,
    build_config,
    load_yaml,
    parse_value,
    to_dict,
    validate,
)
from icldistill.errors import ConfigError, IcldError, did_you_mean
from icldistill.methods.registry import METHODS as COMMANDS, MethodSpec

CELLS_DIR = "cells"


# ---------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One kind of cell: a registered method (``methods.registry``) run on the teacher's or student's model."""

    name: str
    models: tuple[str, ...]  # "teacher" and/or "student", in the order the cell id shows them
    model_option: str | None  # the options field that receives the (single) model, None for distill
    command: str  # the registered method (and single command) that does the same run

    @property
    def spec(self) -> MethodSpec:
        return COMMANDS[self.command]

    @property
    def options(self) -> type:
        return self.spec.options

    @property
    def trains(self) -> bool:
        return self.spec.trains

    @property
    def kind(self) -> str:
        """``generation`` (free-form answers, a generation task) or ``classification`` (label words)."""
        return "generation" if issubclass(self.options, GenerationOptions) else "classification"

    def keys(self) -> frozenset[str]:
        """Experiment keys that matter to this method (the rest are dropped from its cells)."""
        names = {f.name for f in dataclasses.fields(self.options)} - {"model", "teacher", "student"}
        return frozenset(names | set(self.models))


METHODS: dict[str, Method] = {
    "icl-teacher": Method("icl-teacher", ("teacher",), "model", "icl"),
    "icl-student": Method("icl-student", ("student",), "model", "icl"),
    "pbft": Method("pbft", ("student",), "model", "pbft"),
    # PBFT of the teacher's model: the baseline the paper's "less memory than PBFT" is about (issue 12).
    "pbft-teacher": Method("pbft-teacher", ("teacher",), "model", "pbft"),
    "distill": Method("distill", ("teacher", "student"), None, "distill"),
    # Generation (issue 22): ICL for generation on either model (``context: [true, false]`` in the grid gives the
    # zero-shot baseline), and generation distillation with its signals (``signal: [sequence, token, ...]``).
    "generate-teacher": Method("generate-teacher", ("teacher",), "model", "generate"),
    "generate-student": Method("generate-student", ("student",), "model", "generate"),
    "gen-distill": Method("gen-distill", ("teacher", "student"), None, "gen-distill"),
}
GENERATION_METHODS = tuple(name for name, method in METHODS.items() if method.kind == "generation")

_OPTION_CLASSES = tuple(spec.options for spec in COMMANDS.values())
_OPTION_FIELDS: dict[str, type] = {}
for _cls in _OPTION_CLASSES:
    for _f in dataclasses.fields(_cls):
        _OPTION_FIELDS.setdefault(_f.name, _cls)
_DEFAULT_MODELS = {"classification": {"teacher": DistillOptions.teacher, "student": DistillOptions.student},
                   "generation": {"teacher": GenDistillOptions.teacher, "student": GenDistillOptions.student}}

# Experiment-level keys besides the options: `seeds` at top level is the seed grid (one seed per cell).
_META_KEYS = ("name", "output_dir", "grid", "method", "seeds")
_NOT_IN_EXPERIMENT = {
    "model": "an experiment names 'teacher' and 'student'; icl-teacher and pbft-teacher use the teacher, "
             "icl-student, pbft and distill's trained model are the student",
    "resume": "a sweep always resumes: completed cells are skipped and training cells continue from their checkpoint",
}
TOP_KEYS = frozenset((set(_OPTION_FIELDS) - set(_NOT_IN_EXPERIMENT)) | set(_META_KEYS))
GRID_KEYS = frozenset((set(_OPTION_FIELDS) - set(_NOT_IN_EXPERIMENT) - {"output_dir", "seeds"}) | {"method", "seed"})
# Short names in cell ids; other grid keys appear under their own name.
_ID_NAMES = {"teacher": "t", "student": "s", "shots": "k"}


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
    base = _top_keys(spec, problems)
    name = str(base.pop("name", None) or default_name)
    sweep_dir = Path(output_dir or base.pop("output_dir", None) or Path("runs") / name).expanduser().resolve()
    base.pop("output_dir", None)
    grid = _merge_grid(base, _read_grid(base.pop("grid", None), problems), problems)
    parsed_base = {key: _parse(key, value, "", problems) for key, value in base.items()}
    parsed_grid = {key: [_parse(key, v, f"grid '{key}': ", problems) for v in values] for key, values in grid.items()}
    _check_grid_values(parsed_grid, problems)
    _check_one_kind(parsed_grid, problems)
    if problems:
        raise ExperimentError(source, problems)
    parsed_grid.setdefault("seed", [0])
    notes = _unused_keys(parsed_base, parsed_grid)
    cells, errors = _cells(parsed_base, parsed_grid, source)
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


def _top_keys(spec: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The file's top-level keys (dashes read as underscores); unknown, misplaced or doubled keys are problems."""
    base: dict[str, Any] = {}
    for raw_key, value in spec.items():
        key = str(raw_key).replace("-", "_")
        if key in _NOT_IN_EXPERIMENT:
            problems.append(f"key '{raw_key}' is not used in experiments: {_NOT_IN_EXPERIMENT[key]}.")
        elif key not in TOP_KEYS:
            problems.append(f"unknown key '{raw_key}'.{did_you_mean(key, sorted(TOP_KEYS), or_list='Valid keys')}")
        elif key in base:
            problems.append(f"key '{key}' is given twice (as '{raw_key}' and another spelling).")
        else:
            base[key] = value
    return base


def _merge_grid(base: dict[str, Any], grid: dict[str, list[Any]], problems: list[str]) -> dict[str, list[Any]]:
    """``method`` and ``seeds`` at top level are one-line grids; a key both at top level and in grid is a problem."""
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
    return grid


def _check_grid_values(parsed_grid: Mapping[str, list[Any]], problems: list[str]) -> None:
    for key, values in parsed_grid.items():
        if key == "method":
            for m in values:
                if m not in METHODS:
                    problems.append(f"grid 'method': unknown method '{m}'.{did_you_mean(str(m), sorted(METHODS))} "
                                    f"Methods: {', '.join(METHODS)}.")
        seen: list[Any] = []
        for v in values:
            if v in seen:
                problems.append(f"grid '{key}' lists {v!r} twice.")
            seen.append(v)


def _check_one_kind(parsed_grid: Mapping[str, list[Any]], problems: list[str]) -> None:
    """One experiment runs classification methods or generation methods, never both: their tasks, options and
    tables differ (a generation task is no classification task), so one sweep directory holds one kind."""
    kinds: dict[str, list[str]] = {}
    for m in parsed_grid.get("method", []):
        if m in METHODS:
            kinds.setdefault(METHODS[m].kind, []).append(str(m))
    if len(kinds) > 1:
        problems.append(f"grid 'method' mixes classification methods ({', '.join(kinds['classification'])}) with "
                        f"generation methods ({', '.join(kinds['generation'])}); their tasks differ: put them in "
                        "two experiment files (two sweep directories).")


def _grid_keys(parsed_grid: Mapping[str, list[Any]]) -> list[str]:
    return [k for k in parsed_grid if k != "seed"] + ["seed"]  # seed varies fastest


def _unused_keys(parsed_base: Mapping[str, Any], parsed_grid: Mapping[str, list[Any]]) -> list[str]:
    """Notes for keys that none of the experiment's methods uses."""
    methods_used = set(parsed_grid["method"])
    return [f"'{key}' applies to none of the methods {', '.join(sorted(methods_used))}; it is ignored."
            for key in list(parsed_base) + _grid_keys(parsed_grid)
            if key not in ("method", "seed") and not any(key in METHODS[m].keys() for m in methods_used)]


def _cells(parsed_base: Mapping[str, Any], parsed_grid: Mapping[str, list[Any]], source: str
           ) -> tuple[list[Cell], dict[str, list[str]]]:
    """One cell per grid point, skipping points that differ only in keys their method does not use; the
    config errors found, each with the cells it concerns."""
    keys = _grid_keys(parsed_grid)
    cells: list[Cell] = []
    seen_cells: set[str] = set()
    errors: dict[str, list[str]] = {}
    for combo in itertools.product(*(parsed_grid[k] for k in keys)):
        point = dict(zip(keys, combo))
        method = METHODS[point["method"]]
        grid_values = {k: v for k, v in point.items() if k in method.keys() or k in ("method", "seed")}
        fingerprint = json.dumps([method.name, sorted(grid_values.items())], default=str)
        if fingerprint in seen_cells:  # differs from an earlier cell only in keys this method does not use
            continue
        seen_cells.add(fingerprint)
        cell = _cell(method, parsed_base, grid_values, point["seed"])
        try:
            cell.config = _make_config(method.options, {**cell.config, "output_dir": "."}, source)
        except ConfigError as exc:
            errors.setdefault(str(exc), []).append(cell.id)
            continue
        cells.append(cell)
    return cells, errors


def _cell(method: Method, parsed_base: Mapping[str, Any], grid_values: Mapping[str, Any], seed: Any) -> Cell:
    """A grid point's cell, its config still the option values (``_cells`` turns them into the options class)."""
    relevant = method.keys()
    values = {k: v for k, v in parsed_base.items() if k in relevant}
    values.update({k: v for k, v in grid_values.items() if k not in ("method", "seed")})
    values["seeds"] = [seed]
    models = {m: values.get(m, _DEFAULT_MODELS[method.kind][m]) for m in method.models}
    if method.model_option:
        values.pop(method.models[0], None)
        values[method.model_option] = models[method.models[0]]
    shots = values.get("shots", method.options.shots)
    params = {**models, **({"shots": shots} if shots is not None else {}),  # None: the generation task's own
              **{k: v for k, v in grid_values.items() if k not in ("method", "seed", *method.models, "shots")},
              "seed": seed}
    if method.trains:
        values["resume"] = True
    return Cell(_cell_id(method.name, params), method.name, params, values)


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
            hint = did_you_mean(key, sorted(GRID_KEYS), or_list="Valid keys")
            problems.append(f"unknown grid key '{raw_key}'.{hint}")
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


def _check_tasks(cells: list[Cell]) -> list[str]:
    """Task, evaluation sets and pattern of each distinct combination, checked without loading data or models."""
    from icldistill.tasks.prompts import resolve_pattern
    from icldistill.tasks.registry import family_of, get_eval_set, get_task

    problems: list[str] = []
    seen: set[str] = set()
    for cell in cells:
        c = cell.config
        if METHODS[cell.method].kind == "generation":
            problems += _check_generation_task(cell, seen)
            continue
        key = json.dumps([c.task, c.eval, c.pattern, c.label_words])
        if key in seen:
            continue
        seen.add(key)
        try:
            task = get_task(c.task)
            for name in c.eval or task.default_eval:
                get_eval_set(name, task)
            resolve_pattern(family_of(task), c.pattern or task.default_pattern, c.label_words)
        except IcldError as exc:
            problems.append(f"{exc} (cell {cell.id})")
    return list(dict.fromkeys(problems))


def _check_generation_task(cell: Cell, seen: set[str]) -> list[str]:
    """A generation cell's task file and evaluation set names, checked once per (task, eval) without data."""
    from icldistill.tasks.generation import get_generation_task

    c = cell.config
    key = json.dumps(["generation", c.task, c.eval])
    if key in seen:
        return []
    seen.add(key)
    try:
        task = get_generation_task(c.task)
    except IcldError as exc:
        return [f"{exc} (cell {cell.id})"]
    unknown = [name for name in c.eval or () if name not in task.eval]
    if unknown:
        return [f"eval: '{unknown[0]}' is not an evaluation set of generation task '{task.name}' (its sets: "
                f"{', '.join(task.eval)}) (cell {cell.id})"]
    return []


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
    for command, method in COMMANDS.items():
        try:
            build_config(method.options, spec, source=str(path))
            fits.append(command)
        except ConfigError as exc:
            problems.append(f"as `icld {command} --config`: {str(exc).removeprefix(str(path) + ': ')}")
    if fits:
        return Validation(str(path), "options", [], [], f"options file for {', '.join(f'icld {c}' for c in fits)}")
    return Validation(str(path), "options", problems, [], "")
