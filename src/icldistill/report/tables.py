"""The comparison table of a sweep: per-run in-domain and OOD values, aggregated over seeds per configuration.

Takes the DataFrames of :mod:`icldistill.experiments.results` (``collect``) and renders the table as markdown; the
constants and row selections here are shared by the figures (:mod:`icldistill.report.plots`) and the report
(:mod:`icldistill.report.render`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from icldistill.config import DistillOptions
from icldistill.errors import DataError
from icldistill.experiments.compare import CONFIG_KEYS
from icldistill.report.console import MISSING, fmt as _fmt  # the project's one number format

__all__ = [
    "is_ood_eval",
    "in_domain_and_ood",
    "comparison_table",
    "markdown_table",
    "comparison_markdown",
]

RESULT_COLUMNS = (
    "cell", "method", "model", "teacher", "student", "task", "shots", "seed", "alpha", "peft", "pattern", "eval",
    "n", "dropped", "accuracy", "calibrated_accuracy", "auc", "accuracy_full_vocab", "non_label_rate", "macro_f1",
    "ood_accuracy", "peak_memory_mb", "train_time_s", "teacher_time_s", "seconds_per_step", "trainable_parameters",
    "inference_latency_ms", "inference_peak_memory_mb", "status",
)  # fmt: skip
SUBCASE_COLUMNS = ("cell", "method", "model", "shots", "seed", "alpha", "eval", "subcase", "n", "accuracy")
# Columns added by issue 12 (label and step budgets, the parts of the peak memory); a frame without them
# (older code) gets them empty rather than being refused.
OPTIONAL_COLUMNS = ("ce_target", "labelled_examples", "steps", "examples_seen", "train_peak_memory_mb",
                    "teacher_peak_memory_mb", "teacher_cache_hit", "select", "ood_metric", "chance_rate",
                    "majority_rate", "kl_space")
_OPTIONAL_TEXT = ("ce_target", "select", "ood_metric", "kl_space")

# A row of the comparison table is one configuration; seeds are what it aggregates over.
KEY_COLUMNS = CONFIG_KEYS  # one list with icld compare's pairing of configurations (kl_space included)
# A line in a figure is one configuration traced over k.
SERIES_COLUMNS = tuple(c for c in KEY_COLUMNS if c != "shots")
# Per-run values that the table aggregates over seeds (mean and sample std).
_BASE_METRICS = (
    "id_accuracy", "ood_accuracy", "id_calibrated_accuracy", "id_accuracy_full_vocab", "id_non_label_rate", "id_auc",
    "peak_memory_mb", "train_time_s", "teacher_time_s", "seconds_per_step", "trainable_parameters",
    "inference_latency_ms", "inference_peak_memory_mb", "labelled_examples", "steps", "examples_seen",
    "train_peak_memory_mb", "teacher_peak_memory_mb", "teacher_cache_hit",
)  # fmt: skip
# What no skill scores in domain: 1 / C (uniform guessing) and the majority class's share of the queries.
_ID_LEVELS = ("id_chance_rate", "id_majority_rate")
RUN_METRICS = (*_BASE_METRICS, *_ID_LEVELS)
_COST_COLUMNS = _BASE_METRICS[6:]
# A run's peak is the max over its eval sets. ``peak_memory_mb`` is the run's overall peak: for CD the
# largest of the teacher pass, the training and the final evaluation (what a user pays).
_PEAK_COLUMNS = ("peak_memory_mb", "inference_peak_memory_mb", "train_peak_memory_mb", "teacher_peak_memory_mb")

_USABLE = frozenset({"complete", "partial"})  # run statuses with at least one completed evaluation
_FAILED = frozenset({"failed", "partial"})

METHOD_ORDER = ("icl-teacher", "icl-student", "pbft-teacher", "pbft", "distill")
METHOD_LABELS = {"icl-teacher": "ICL teacher", "icl-student": "ICL student", "pbft-teacher": "PBFT (teacher model)",
                 "pbft": "PBFT", "distill": "CD"}
OOD_MEANING = "mean of the label accuracies"

OOD_PREFIX = "hans"
# When a run has several HANS sets, the lineage's number (lexical overlap, both labels averaged) wins.
OOD_PREFERENCE = ("hans-lo", "hans")

CHANCE = 0.5  # of HANS (two labels, balanced); in domain chance is 1 / C, from each run's chance_rate
OOD_CHANCE = CHANCE

# Claims compare the CD runs whose alpha is nearest the paper's (and this project's) default.
REFERENCE_ALPHA = {f.name: f.default for f in dataclasses.fields(DistillOptions)}["alpha"]


# ---------------------------------------------------------------------------------------------
# Per-run values and the comparison table


def is_ood_eval(name: Any) -> bool:
    """True for the out-of-domain evaluation sets (HANS and its heuristic subsets)."""
    return str(name).lower().startswith(OOD_PREFIX)


def _require_columns(df: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame from {source}, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"the {source} DataFrame lacks columns {missing}; "
                        "regenerate it with this version of icldistill")


def _ood_rank(name: str) -> tuple[int, str]:
    return (OOD_PREFERENCE.index(name) if name in OOD_PREFERENCE else len(OOD_PREFERENCE), name)


def in_domain_and_ood(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (cell, seed): its in-domain and OOD accuracy and its costs.

    Evaluation sets whose name starts with ``hans`` are out-of-domain; every other set is in-domain.
    The OOD value is ``ood_accuracy`` (any HANS set: mean of the two label accuracies; never the pooled
    accuracy); if a run has several HANS sets, ``hans-lo`` is preferred, then ``hans``. Several in-domain
    sets in one run are averaged (``id_eval`` names them, joined by ``+``).
    A sweep with only one kind gets NaN in the other kind's columns.

    Only rows with status ``complete`` contribute values. A run's ``status`` is ``complete`` when
    all its rows are, ``partial`` when some are, else the status its rows carry (``failed``,
    ``skipped``, ``running``...; ``failed`` if they disagree).

    Returns:
        Columns: ``cell``, ``seed``, the :data:`KEY_COLUMNS`, ``status``, ``id_eval``, ``ood_eval``
        and the :data:`RUN_METRICS`.
    """
    _require_columns(df, RESULT_COLUMNS, "results.collect()")
    df = df.copy()
    for column in OPTIONAL_COLUMNS:
        if column not in df:
            df[column] = None if column in _OPTIONAL_TEXT else math.nan
    run_key = ["cell", "seed"]
    columns = [*run_key, *KEY_COLUMNS, "status", "id_eval", "ood_eval", *RUN_METRICS]
    if df.empty:
        return pd.DataFrame(columns=columns)
    df = df.reset_index(drop=True)
    runs = df.drop_duplicates(run_key)[[*run_key, *KEY_COLUMNS]].set_index(run_key)
    complete = df["status"].astype(str).eq("complete")
    runs["status"] = df["status"].astype(str).groupby([df["cell"], df["seed"]], dropna=False).agg(_run_status)

    done = df[complete.to_numpy()].copy()
    for column in ("accuracy", "calibrated_accuracy", "accuracy_full_vocab", "non_label_rate", "auc",
                   "ood_accuracy", "chance_rate", "majority_rate", *_COST_COLUMNS):
        done[column] = pd.to_numeric(done[column], errors="coerce")
    done["eval"] = done["eval"].astype(str)
    is_ood = np.array([is_ood_eval(name) for name in done["eval"]], dtype=bool)

    in_domain = done[~is_ood].groupby(run_key, dropna=False)
    runs["id_eval"] = in_domain["eval"].agg(lambda names: "+".join(sorted(set(names))))
    id_metrics = in_domain[["accuracy", "calibrated_accuracy", "accuracy_full_vocab", "non_label_rate", "auc",
                            "chance_rate", "majority_rate"]].mean()
    runs = runs.join(id_metrics.add_prefix("id_"))

    ood = done[is_ood].copy()
    ood["rank"] = [_ood_rank(name) for name in ood["eval"]]
    chosen = ood.sort_values("rank", kind="stable").groupby(run_key, dropna=False)["eval"].first()
    runs["ood_eval"] = chosen
    ood = ood[ood["eval"].to_numpy() == chosen.reindex(pd.MultiIndex.from_frame(ood[run_key])).to_numpy()]
    # No fallback to the pooled accuracy: every HANS set defines ood_accuracy (the label mean), and a run
    # without it shows a gap rather than another number under the same header.
    ood_value = ood.groupby(run_key, dropna=False)[["ood_accuracy"]].mean()
    runs["ood_accuracy"] = ood_value["ood_accuracy"]

    costs = done.groupby(run_key, dropna=False).agg({c: "max" if c in _PEAK_COLUMNS else "mean" for c in _COST_COLUMNS})
    runs = runs.join(costs)
    runs = runs.reset_index()
    for column in columns:
        if column not in runs:
            runs[column] = math.nan
    for column in ("id_eval", "ood_eval"):
        runs[column] = runs[column].astype(object).where(runs[column].notna(), None)
    return runs[columns]


