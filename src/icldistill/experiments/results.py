"""A sweep's results as tables: :func:`collect` gathers every cell's ``results.json`` into one DataFrame,
:func:`collect_subcases` the HANS subcases, and :func:`aggregate` summarises over seeds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from icldistill.errors import IcldError
from icldistill.experiments.grid import CELLS_DIR, GENERATION_METHODS
from icldistill.experiments.sweep import CELL_FILE, SWEEP_FILE, _read, cell_status
from icldistill.runtime.rundir import FINISHED, RunDir, run_identity

COLUMNS = [
    "cell", "method", "model", "teacher", "student", "task", "shots", "seed", "alpha", "peft", "pattern", "eval",
    "n", "dropped", "accuracy", "calibrated_accuracy", "auc", "accuracy_full_vocab", "non_label_rate", "macro_f1",
    "ood_accuracy", "chance_rate", "majority_rate", "peak_memory_mb", "train_time_s", "teacher_time_s",
    "seconds_per_step", "trainable_parameters",
    "inference_latency_ms", "inference_peak_memory_mb", "status",
    # Issue 12: label and step budgets, and what the peak memory is made of.
    "ce_target", "labelled_examples", "steps", "examples_seen", "train_peak_memory_mb", "teacher_peak_memory_mb",
    "teacher_cache_hit", "select", "ood_metric", "kl_space",
]
CONFIG_COLUMNS = ["method", "model", "teacher", "student", "task", "shots", "seed", "alpha", "peft", "pattern", "eval",
                  "ce_target", "kl_space"]
METRIC_COLUMNS = ["n", "dropped", "accuracy", "calibrated_accuracy", "auc", "accuracy_full_vocab", "non_label_rate",
                  "macro_f1", "ood_accuracy", "chance_rate", "majority_rate"]
RESOURCE_COLUMNS = ["peak_memory_mb", "train_time_s", "teacher_time_s", "seconds_per_step", "trainable_parameters",
                    "inference_latency_ms", "inference_peak_memory_mb", "labelled_examples", "steps", "examples_seen",
                    "train_peak_memory_mb", "teacher_peak_memory_mb", "teacher_cache_hit"]
_TEACHER_METHODS = ("icl-teacher", "pbft-teacher")  # methods whose one model is the teacher
SUBCASE_COLUMNS = ["cell", "method", "model", "shots", "seed", "alpha", "eval", "subcase", "n", "accuracy"]
CONFUSION_COLUMNS = ["cell", "method", "model", "shots", "seed", "alpha", "eval", "gold", "predicted", "count"]


# Statuses of runs that cannot count: failed, or whose record is unreadable, broken or another experiment's.
PROBLEM_STATUSES = ("failed", "unreadable", "broken", "other-experiment")


def _expected_identities(sweep_dir: Path) -> dict[str, str]:
    """cell id -> the run identity the sweep's experiment (sweep.json) gives that cell."""
    cells = (_read(Path(sweep_dir) / SWEEP_FILE) or {}).get("cells", [])
    return {c["id"]: run_identity(c["command"], c["config"]) for c in cells
            if isinstance(c, Mapping) and "command" in c and isinstance(c.get("config"), Mapping)}


