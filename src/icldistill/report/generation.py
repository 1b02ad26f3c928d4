"""The generation table of a sweep: exact match and token F1 by method and signal, teacher agreement, answer
length, and paired differences against the ICL student, SFT on references and the zero-shot student.

Reads the per-query answers of ``experiments.gen_results.collect_generation``. Intervals are percentile
bootstraps of the mean over the (seed, query) answers of a configuration
(``scoring.generation_metrics.mean_interval``); paired differences are ``icld compare``'s
(``experiments.compare``: the same queries and seeds in both runs, exact match query by query, a paired
bootstrap interval; the zero-shot student's answers stand for every seed, its prompts not depending on it:
``Predictions.standing_for``). Teacher agreement is the share of queries where the student's extracted answer equals
the ICL teacher's on the same query and seed (``generate-teacher`` cells of the same teacher model).
``report.render.write_report`` hands a generation sweep to :func:`write_generation_report`.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from icldistill.errors import IcldError
from icldistill.experiments.compare import REPORT_RESAMPLES, compare_predictions, read_predictions
from icldistill.experiments.evaluate import eval_dir
from icldistill.experiments.gen_results import BASELINE_VARIANTS, SEED_FREE_VARIANT, collect_generation
from icldistill.experiments.grid import CELLS_DIR
from icldistill.report.console import MISSING
from icldistill.report.tables import markdown_table
from icldistill.runtime.records import atomic_write_text
from icldistill.scoring.generation_metrics import mean_interval

logger = logging.getLogger(__name__)

TITLE = "Generation distillation"
HEADERS = ["method", "teacher", "student", "eval", "seeds", "answers", "exact match [95%]", "token F1 [95%]",
           "teacher agreement", "answer tokens", "Δ EM vs ICL student [95%]", "Δ EM vs SFT [95%]",
           "Δ EM vs zero-shot [95%]"]
ALIGN = ["l", "l", "l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r"]
BASELINE_KEYS = ("vs_icl_student", "vs_sft", "vs_zero_shot")  # the table's columns for BASELINE_VARIANTS


def _interval(values: Sequence[float], resamples: int) -> tuple[float, float, float]:
    """(mean, low, high) of the values, the interval a bootstrap over them; NaNs when there are none."""
    if not len(values):
        return math.nan, math.nan, math.nan
    low, high = mean_interval(list(values), resamples=resamples, seed=0)
    return float(sum(values) / len(values)), low, high


def teacher_agreement(part: pd.DataFrame, answers: pd.DataFrame) -> tuple[float, int]:
    """(share, queries) of ``part``'s answers equal to the ICL teacher's on the same seed, set and query.

    The teacher is the ``ICL teacher`` of ``part``'s teacher model (for an ICL student: the sweep's one ICL
    teacher model, if it has exactly one). No teacher run or no common query: (NaN, 0)."""
    teachers = answers[answers["variant"] == "ICL teacher"]
    model = part["teacher"].iloc[0]
    if model is None:
        models = teachers["model"].unique()
        model = models[0] if len(models) == 1 else None
    teachers = teachers[teachers["model"] == model]
    if part["variant"].iloc[0] == "ICL teacher" or teachers.empty:
        return math.nan, 0
    keys = ["seed", "eval", "id"]
    joined = part.merge(teachers[keys + ["answer"]], on=keys, suffixes=("", "_teacher"))
    if joined.empty:
        return math.nan, 0
    same = [a is not None and a == b for a, b in zip(joined["answer"], joined["answer_teacher"])]
    return sum(same) / len(same), len(same)


def _paths(sweep_dir: Path, cells: Sequence[str], eval_set: str, own: dict[str, set[str]]) -> list[Path]:
    """Each cell's predictions of ``eval_set``: its own, or those of its ``eval-<set>`` record."""
    root = sweep_dir / CELLS_DIR
    return [root / c if eval_set in own.get(c, set()) else eval_dir(root / c, eval_set) for c in cells]