def _run_status(statuses: pd.Series) -> str:
    found = set(statuses)
    if found == {"complete"}:
        return "complete"
    if "complete" in found:
        return "partial"
    return found.pop() if len(found) == 1 else "failed"


def _method_rank(method: Any) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), str(method))


def _short_model(name: Any) -> str:
    """'facebook/opt-125m' -> 'opt-125m'; a local path -> its last component."""
    if _missing(name):
        return "?"
    return str(name).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _models_label(row: Any) -> str:
    if row["method"] == "distill" and not _missing(row["teacher"]):
        label = f"{_short_model(row['teacher'])} → {_short_model(row['student'])}"
        label += " (vocab KL)" if row.get("kl_space") == "vocab" else ""
        return label + (" (CE on teacher's labels)" if row.get("ce_target") == "teacher" else "")
    return _short_model(row["model"])


def _joined(values: Iterable[Any]) -> str | None:
    names = sorted({str(v) for v in values if not _missing(v)})
    return "+".join(names) if names else None


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """The paper-style table: one row per configuration (:data:`KEY_COLUMNS`), aggregated over seeds.

    Each metric of :data:`RUN_METRICS` gets ``<metric>_mean`` and ``<metric>_std`` (sample std,
    ddof=1; NaN with one seed). Only completed evaluations contribute to the means; ``n_seeds``
    counts the runs with at least one, ``n_failed`` the runs with a failed one, ``n_skipped`` the
    runs skipped (e.g. the context did not fit) and ``n_unfinished`` those still pending or
    running. A configuration none of whose seeds completed is kept, with NaN metrics, so it shows.

    Rows are sorted by task, method (ICL teacher, ICL student, PBFT, CD), models, k, alpha and PEFT;
    ``models`` is the display name (``teacher → student`` for CD).
    """
    return _table_from_runs(in_domain_and_ood(df))