def _cells_on_disk(sweep_dir: Path, notes: list[str] | None = None, *, kind: str = "classification"
                   ) -> Iterator[tuple[Path, dict[str, Any], dict[str, Any] | None, str | None]]:
    """(directory, cell.json, results.json as a migrated dict or None, problem status or None) of every cell a
    worker has started, in the sweep's order. A record that cannot be read, or that another experiment wrote
    (its identity is not the one sweep.json gives the cell), comes with its problem, and a line in ``notes``.
    Only cells of methods of ``kind`` (generation cells have their own table: ``report.generation``)."""
    root = Path(sweep_dir) / CELLS_DIR
    if not root.is_dir():
        raise IcldError(f"{sweep_dir} is not a sweep directory (it has no {CELLS_DIR}/); run `icld sweep` first.")
    notes = [] if notes is None else notes
    order = {c.get("id"): i for i, c in enumerate((_read(Path(sweep_dir) / SWEEP_FILE) or {}).get("cells", []))}
    expected = _expected_identities(Path(sweep_dir))
    directories = sorted((p for p in root.iterdir() if p.is_dir()),
                         key=lambda p: (order.get(p.name, len(order)), p.name))
    for directory in directories:
        cell = _read(directory / CELL_FILE)
        if not cell:
            if (directory / CELL_FILE).exists():
                notes.append(f"{directory / CELL_FILE} cannot be read; that cell is left out.")
            continue
        if (cell.get("method") in GENERATION_METHODS) != (kind == "generation"):
            continue
        try:
            record = RunDir(directory).read()
        except IcldError as exc:
            notes.append(f"{exc} That cell counts as unreadable.")
            yield directory, cell, None, "unreadable"
            continue
        if (record is not None and record.identity is not None and cell["id"] in expected
                and record.identity != expected[cell["id"]]):
            notes.append(f"{directory} holds a run of another experiment than {SWEEP_FILE}'s (identity "
                         f"{record.identity}, expected {expected[cell['id']]}); it is left out of the statistics.")
            yield directory, cell, record.to_dict(), "other-experiment"
            continue
        if record is not None and record.config.get("gradient_checkpointing"):
            notes.append(f"{directory} trained with --gradient-checkpointing (the same numbers, less memory, slower "
                         "steps): compare its training memory and time only with cells that did too.")
        yield directory, cell, None if record is None else record.to_dict(), None


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
    trains = method in ("pbft", "pbft-teacher", "distill")
    on_teacher = method in _TEACHER_METHODS
    teacher = config.get("teacher") if method == "distill" else config.get("model") if on_teacher else None
    student = config.get("student") if method == "distill" else config.get("model") if not on_teacher else None
    pattern = _get(record, "pattern", "name") or config.get("pattern")
    if pattern is None:
        task = _task_or_none(config.get("task"))
        pattern = task.default_pattern if task else None
    return {"cell": cell["id"], "method": method, "model": teacher if on_teacher else student,
            "teacher": teacher, "student": student, "task": config.get("task"), "shots": config.get("shots"),
            "seed": config["seeds"][0], "alpha": _number(config.get("alpha")) if method == "distill" else math.nan,
            "peft": config.get("peft") if trains else None, "pattern": pattern,
            "ce_target": config.get("ce_target", "gold") if method == "distill" else None,
            "kl_space": config.get("kl_space", "label") if method == "distill" else None,
            "select": config.get("select", "last") if trains else None}


def _labelled(record: Mapping[str, Any], seed_entry: Mapping[str, Any]) -> float:
    """The run's label budget (ICL: k; PBFT: k; CD: k + training queries when CE uses gold labels)."""
    value = seed_entry.get("labelled_examples")
    if value is None:
        value = record.get("labelled_examples")
    return _number(value)


def _task_or_none(name: Any):
    """The task a cell ran (a name or a task file), or None when it cannot be resolved any more."""
    from icldistill.tasks.registry import get_task

    try:
        return get_task(str(name)) if name else None
    except IcldError:
        return None


def _default_eval(task_name: Any, metrics_by_set: Mapping[str, Any]) -> list[str]:
    """The sets a cell without an explicit ``eval`` ran: what its record has, else the task's defaults."""
    if metrics_by_set:
        return list(metrics_by_set)
    task = _task_or_none(task_name)
    return list(task.default_eval) if task else []


def partial_training(resources: Mapping[str, Any]) -> bool:
    """Whether a trained seed's training figures cover only the epochs after a resume (``methods.common.
    training_cost``); a record older than that field is partial exactly when it resumed."""
    measured = _get(resources, "training", "measured")
    if measured is not None:
        return measured != "whole"
    return resources.get("resumed_from_epoch") is not None