def paired_difference(sweep_dir: Path, a: pd.DataFrame, b: pd.DataFrame, eval_set: str,
                      own: dict[str, set[str]], resamples: int) -> tuple[float, float, float] | None:
    """A - B in exact match on the queries and seeds both scored, with ``icld compare``'s paired interval (a
    zero-shot run's answers standing for each of the other's seeds)."""
    try:
        pa = read_predictions(_paths(sweep_dir, sorted(a["cell"].unique()), eval_set, own), source="A")
        pb = read_predictions(_paths(sweep_dir, sorted(b["cell"].unique()), eval_set, own), source="B")
        if b["variant"].iloc[0] == SEED_FREE_VARIANT:
            pb = pb.standing_for(pa.seeds(eval_set))
        if a["variant"].iloc[0] == SEED_FREE_VARIANT:  # the zero-shot row against a baseline's every seed
            pa = pa.standing_for(pb.seeds(eval_set))
        result = compare_predictions(pa, pb, eval_set, resamples=resamples)
    except IcldError as exc:
        logger.info("no paired difference on %s: %s", eval_set, exc)
        return None
    return result.difference, result.ci95_low, result.ci95_high


def _baseline(answers: pd.DataFrame, part: pd.DataFrame, variant: str, eval_set: str) -> pd.DataFrame | None:
    """The baseline configuration (``variant``) of the same student and task, on the same set; None without one."""
    first = part.iloc[0]
    rows = answers[(answers["variant"] == variant) & (answers["eval"] == eval_set) & (answers["task"] == first["task"])
                   & (answers["student"] == first["student"])]
    if rows.empty or first["variant"] == variant or first["student"] is None:
        return None
    return rows[rows["group"] == rows["group"].iloc[0]]


def generation_table(answers: pd.DataFrame, sweep_dir: str | Path, resamples: int = REPORT_RESAMPLES) -> pd.DataFrame:
    """One row per (configuration, evaluation set): means with intervals, agreement, length, paired differences."""
    sweep_dir = Path(sweep_dir)
    own = {c: set(g["eval"]) for c, g in answers.groupby("cell")}  # read later from eval-<set>/ where missing
    out = []
    for (group, eval_set), part in answers.groupby(["group", "eval"], sort=False):
        first = part.iloc[0]
        em = _interval([float(v) for v in part["exact_match"] if v is not None and not pd.isna(v)], resamples)
        f1 = _interval([float(v) for v in part["token_f1"] if v is not None and not pd.isna(v)], resamples)
        agreement, agreed_n = teacher_agreement(part, answers)
        row = {"group": group, "method": first["method"], "variant": first["variant"], "teacher": first["teacher"],
               "student": first["student"], "eval": eval_set,
               "seeds": ",".join(map(str, sorted(part["seed"].unique()))),
               "answers": len(part), "exact_match": em[0], "exact_match_low": em[1], "exact_match_high": em[2],
               "token_f1": f1[0], "token_f1_low": f1[1], "token_f1_high": f1[2], "teacher_agreement": agreement,
               "agreement_queries": agreed_n, "answer_tokens": float(pd.to_numeric(part["tokens"]).mean())}
        for variant, key in zip(BASELINE_VARIANTS, BASELINE_KEYS):
            base = _baseline(answers, part, variant, eval_set)
            diff = paired_difference(sweep_dir, part, base, eval_set, own, resamples) if base is not None else None
            row.update({f"{key}": diff[0] if diff else math.nan, f"{key}_low": diff[1] if diff else math.nan,
                        f"{key}_high": diff[2] if diff else math.nan})
        out.append(row)
    return pd.DataFrame(out)