def _table_from_runs(runs: pd.DataFrame) -> pd.DataFrame:
    columns = [*KEY_COLUMNS, "models", "id_eval", "ood_eval", "n_seeds", "n_failed", "n_skipped", "n_unfinished"]
    columns += [f"{m}_{s}" for m in RUN_METRICS for s in ("mean", "std")]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for key, group in runs.groupby(list(KEY_COLUMNS), sort=False, dropna=False):
        row: dict[str, Any] = dict(zip(KEY_COLUMNS, key))
        row.update({c: group.iloc[0][c] for c in KEY_COLUMNS if _missing(row[c])})  # None, not NaN, stays None
        for text in ("ce_target", "kl_space"):
            row[text] = None if _missing(row[text]) else row[text]
        row["models"] = _models_label(row)
        row["id_eval"] = _joined(group["id_eval"])
        row["ood_eval"] = _joined(group["ood_eval"])
        status = group["status"]
        usable = group[status.isin(_USABLE)]
        row["n_seeds"] = int(len(usable))
        row["n_failed"] = int(status.isin(_FAILED).sum())
        row["n_skipped"] = int((status == "skipped").sum())
        row["n_unfinished"] = int((~status.isin({*_USABLE, *_FAILED, "skipped"})).sum())
        for metric in RUN_METRICS:
            values = pd.to_numeric(usable[metric], errors="coerce").dropna().to_numpy(dtype=float)
            row[f"{metric}_mean"] = float(values.mean()) if values.size else math.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        rows.append(row)
    table = pd.DataFrame.from_records(rows, columns=columns)
    order = sorted(
        range(len(table)),
        key=lambda i: (
            str(table.at[i, "task"]), _method_rank(table.at[i, "method"]), str(table.at[i, "models"]),
            _sort_number(table.at[i, "shots"]), _sort_number(table.at[i, "alpha"]), str(table.at[i, "peft"]),
            str(table.at[i, "pattern"]),
        ),
    )  # fmt: skip
    return table.iloc[order].reset_index(drop=True)