def _resources(method: str, record: Mapping[str, Any], seed_entry: Mapping[str, Any]) -> dict[str, float]:
    none = dict.fromkeys(("steps", "examples_seen", "train_peak_memory_mb", "teacher_peak_memory_mb",
                          "teacher_cache_hit"), math.nan)
    if method.startswith("icl"):
        inference = _get(record, "resources", "inference") or {}
        return {**none, "peak_memory_mb": _number(inference.get("peak_memory_mb")), "train_time_s": math.nan,
                "teacher_time_s": math.nan, "seconds_per_step": math.nan, "trainable_parameters": math.nan,
                "inference_latency_ms": _number(inference.get("latency_ms_per_query")),
                "inference_peak_memory_mb": _number(inference.get("peak_memory_mb")),
                "labelled_examples": _labelled(record, seed_entry)}
    res = seed_entry.get("resources") or {}
    inference = res.get("inference") or {}
    training_peak = _number(_get(res, "training", "peak_memory_mb"))
    # The run's overall peak (teacher pass, training, final evaluation); older records have the training peak only.
    overall = (_number(_get(res, "peak_memory_mb", "overall")) if isinstance(res.get("peak_memory_mb"), Mapping)
               else training_peak)
    if partial_training(res):  # the peaks cover only the epochs after a resume: not the training's
        training_peak = overall = math.nan
    teacher_pass = seed_entry.get("teacher_pass") or {}
    cache_hit = teacher_pass.get("cache_hit")
    return {"peak_memory_mb": overall,
            "train_time_s": _number(res.get("train_seconds")),
            "teacher_time_s": _number(teacher_pass.get("wall_time_s", _get(record, "teacher_pass", "wall_time_s")))
            if method == "distill" else math.nan,
            "seconds_per_step": _number(res.get("seconds_per_step")),
            "trainable_parameters": _number(_get(seed_entry, "trainable", "trainable_parameters")),
            "inference_latency_ms": _number(inference.get("latency_ms_per_query")),
            "inference_peak_memory_mb": _number(inference.get("peak_memory_mb")),
            "labelled_examples": _labelled(record, seed_entry),
            "steps": _number(res.get("steps")), "examples_seen": _number(res.get("examples_seen")),
            "train_peak_memory_mb": training_peak,
            "teacher_peak_memory_mb": _number(teacher_pass.get("peak_memory_mb")),
            "teacher_cache_hit": float(cache_hit) if isinstance(cache_hit, bool) else math.nan}


def collect(sweep_dir: str | Path):
    """Every run of a sweep in one table: one row per (cell, seed, evaluation set), columns :data:`COLUMNS`.

    Cells that failed or have not finished appear with their status and NaN metrics; cells no
    worker has started yet do not appear.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for directory, cell, record, problem in _cells_on_disk(Path(sweep_dir), notes):
        rows += _cell_rows(directory, cell, record, problem, notes)
    frame = _none_for_missing(pd.DataFrame(rows, columns=COLUMNS))
    frame = frame.astype({"shots": "int64", "seed": "int64"}) if len(frame) else frame
    frame.attrs["notes"] = notes  # what was left out and why (``icld results`` prints them)
    return frame


def _cell_rows(directory: Path, cell: Mapping[str, Any], record: Mapping[str, Any] | None, problem: str | None,
               notes: list[str]) -> list[dict[str, Any]]:
    """A cell's rows: one per evaluation set; a finished set without a numeric accuracy is ``broken``."""
    described = _describe_cell(cell, record)
    seed = str(described["seed"])
    entry = _get(record, "seeds", seed) or {}
    finished = problem is None and record is not None and record.get("status") in FINISHED
    status = problem or (record.get("status") if finished else cell_status(directory))
    if finished and "skipped" in entry:
        status = "skipped"
    metrics_by_set = (entry.get("eval") or {}) if finished else {}
    resources = _resources(cell["method"], record, entry) if finished else dict.fromkeys(RESOURCE_COLUMNS, math.nan)
    if finished and partial_training(entry.get("resources") or {}):
        notes.append(f"{directory}: seed {seed} resumed after epoch {_get(entry, 'resources', 'resumed_from_epoch')} "
                     "and its record does not hold the earlier attempts' memory: its peak memory is left out.")
    rows = []
    for name in cell["config"]["eval"] or _default_eval(cell["config"].get("task"), metrics_by_set):
        metrics = metrics_by_set.get(name) or {}
        row_status = status
        if status == "complete" and math.isnan(_number(metrics.get("accuracy"))):
            row_status = "broken"
            notes.append(f"{directory}: seed {seed} has no numeric accuracy on {name}; it does not count.")
        rows.append({**described, "eval": name, **{m: _number(metrics.get(m)) for m in METRIC_COLUMNS},
                     **resources, "ood_metric": metrics.get("ood_metric"), "status": row_status})
    if finished:  # sets evaluated later with `icld eval SWEEP --eval SET` (experiments/evaluate.py)
        rows += _later_evaluations(directory, described, resources, cell["config"]["eval"], seed)
    return rows


