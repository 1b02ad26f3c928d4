"""``icld eval`` on a sweep directory: evaluate every trained cell on sets added after the sweep ran.

Each finished PBFT, distillation or gen-distill cell gets one record per new set, ``cells/<id>/eval-<set>/`` with
``results.json`` and ``predictions.jsonl`` (the layout of a single ``icld eval``);
:func:`icldistill.experiments.results.collect` reads them as further rows of that cell, so
``icld results`` and ``icld report`` include them. Sets already evaluated are skipped (resumable).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from icldistill.config import EvalOptions
from icldistill.errors import ConfigError
from icldistill.experiments.grid import CELLS_DIR, GENERATION_METHODS, METHODS
from icldistill.experiments.sweep import CELL_FILE, SWEEP_FILE, _read, read_cell_record
from icldistill.runtime.rundir import RunDir

logger = logging.getLogger(__name__)

EVAL_PREFIX = "eval-"
TRAINED_METHODS = tuple(name for name, method in METHODS.items() if method.trains)


def is_sweep(path: str | Path) -> bool:
    path = Path(path).expanduser()
    return (path / CELLS_DIR).is_dir() and ((path / SWEEP_FILE).is_file() or any((path / CELLS_DIR).iterdir()))


def eval_dir(cell_dir: Path, eval_set: str) -> Path:
    return cell_dir / f"{EVAL_PREFIX}{eval_set}"


def extra_evaluations(cell_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(set name, finished eval record) of every ``eval-<set>`` record of a cell, in name order."""
    for directory in sorted(cell_dir.glob(f"{EVAL_PREFIX}*")):
        record = read_cell_record(directory)
        if record is not None and record.status == "complete":
            yield directory.name[len(EVAL_PREFIX):], record.to_dict()


def _fits(eval_set: str, task: str | None, method: str | None = None) -> bool:
    """Whether ``eval_set`` has the fields and classes of ``task`` (a sweep may mix tasks; others are left out);
    for a generation cell, whether it is one of the generation task's evaluation sets."""
    from icldistill.tasks.registry import get_eval_set, get_task

    if method in GENERATION_METHODS:
        from icldistill.tasks.generation import get_generation_task

        return eval_set in get_generation_task(task or "gsm8k").eval

    try:
        get_eval_set(eval_set, get_task(task or "mnli"))
    except ConfigError:
        get_eval_set(eval_set)  # a name no task knows is an error, not a silent skip
        return False
    return True


def evaluate_sweep(sweep_dir: str | Path, config: EvalOptions, *, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate each finished trained cell of ``sweep_dir`` on ``config.eval``; returns what was done per cell."""
    from icldistill.methods.evaluate import run_eval, split_by_eval

    if not config.eval:
        raise ConfigError("icld eval on a sweep needs --eval SET[,SET...]: the sets to add to its trained cells.")
    root = Path(sweep_dir).expanduser() / CELLS_DIR
    done = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        cell, record = _read(directory / CELL_FILE), read_cell_record(directory)
        if not cell or cell.get("method") not in TRAINED_METHODS or record is None or record.status != "complete":
            continue
        have = set(cell["config"].get("eval") or []) | {name for name, _ in extra_evaluations(directory)}
        task = cell["config"].get("task")
        todo = [name for name in config.eval if name not in have and _fits(name, task, cell.get("method"))]
        if not todo:
            done.append({"cell": directory.name, "evaluated": [], "skipped": list(config.eval)})
            continue
        logger.info("%s: evaluating on %s", directory.name, ", ".join(todo))
        result = run_eval(dataclasses.replace(config, model=str(directory), eval=todo), progress=progress, write=False)
        predictions = result.pop("predictions")
        for name in todo:
            part, rows = split_by_eval(result, predictions, name)
            writer = RunDir(eval_dir(directory, name))
            writer.write_predictions(rows)
            writer.write(part)
        done.append({"cell": directory.name, "evaluated": todo, "skipped": [n for n in config.eval if n in have]})
    return done