def _sort_number(value: Any) -> float:
    return -math.inf if _missing(value) else float(value)


# ---------------------------------------------------------------------------------------------
# Markdown tables


def _cell_text(value: Any) -> str:
    return str(value).replace("\n", " ").replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub pipe table; ``align`` holds ``'l'`` or ``'r'`` per column (default left).

    Cells are padded to a common width so that the source is readable too; ``|`` is escaped.
    """
    align = list(align or ["l"] * len(headers))
    if len(align) != len(headers) or any(len(r) != len(headers) for r in rows):
        raise ValueError("markdown_table: every row and the alignment need one entry per header")
    text_rows = [[_cell_text(c) for c in row] for row in rows]
    head = [_cell_text(h) for h in headers]
    widths = [max([3, len(head[i])] + [len(r[i]) for r in text_rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(head), rule, *(line(r) for r in text_rows)])


def _fmt_mean_std(mean: Any, std: Any, digits: int = 3) -> str:
    if _missing(mean):
        return MISSING
    return f"{float(mean):.{digits}f}" if _missing(std) else f"{float(mean):.{digits}f} ± {float(std):.{digits}f}"


def _fmt_alpha(value: Any) -> str:
    return MISSING if _missing(value) else f"{float(value):g}"


def _varies(table: pd.DataFrame, column: str) -> bool:
    return table[column].map(lambda v: "<missing>" if _missing(v) else str(v)).nunique() > 1


def _table_view(table: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, formatted rows and alignment of the comparison table as shown in the report."""
    id_eval = _joined(table["id_eval"]) or "in-domain"
    ood_eval = _joined(table["ood_eval"]) or "OOD"
    optional = [
        ("task", "task", lambda r: str(r["task"]), "l", _varies(table, "task")),
        ("alpha", "α", lambda r: _fmt_alpha(r["alpha"]), "r", table["alpha"].notna().any()),
        ("peft", "PEFT", lambda r: MISSING if _missing(r["peft"]) else str(r["peft"]), "l",
         table["peft"].notna().any()),
        ("pattern", "pattern", lambda r: str(r["pattern"]), "l", _varies(table, "pattern")),
    ]
    spec: list[tuple[str, Any, str]] = []
    if optional[0][4]:
        spec.append(("task", optional[0][2], "l"))
    spec += [
        ("method", _method_label, "l"),
        ("model(s)", lambda r: r["models"], "l"),
        ("k", lambda r: str(int(r["shots"])) if not _missing(r["shots"]) else MISSING, "r"),
    ]
    spec += [(header, fn, a) for _, header, fn, a, shown in optional[1:] if shown]
    # An accuracy column appears only when the sweep evaluated that kind of set (SST-2 has no OOD set).
    if table["id_accuracy_mean"].notna().any() or not table["ood_accuracy_mean"].notna().any():
        spec.append((f"in-domain acc ({id_eval})",
                     lambda r: _fmt_mean_std(r["id_accuracy_mean"], r["id_accuracy_std"]), "r"))
    if table["ood_accuracy_mean"].notna().any():
        spec.append((f"OOD acc ({ood_eval}, {OOD_MEANING})",
                     lambda r: _fmt_mean_std(r["ood_accuracy_mean"], r["ood_accuracy_std"]), "r"))
    # The budgets each row was given: labels it saw, optimiser steps and examples it trained on.
    spec.append(("labelled examples", lambda r: _fmt(r["labelled_examples_mean"], 0), "r"))
    if table["steps_mean"].notna().any():  # one column: the table fits 1400 px without scrolling (issue 23)
        spec.append(("steps / examples seen",
                     lambda r: f"{_fmt(r['steps_mean'], 0)} / {_fmt(r['examples_seen_mean'], 0)}", "r"))
    spec += [
        ("calibrated acc", lambda r: _fmt(r["id_calibrated_accuracy_mean"], 3), "r"),
        ("overall peak memory (MB)", lambda r: _fmt(r["peak_memory_mb_mean"], 0), "r"),
    ]
    if table["teacher_peak_memory_mb_mean"].notna().any():  # the parts of CD's peak, where it has them
        spec.append(("training / teacher pass peak (MB)",
                     lambda r: f"{_fmt(r['train_peak_memory_mb_mean'], 0)} / "
                               f"{_fmt(r['teacher_peak_memory_mb_mean'], 0)}", "r"))
    spec += [
        ("train time (s)", lambda r: _fmt(r["train_time_s_mean"]), "r"),
        ("inference latency (ms/query)", lambda r: _fmt(r["inference_latency_ms_mean"]), "r"),
        ("inference peak memory (MB)", lambda r: _fmt(r["inference_peak_memory_mb_mean"], 0), "r"),
        ("seeds", _seeds_cell, "r"),
    ]
    headers = [h for h, _, _ in spec]
    rows = [[fn(row) for _, fn, _ in spec] for _, row in table.iterrows()]
    return headers, rows, [a for _, _, a in spec]