def _later_evaluations(directory: Path, described: dict[str, Any], resources: dict[str, float],
                       evaluated: list[str], seed: str) -> list[dict[str, Any]]:
    """Rows of a cell's ``eval-<set>`` records: its training costs, the record's metrics and inference cost."""
    from icldistill.experiments.evaluate import extra_evaluations

    rows = []
    for name, record in extra_evaluations(directory):
        if name in evaluated:
            continue
        metrics = _get(record, "seeds", seed, "eval", name) or {}
        inference = _get(record, "resources", "inference") or {}
        cost = {**resources, "inference_latency_ms": _number(inference.get("latency_ms_per_query")),
                "inference_peak_memory_mb": _number(inference.get("peak_memory_mb"))}
        rows.append({**described, "eval": name, **{m: _number(metrics.get(m)) for m in METRIC_COLUMNS}, **cost,
                     "status": "complete" if metrics else "failed"})
    return rows


_TEXT_COLUMNS = ["model", "teacher", "student", "task", "peft", "pattern", "ce_target", "select", "ood_metric",
                 "kl_space"]


def _none_for_missing(frame):
    """Text columns hold None where a value does not apply (pandas' groupby turns it into NaN)."""
    for col in _TEXT_COLUMNS:
        if col in frame:
            frame[col] = frame[col].astype(object).where(frame[col].notna(), None)
    return frame


def _finished_set_metrics(sweep_dir: str | Path) -> Iterator[tuple[dict[str, Any], str, Mapping[str, Any]]]:
    """(run columns, evaluation set, metrics) of every finished run's sets: what the breakdown tables read."""
    for _, cell, record, problem in _cells_on_disk(Path(sweep_dir)):
        if problem or not record or record.get("status") not in FINISHED:
            continue
        described = _describe_cell(cell, record)
        run = {k: described[k] for k in ("cell", "method", "model", "shots", "seed", "alpha")}
        for name, metrics in (_get(record, "seeds", str(described["seed"]), "eval") or {}).items():
            yield run, name, metrics


def collect_subcases(sweep_dir: str | Path):
    """HANS accuracy per subcase: one row per (cell, seed, evaluation set, subcase), columns :data:`SUBCASE_COLUMNS`."""
    import pandas as pd

    rows = [{**run, "eval": name, "subcase": subcase, "n": _number(values.get("n")),
             "accuracy": _number(values.get("accuracy"))}
            for run, name, metrics in _finished_set_metrics(sweep_dir)
            for subcase, values in (metrics.get("by_subcase") or {}).items()]
    return pd.DataFrame(rows, columns=SUBCASE_COLUMNS)


def collect_confusions(sweep_dir: str | Path):
    """Confusion counts of every finished run: one row per (cell, seed, evaluation set, gold, predicted)."""
    import pandas as pd

    rows = [{**run, "eval": name, "gold": gold, "predicted": pred, "count": _number(count)}
            for run, name, metrics in _finished_set_metrics(sweep_dir)
            for gold, predicted in (metrics.get("confusion") or {}).items()
            for pred, count in predicted.items()]
    return pd.DataFrame(rows, columns=CONFUSION_COLUMNS)


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

    from icldistill.scoring.metrics import aggregate_seeds

    df = df.assign(group=df["cell"].map(_group_id))
    keys = ["group"] + [c for c in CONFIG_COLUMNS if c != "seed"]
    values = METRIC_COLUMNS + RESOURCE_COLUMNS
    out = []
    for key, part in df.groupby(keys, dropna=False, sort=False):
        complete = part[part["status"] == "complete"]
        row: dict[str, Any] = dict(zip(keys, key))
        row.update(n_seeds=len(complete), n_failed=int(part["status"].isin(PROBLEM_STATUSES).sum()),
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