def _num(value: Any, low: Any = None, high: Any = None, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return MISSING
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    if low is not None and not pd.isna(low):
        text += f" [{low:+.3f}, {high:+.3f}]" if signed else f" [{low:.3f}, {high:.3f}]"
    return text


def _text(value: Any) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def table_rows(table: pd.DataFrame) -> list[list[str]]:
    """The generation table's cells, as :data:`HEADERS` orders them."""
    rows = []
    for _, r in table.iterrows():
        agreement = MISSING if pd.isna(r["teacher_agreement"]) else (
            f"{r['teacher_agreement']:.3f} ({r['agreement_queries']})")
        rows.append([r["variant"], _text(r["teacher"]), _text(r["student"]), r["eval"], r["seeds"],
                     str(r["answers"]), _num(r["exact_match"], r["exact_match_low"], r["exact_match_high"]),
                     _num(r["token_f1"], r["token_f1_low"], r["token_f1_high"]), agreement,
                     MISSING if pd.isna(r["answer_tokens"]) else f"{r['answer_tokens']:.1f}",
                     *(_num(r[k], r[f"{k}_low"], r[f"{k}_high"], signed=True) for k in BASELINE_KEYS)])
    return rows


NOTES = ("Exact match compares the extracted final answers (the task's extractor); token F1 is SQuAD's. Intervals "
         "are 95% percentile bootstraps over the configuration's answers (every seed's queries). Teacher agreement is "
         "the share of queries (their number in brackets) where the extracted answer equals the ICL teacher's on the "
         "same query and seed. Δ EM is the paired difference in exact match (`icld compare`: the queries and seeds "
         "both runs scored, a paired bootstrap interval; the zero-shot student's answers, which do not depend on "
         "the seed, are paired with every seed); where it covers 0 the two are not distinguishable. "
         "Answer tokens: the mean length of the generated answers.")


def _status_line(runs: pd.DataFrame) -> str:
    counts = runs["status"].value_counts().to_dict() if len(runs) else {}
    return f"{len(runs)} generation runs: " + (", ".join(f"{n} {s}" for s, n in counts.items()) or "none")


def render_generation(table: pd.DataFrame, runs: pd.DataFrame, notes: Sequence[str], title: str) -> tuple[str, str]:
    """(report.md, report.html) of a generation sweep: what ran, the table, how to read it."""
    rows = table_rows(table) if len(table) else []
    body = markdown_table(HEADERS, rows, ALIGN) if rows else "No finished generation runs to tabulate."
    left_out = ["\n".join(f"- {n}" for n in notes)] if notes else []
    markdown = "\n\n".join([f"# {title}", "## What ran", _status_line(runs), *left_out,
                            "## Generation results", body, "## Reading this table", NOTES]) + "\n"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(_status_line(runs))}</p>"
            + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
            + f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table><p>{html.escape(NOTES)}</p>"
            "</body></html>\n")
    return markdown, page


def generation_results(sweep_dir: str | Path, csv: str | None = None) -> list[str]:
    """What ``icld results`` prints for a generation sweep (and, with ``csv``, the per-answer table written there)."""
    answers, runs = collect_generation(sweep_dir)
    lines = [f"note: {n}" for n in answers.attrs.get("notes", [])] + [_status_line(runs)]
    if csv:
        answers.to_csv(csv, index=False)
        lines.append(f"per-answer table ({len(answers)} rows): {csv}")
    rows = table_rows(generation_table(answers, sweep_dir)) if len(answers) else []
    return lines + [markdown_table(HEADERS, rows, ALIGN) if rows else f"{sweep_dir}: no finished generation runs yet"]


def write_generation_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """``report.md``, ``report.html`` and ``generation.csv`` of a generation sweep; the keys ``write_report`` returns,
    and ``table`` (the markdown table, for the terminal)."""
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    answers, runs = collect_generation(sweep_dir)
    if runs.empty:
        raise IcldError(f"No generation runs found under {sweep_dir}; run the sweep first.")
    table = generation_table(answers, sweep_dir) if len(answers) else pd.DataFrame()
    title = f"{TITLE}: {sweep_dir.resolve().name}"
    markdown, page = render_generation(table, runs, answers.attrs.get("notes", []), title)
    paths = {"markdown": out / "report.md", "html": out / "report.html", "csv": out / "generation.csv"}
    atomic_write_text(paths["markdown"], markdown)
    atomic_write_text(paths["html"], page)
    atomic_write_text(paths["csv"], table.to_csv(index=False))
    rows = table_rows(table) if len(table) else []
    return {**paths, "figures": {}, "skipped": {},
            "table": markdown_table(HEADERS, rows, ALIGN) if rows else "No finished generation runs to tabulate."}