def _method_label(row: Any) -> str:
    """The method as the table names it; ICL at k = 0 is the model answering zero-shot (the untrained baseline)."""
    label = METHOD_LABELS.get(row["method"], str(row["method"]))
    if str(row["method"]).startswith("icl") and not _missing(row["shots"]) and int(row["shots"]) == 0:
        return f"{label} (zero-shot)"
    return label


def chance_levels(table: pd.DataFrame) -> tuple[float | None, float | None]:
    """(chance, majority-class rate) in domain over the table's configurations: 1 / C, and always answering
    the most frequent class; ``None`` where the results do not carry them (older records)."""
    def mean(column: str) -> float | None:
        values = pd.to_numeric(table[column], errors="coerce").dropna() if column in table else pd.Series(dtype=float)
        return float(values.mean()) if len(values) else None

    return mean("id_chance_rate_mean"), mean("id_majority_rate_mean")


def _seeds_cell(row: Any) -> str:
    extra = [f"{row[f'n_{kind}']} {kind}" for kind in ("failed", "skipped", "unfinished") if row[f"n_{kind}"]]
    return f"{row['n_seeds']}" + (f" ({', '.join(extra)})" if extra else "")


def comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison table as a markdown pipe table (columns that never vary are left out)."""
    if table.empty:
        return "_No results to tabulate._"
    return markdown_table(*_table_view(table))


# ---------------------------------------------------------------------------------------------
# Rows of one method or configuration, for the figures and the claims


def _reference_rows(table: pd.DataFrame, method: str) -> pd.DataFrame:
    """The rows of ``method``; for CD, only those with alpha nearest :data:`REFERENCE_ALPHA`."""
    rows = table[(table["method"] == method)]
    if method == "distill" and rows["alpha"].notna().any():
        distance = (rows["alpha"].astype(float) - REFERENCE_ALPHA).abs()
        rows = rows[distance == distance.min()]
    return rows


def _values(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    return rows[rows[column].notna()]


def _growth(rows: pd.DataFrame, column: str) -> tuple[float, int, int] | None:
    """(value at the largest k / value at the smallest k, k_min, k_max) of one series' mean column."""
    rows = _values(rows, f"{column}_mean")
    if rows["shots"].nunique() < 2:
        return None
    by_k = rows.groupby("shots")[f"{column}_mean"].mean()
    k_min, k_max = int(by_k.index.min()), int(by_k.index.max())
    low, high = by_k.loc[k_min], by_k.loc[k_max]
    return (float(high / low) if low else math.nan, k_min, k_max)


def _first_series(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of the first configuration (over k) among ``rows``, so ratios never mix configurations."""
    if rows.empty:
        return rows
    key = rows.iloc[0][list(SERIES_COLUMNS)]
    mask = np.ones(len(rows), dtype=bool)
    for column in SERIES_COLUMNS:
        value = key[column]
        mask &= rows[column].isna().to_numpy() if _missing(value) else (rows[column] == value).to_numpy()
    return rows[mask]
