"""A sweep's generation runs as tables: every answer of every finished ``generate`` and ``gen-distill`` cell.

Generation cells are scored per query (exact match of the extracted answer, token F1), so their table is
one row per (cell, seed, evaluation set, query), read from each cell's ``predictions.jsonl`` and from the
``eval-<set>`` records ``icld eval SWEEP`` added. ``report.generation`` turns it into the generation table;
``experiments.results.collect`` leaves these cells out (it tabulates label-word accuracy).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from icldistill.errors import IcldError
from icldistill.experiments.evaluate import EVAL_PREFIX
from icldistill.experiments.results import _cells_on_disk
from icldistill.runtime.paths import PREDICTIONS_FILE
from icldistill.runtime.rundir import FINISHED

ANSWER_COLUMNS = ["cell", "group", "method", "variant", "teacher", "student", "model", "task", "seed", "eval", "id",
                  "answer", "exact_match", "token_f1", "tokens"]
RUN_COLUMNS = ["cell", "group", "method", "variant", "seed", "status"]
BASELINE_VARIANTS = ("ICL student", "SFT (reference)", "student zero-shot")
"""The rows generation distillation is measured against: the student with the context, SFT on references, and
the student without the context (whose answers do not depend on the seed: ``report.generation``)."""
SEED_FREE_VARIANT = "student zero-shot"  # no demonstrations drawn, the same queries: one seed stands for all


def group_of(cell_id: str) -> str:
    """A configuration: the cell id without its seed (the seeds of one configuration form one group)."""
    return re.sub(r"__seed=[^_]+", "", cell_id)


def variant(method: str, config: Mapping[str, Any]) -> str:
    """What a cell is, in the table's words: ICL teacher / student (with or without the context), or the signal."""
    if method == "gen-distill":
        signal = config.get("signal") or "sequence"
        return "SFT (reference)" if signal == "reference" else f"gen-distill ({signal})"
    who = "teacher" if method == "generate-teacher" else "student"
    return f"ICL {who}" if config.get("context", True) else f"{who} zero-shot"


def describe(cell: Mapping[str, Any]) -> dict[str, Any]:
    """The columns every row of a cell shares."""
    method, config = cell["method"], cell["config"]
    reference = method == "gen-distill" and config.get("signal") == "reference"  # SFT: no teacher
    teacher = None if reference else config.get("teacher") if method == "gen-distill" else (
        config.get("model") if method == "generate-teacher" else None)
    student = config.get("student") if method == "gen-distill" else (
        config.get("model") if method == "generate-student" else None)
    return {"cell": cell["id"], "group": group_of(cell["id"]), "method": method, "variant": variant(method, config),
            "teacher": teacher, "student": student, "model": student or teacher, "task": config.get("task"),
            "seed": int(config["seeds"][0])}


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def _answers(directory: Path, described: dict[str, Any]) -> list[dict[str, Any]]:
    """The cell's answers: its own evaluation sets, then sets added later (``eval-<set>/``) it had not scored."""
    seed = described["seed"]
    rows = [r for r in _rows(directory / PREDICTIONS_FILE) if int(r.get("seed", seed)) == seed]
    have = {r["eval"] for r in rows}
    for later in sorted(directory.glob(f"{EVAL_PREFIX}*")):
        rows += [r for r in _rows(later / PREDICTIONS_FILE)
                 if r.get("eval") not in have and int(r.get("seed", seed)) == seed]
    return [{**described, "eval": r["eval"], "id": str(r["id"]), "answer": r.get("answer"),
             "exact_match": r.get("exact_match"), "token_f1": r.get("token_f1"), "tokens": r.get("tokens")}
            for r in rows]


def collect_generation(sweep_dir: str | Path):
    """(answers, runs): one row per answer of every finished generation cell (:data:`ANSWER_COLUMNS`), and one
    row per started generation cell with its status (:data:`RUN_COLUMNS`); ``answers.attrs['notes']`` says
    what was left out."""
    import pandas as pd

    from icldistill.experiments.sweep import cell_status

    answers: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    for directory, cell, record, problem in _cells_on_disk(Path(sweep_dir), notes, kind="generation"):
        described = describe(cell)
        finished = problem is None and record is not None and record.get("status") in FINISHED
        status = problem or (record.get("status") if finished else cell_status(directory))
        runs.append({k: described[k] for k in RUN_COLUMNS if k in described} | {"status": status})
        if finished:
            answers += _answers(directory, described)
    frame = pd.DataFrame(answers, columns=ANSWER_COLUMNS)
    for column in ("teacher", "student", "model", "task", "answer"):  # None where absent, never pandas' NaN
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    frame.attrs["notes"] = notes
    return frame, pd.DataFrame(runs, columns=RUN_COLUMNS)


def is_generation_sweep(sweep_dir: str | Path) -> bool:
    """Whether a sweep directory holds generation cells (an experiment holds one kind: ``experiments.grid``)."""
    try:
        return any(True for _ in _cells_on_disk(Path(sweep_dir), kind="generation"))
    except (IcldError, OSError):  # not a sweep directory: the classification report says so in its own words
        return False
