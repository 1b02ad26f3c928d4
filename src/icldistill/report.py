"""Tables, figures and the sweep report: what each method reached in- and out-of-domain, and at what cost.

The core functions take the DataFrames of :mod:`icldistill.experiments` (``collect`` and
``collect_subcases``) and never read a sweep directory themselves; only :func:`write_report` does,
so every number in a report can be recomputed and tested from a DataFrame.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .config import DistillOptions
from .errors import DataError, IcldError
from .records import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "FigureResult",
    "Claim",
    "is_ood_eval",
    "in_domain_and_ood",
    "comparison_table",
    "markdown_table",
    "comparison_markdown",
    "headline_claims",
    "figure_unsupported_reason",
    "plot_accuracy_vs_k",
    "plot_memory_vs_k",
    "plot_id_vs_ood",
    "plot_alpha_curve",
    "plot_hans_heatmap",
    "make_figures",
    "render_markdown",
    "render_html",
    "write_report",
]

RESULT_COLUMNS = (
    "cell", "method", "model", "teacher", "student", "task", "shots", "seed", "alpha", "peft", "pattern", "eval",
    "n", "dropped", "accuracy", "calibrated_accuracy", "auc", "accuracy_full_vocab", "non_label_rate", "macro_f1",
    "ood_accuracy", "peak_memory_mb", "train_time_s", "teacher_time_s", "seconds_per_step", "trainable_parameters",
    "inference_latency_ms", "inference_peak_memory_mb", "status",
)  # fmt: skip
SUBCASE_COLUMNS = ("cell", "method", "model", "shots", "seed", "alpha", "eval", "subcase", "n", "accuracy")

# A row of the comparison table is one configuration; seeds are what it aggregates over.
KEY_COLUMNS = ("task", "method", "model", "teacher", "student", "shots", "alpha", "peft", "pattern")
# A line in a figure is one configuration traced over k.
SERIES_COLUMNS = tuple(c for c in KEY_COLUMNS if c != "shots")
# Per-run values that the table aggregates over seeds (mean and sample std).
RUN_METRICS = (
    "id_accuracy", "ood_accuracy", "id_calibrated_accuracy", "id_accuracy_full_vocab", "id_non_label_rate", "id_auc",
    "peak_memory_mb", "train_time_s", "teacher_time_s", "seconds_per_step", "trainable_parameters",
    "inference_latency_ms", "inference_peak_memory_mb",
)  # fmt: skip
_COST_COLUMNS = RUN_METRICS[6:]
_PEAK_COLUMNS = ("peak_memory_mb", "inference_peak_memory_mb")  # a run's peak is the max over its eval sets

_USABLE = frozenset({"complete", "partial"})  # run statuses with at least one completed evaluation
_FAILED = frozenset({"failed", "partial"})
_STATUS_WORDS = {"partial": "partly failed"}

METHOD_ORDER = ("icl-teacher", "icl-student", "pbft", "distill")
METHOD_LABELS = {"icl-teacher": "ICL teacher", "icl-student": "ICL student", "pbft": "PBFT", "distill": "CD"}
METHOD_COLORS = {"icl-teacher": "#1f77b4", "icl-student": "#ff7f0e", "pbft": "#2ca02c", "distill": "#d62728"}
_EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")

OOD_PREFIX = "hans"
# When a run has several HANS sets, the lineage's number (lexical overlap, both labels averaged) wins.
OOD_PREFERENCE = ("hans-lo", "hans")
DEFAULT_TITLE = "ICL distillation report"
CHANCE = 0.5  # binary tasks, and HANS is balanced between its labels
DPI = 150
# Claims compare the CD runs whose alpha is nearest the paper's (and this project's) default.
REFERENCE_ALPHA = {f.name: f.default for f in dataclasses.fields(DistillOptions)}["alpha"]

FIGURES = {
    "accuracy_vs_k": "Accuracy vs number of demonstrations k",
    "memory_vs_k": "Peak memory vs number of demonstrations k",
    "id_vs_ood": "In-domain vs out-of-domain accuracy",
    "alpha_curve": "CD accuracy vs loss weight alpha",
    "hans_heatmap": "HANS accuracy by subcase",
}

READING_NOTES = (
    "Accuracy is restricted accuracy: the prediction is the more probable of the label words "
    "(e.g. ' Yes' / ' No'), whatever else the model would have said. Full-vocabulary accuracy "
    "(in the per-run results) also requires the label word to be the model's top token overall; tiny models "
    "often score near 0 there. Calibrated accuracy applies contextual calibration (Zhao et al. 2021) "
    "against a content-free input; it is empty for runs that did not score one. "
    f"OOD accuracy is HANS lexical overlap (HANS-LO), the mean of the entailment and non-entailment "
    f"accuracies, as in the lineage (Mosbach et al. 2023). Chance is {CHANCE} for these binary tasks. "
    "Small models are strongly label-biased: a model that answers 'Yes' to everything scores about 0.5 "
    "on HANS-LO (1.0 on entailment, 0.0 on non-entailment) and near the majority rate in-domain, so "
    "numbers close to 0.5 mean no measurable skill, and a relative gain over a near-chance baseline "
    "says little on its own. Std is the sample standard deviation over seeds (none with one seed)."
)


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
    The OOD value is ``ood_accuracy`` (HANS: mean of the two label accuracies), falling back to
    ``accuracy`` where it is missing; if a run has several HANS sets, ``hans-lo`` is preferred, then
    ``hans``. Several in-domain sets in one run are averaged (``id_eval`` names them, joined by ``+``).
    A sweep with only one kind gets NaN in the other kind's columns.

    Only rows with status ``complete`` contribute values. A run's ``status`` is ``complete`` when
    all its rows are, ``partial`` when some are, else the status its rows carry (``failed``,
    ``skipped``, ``running``...; ``failed`` if they disagree).

    Returns:
        Columns: ``cell``, ``seed``, the :data:`KEY_COLUMNS`, ``status``, ``id_eval``, ``ood_eval``
        and the :data:`RUN_METRICS`.
    """
    _require_columns(df, RESULT_COLUMNS, "experiments.collect()")
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
                   "ood_accuracy", *_COST_COLUMNS):
        done[column] = pd.to_numeric(done[column], errors="coerce")
    done["eval"] = done["eval"].astype(str)
    is_ood = np.array([is_ood_eval(name) for name in done["eval"]], dtype=bool)

    in_domain = done[~is_ood].groupby(run_key, dropna=False)
    runs["id_eval"] = in_domain["eval"].agg(lambda names: "+".join(sorted(set(names))))
    id_metrics = in_domain[["accuracy", "calibrated_accuracy", "accuracy_full_vocab", "non_label_rate", "auc"]].mean()
    runs = runs.join(id_metrics.add_prefix("id_"))

    ood = done[is_ood].copy()
    ood["rank"] = [_ood_rank(name) for name in ood["eval"]]
    chosen = ood.sort_values("rank", kind="stable").groupby(run_key, dropna=False)["eval"].first()
    runs["ood_eval"] = chosen
    ood = ood[ood["eval"].to_numpy() == chosen.reindex(pd.MultiIndex.from_frame(ood[run_key])).to_numpy()]
    ood_value = ood.groupby(run_key, dropna=False)[["ood_accuracy", "accuracy"]].mean()
    runs["ood_accuracy"] = ood_value["ood_accuracy"].fillna(ood_value["accuracy"])

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
        return f"{_short_model(row['teacher'])} → {_short_model(row['student'])}"
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


def _fmt(value: Any, digits: int | None = None) -> str:
    """A number for a table cell: '—' for missing, thousands separators, sensible decimals."""
    if _missing(value):
        return "—"
    value = float(value)
    if digits is None:
        digits = 0 if abs(value) >= 100 else (1 if abs(value) >= 10 else 2)
    return f"{value:,.{digits}f}"


def _fmt_mean_std(mean: Any, std: Any, digits: int = 3) -> str:
    if _missing(mean):
        return "—"
    return f"{float(mean):.{digits}f}" if _missing(std) else f"{float(mean):.{digits}f} ± {float(std):.{digits}f}"


def _fmt_alpha(value: Any) -> str:
    return "—" if _missing(value) else f"{float(value):g}"


def _varies(table: pd.DataFrame, column: str) -> bool:
    return table[column].map(lambda v: "<missing>" if _missing(v) else str(v)).nunique() > 1


def _table_view(table: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, formatted rows and alignment of the comparison table as shown in the report."""
    id_eval = _joined(table["id_eval"]) or "in-domain"
    ood_eval = _joined(table["ood_eval"]) or "OOD"
    optional = [
        ("task", "task", lambda r: str(r["task"]), "l", _varies(table, "task")),
        ("alpha", "α", lambda r: _fmt_alpha(r["alpha"]), "r", table["alpha"].notna().any()),
        ("peft", "PEFT", lambda r: "—" if _missing(r["peft"]) else str(r["peft"]), "l", table["peft"].notna().any()),
        ("pattern", "pattern", lambda r: str(r["pattern"]), "l", _varies(table, "pattern")),
    ]
    spec: list[tuple[str, Any, str]] = []
    if optional[0][4]:
        spec.append(("task", optional[0][2], "l"))
    spec += [
        ("method", lambda r: METHOD_LABELS.get(r["method"], str(r["method"])), "l"),
        ("model(s)", lambda r: r["models"], "l"),
        ("k", lambda r: str(int(r["shots"])) if not _missing(r["shots"]) else "—", "r"),
    ]
    spec += [(header, fn, a) for _, header, fn, a, shown in optional[1:] if shown]
    spec += [
        (f"in-domain acc ({id_eval})", lambda r: _fmt_mean_std(r["id_accuracy_mean"], r["id_accuracy_std"]), "r"),
        (f"OOD acc ({ood_eval})", lambda r: _fmt_mean_std(r["ood_accuracy_mean"], r["ood_accuracy_std"]), "r"),
        ("calibrated acc", lambda r: _fmt(r["id_calibrated_accuracy_mean"], 3), "r"),
        ("peak memory (MB)", lambda r: _fmt(r["peak_memory_mb_mean"], 0), "r"),
        ("train time (s)", lambda r: _fmt(r["train_time_s_mean"]), "r"),
        ("inference latency (ms/query)", lambda r: _fmt(r["inference_latency_ms_mean"]), "r"),
        ("inference peak memory (MB)", lambda r: _fmt(r["inference_peak_memory_mb_mean"], 0), "r"),
        ("seeds", _seeds_cell, "r"),
    ]
    headers = [h for h, _, _ in spec]
    rows = [[fn(row) for _, fn, _ in spec] for _, row in table.iterrows()]
    return headers, rows, [a for _, _, a in spec]


def _seeds_cell(row: Any) -> str:
    extra = [f"{row[f'n_{kind}']} {kind}" for kind in ("failed", "skipped", "unfinished") if row[f"n_{kind}"]]
    return f"{row['n_seeds']}" + (f" ({', '.join(extra)})" if extra else "")


def comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison table as a markdown pipe table (columns that never vary are left out)."""
    if table.empty:
        return "_No results to tabulate._"
    return markdown_table(*_table_view(table))


# ---------------------------------------------------------------------------------------------
# Series: one configuration traced over k, with a stable label, colour and line style


@dataclass
class _Series:
    label: str
    method: str
    color: str
    linestyle: str
    marker: str
    rows: pd.DataFrame  # comparison-table rows, sorted by shots


def _series(table: pd.DataFrame, methods: Sequence[str] | None = None) -> list[_Series]:
    """Group the table into lines; the label names only what differs between lines."""
    table = table if methods is None else table[table["method"].isin(methods)]
    if table.empty:
        return []
    many_tasks = _varies(table, "task")
    series: list[_Series] = []
    method_names = sorted(table["method"].unique(), key=_method_rank)
    for index, method in enumerate(method_names):
        part = table[table["method"] == method]
        varying = {c: _varies(part, c) for c in ("alpha", "peft", "pattern")}
        groups = list(part.groupby(list(SERIES_COLUMNS), sort=False, dropna=False))
        color = METHOD_COLORS.get(method, _EXTRA_COLORS[index % len(_EXTRA_COLORS)])
        for variant, (_, rows) in enumerate(groups):
            first = rows.iloc[0]
            label = f"{METHOD_LABELS.get(method, method)} ({first['models']})"
            extras = []
            if varying["alpha"]:
                extras.append(f"α={_fmt_alpha(first['alpha'])}")
            if varying["peft"]:
                extras.append(str(first["peft"]))
            if varying["pattern"]:
                extras.append(f"pattern {first['pattern']}")
            if many_tasks:
                extras.append(str(first["task"]))
            if extras:
                label += ", " + ", ".join(extras)
            series.append(_Series(label, method, color, _LINESTYLES[variant % len(_LINESTYLES)],
                                  _MARKERS[variant % len(_MARKERS)], rows.sort_values("shots")))
    return series


def _reference_rows(table: pd.DataFrame, method: str) -> pd.DataFrame:
    """The rows of ``method``; for CD, only those with alpha nearest :data:`REFERENCE_ALPHA`."""
    rows = table[(table["method"] == method)]
    if method == "distill" and rows["alpha"].notna().any():
        distance = (rows["alpha"].astype(float) - REFERENCE_ALPHA).abs()
        rows = rows[distance == distance.min()]
    return rows


def _values(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    return rows[rows[column].notna()]


def _ks(table: pd.DataFrame, columns: Sequence[str]) -> list[int]:
    mask = np.zeros(len(table), dtype=bool)
    for column in columns:
        mask |= table[column].notna().to_numpy()
    return sorted({int(k) for k in table.loc[mask, "shots"] if not _missing(k)})


# ---------------------------------------------------------------------------------------------
# Figures


@dataclass
class FigureResult:
    """One figure of the report: its file, or why it was not drawn."""

    name: str
    title: str
    path: Path | None
    caption: str
    reason: str | None = None


def figure_unsupported_reason(name: str, data: pd.DataFrame | None) -> str | None:
    """Why figure ``name`` cannot be drawn from ``data``, or None if it can.

    ``data`` is the comparison table, except for ``hans_heatmap`` (``collect_subcases()`` rows).
    """
    if name == "hans_heatmap":
        if data is None or data.empty or "accuracy" not in data or data["accuracy"].notna().sum() == 0:
            return "the sweep has no HANS subcase results (no HANS evaluation completed)"
        return None
    if data is None or data.empty:
        return "the sweep has no completed runs"
    if name == "accuracy_vs_k":
        ks = _ks(data, ["id_accuracy_mean", "ood_accuracy_mean"])
        if not ks:
            return "no run has an accuracy"
        if len(ks) < 2:
            return f"the sweep has a single k ({ks[0]}); a curve over k needs at least two"
        return None
    if name == "memory_vs_k":
        ks = _ks(data, ["peak_memory_mb_mean", "inference_peak_memory_mb_mean"])
        if not ks:
            return "no run recorded its peak memory"
        if len(ks) < 2:
            return f"the sweep has a single k ({ks[0]}) with memory figures; a curve over k needs at least two"
        return None
    if name == "id_vs_ood":
        both = data[data["id_accuracy_mean"].notna() & data["ood_accuracy_mean"].notna()]
        if data["ood_accuracy_mean"].isna().all():
            return "the sweep has no out-of-domain (HANS) results"
        if data["id_accuracy_mean"].isna().all():
            return "the sweep has no in-domain results"
        if both.empty:
            return "no configuration has both in-domain and out-of-domain results"
        return None
    if name == "alpha_curve":
        distill = data[data["method"] == "distill"]
        if distill.empty:
            return "the sweep has no context-distillation (CD) runs"
        alphas = sorted({float(a) for a in distill["alpha"] if not _missing(a)})
        if len(alphas) < 2:
            shown = f" (α={alphas[0]:g})" if alphas else ""
            return f"CD ran with a single α{shown}; a curve over α needs at least two"
        return None
    raise ValueError(f"unknown figure {name!r}; known: {sorted(FIGURES)}")


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    """Write the figure as PNG atomically (temp file + rename), like every other result file."""
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise IcldError(f"Cannot write to {path.parent}: {exc.strerror}. Choose a writable output directory.") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _set_k_axis(ax: Any, ks: Sequence[int]) -> None:
    """log2 x axis with ticks at the k that ran (symlog if k=0, zero-shot, is among them)."""
    if min(ks) <= 0:
        ax.set_xscale("symlog", base=2, linthresh=1, linscale=0.5)
    else:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks))
    ax.set_xticklabels([str(k) for k in ks])
    ax.xaxis.set_minor_locator(_null_locator())
    lo, hi = min(ks), max(ks)
    if lo > 0:
        ax.set_xlim(lo / 2**0.4, hi * 2**0.4)
    ax.set_xlabel("demonstrations per prompt, k (log2 scale)")


def _null_locator() -> Any:
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _dodge(ks: np.ndarray, index: int, count: int) -> np.ndarray:
    """Shift a line sideways in log2 space so error bars of different methods do not overlap."""
    if count < 2:
        return ks
    offset = (index - (count - 1) / 2) * min(0.08, 0.4 / count)
    return np.where(ks > 0, ks * 2.0**offset, ks)


def _chance_line(ax: Any, axis: str = "y") -> None:
    style = {"color": "0.45", "linestyle": ":", "linewidth": 1.2, "zorder": 0}
    if axis == "y":
        ax.axhline(CHANCE, label=f"chance ({CHANCE})", **style)
    else:
        ax.axvline(CHANCE, **style)


def _seed_note(table: pd.DataFrame) -> str:
    seeds = sorted({int(n) for n in table["n_seeds"] if n})
    if not seeds:
        return "no completed seeds"
    count = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    return f"mean ± std over {count} seed{'s' if seeds[-1] > 1 else ''} per point"


def _best(table: pd.DataFrame, column: str) -> pd.Series | None:
    rows = _values(table, column)
    return None if rows.empty else rows.loc[rows[column].idxmax()]


def _describe(row: Any) -> str:
    text = f"{METHOD_LABELS.get(row['method'], row['method'])} ({row['models']}) at k={int(row['shots'])}"
    if row["method"] == "distill" and not _missing(row["alpha"]):
        text += f", α={_fmt_alpha(row['alpha'])}"
    return text


def _legend_below(figure: Any, axes: Sequence[Any]) -> None:
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith(("chance", "OOD = ")))
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=9, frameon=False)


def _eval_names(table: pd.DataFrame, column: str, fallback: str) -> str:
    return _joined(table[column]) or fallback


def plot_accuracy_vs_k(table: pd.DataFrame, path: str | Path) -> Path | None:
    """In-domain and OOD accuracy vs k, one line per configuration, error bars = std over seeds.

    Returns the PNG path, or None (reason from :func:`figure_unsupported_reason`) for a single k.
    """
    reason = figure_unsupported_reason("accuracy_vs_k", table)
    if reason:
        logger.info("accuracy vs k not drawn: %s", reason)
        return None
    panels = [
        (column, title)
        for column, title in (
            ("id_accuracy", f"In-domain ({_eval_names(table, 'id_eval', 'in-domain')})"),
            ("ood_accuracy", f"Out-of-domain ({_eval_names(table, 'ood_eval', 'HANS')}, mean of both labels)"),
        )
        if table[f"{column}_mean"].notna().any()
    ]
    ks = _ks(table, [f"{c}_mean" for c, _ in panels])
    series = _series(table)
    figure = _new_figure(5.6 * len(panels) + 0.6, 4.9)
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (column, title) in zip(axes, panels):
        for index, line in enumerate(series):
            rows = _values(line.rows, f"{column}_mean")
            if rows.empty:
                continue
            x = _dodge(rows["shots"].to_numpy(dtype=float), index, len(series))
            ax.errorbar(x, rows[f"{column}_mean"], yerr=rows[f"{column}_std"].fillna(0.0), label=line.label,
                        color=line.color, linestyle=line.linestyle, marker=line.marker, markersize=5, capsize=3,
                        linewidth=1.6)
        _chance_line(ax)
        _set_k_axis(ax, ks)
        ax.set_title(title, fontsize=11)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (restricted to label words)")
    headline = "Accuracy vs number of demonstrations k"
    best = _best(table, "ood_accuracy_mean") if "ood_accuracy" in dict(panels) else _best(table, "id_accuracy_mean")
    if best is not None:
        which = "OOD" if "ood_accuracy" in dict(panels) else "in-domain"
        value = best["ood_accuracy_mean"] if which == "OOD" else best["id_accuracy_mean"]
        headline += f": highest {which} is {_describe(best)} ({value:.3f})"
    figure.suptitle(f"{headline}\n{_seed_note(table)}", fontsize=12)
    _legend_below(figure, axes)
    return _save(figure, path)


def _growth(rows: pd.DataFrame, column: str) -> tuple[float, int, int] | None:
    """(value at the largest k / value at the smallest k, k_min, k_max) of one series' mean column."""
    rows = _values(rows, f"{column}_mean")
    if rows["shots"].nunique() < 2:
        return None
    by_k = rows.groupby("shots")[f"{column}_mean"].mean()
    k_min, k_max = int(by_k.index.min()), int(by_k.index.max())
    low, high = by_k.loc[k_min], by_k.loc[k_max]
    return (float(high / low) if low else math.nan, k_min, k_max)


def plot_memory_vs_k(table: pd.DataFrame, path: str | Path) -> Path | None:
    """Peak memory vs k per configuration: training (PBFT, CD) or scoring (ICL), and at inference.

    The paper's claim is that CD's memory stays flat in k (the student never sees the
    demonstrations) while ICL's grows with the prompt. Returns the path, or None for a single k.
    """
    reason = figure_unsupported_reason("memory_vs_k", table)
    if reason:
        logger.info("memory vs k not drawn: %s", reason)
        return None
    panels = [
        (column, title)
        for column, title in (
            ("peak_memory_mb", "Run peak: training (PBFT, CD) or scoring (ICL)"),
            ("inference_peak_memory_mb", "Inference: answering one query"),
        )
        if table[f"{column}_mean"].notna().any()
    ]
    ks = _ks(table, [f"{c}_mean" for c, _ in panels])
    series = _series(table)
    figure = _new_figure(5.6 * len(panels) + 0.6, 4.9)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, title) in zip(axes, panels):
        for index, line in enumerate(series):
            rows = _values(line.rows, f"{column}_mean")
            if rows.empty:
                continue
            x = _dodge(rows["shots"].to_numpy(dtype=float), index, len(series))
            ax.errorbar(x, rows[f"{column}_mean"], yerr=rows[f"{column}_std"].fillna(0.0), label=line.label,
                        color=line.color, linestyle=line.linestyle, marker=line.marker, markersize=5, capsize=3,
                        linewidth=1.6)
        _set_k_axis(ax, ks)
        top = (table[f"{column}_mean"] + table[f"{column}_std"].fillna(0.0)).max()
        ax.set_ylim(0, top * 1.12)  # from zero, so that a flat line looks flat; headroom for the markers
        ax.set_ylabel("peak memory (MB)")
        ax.set_title(title, fontsize=11)
        ax.grid(True, axis="y", alpha=0.3)
    ratios = []
    for method in sorted(table["method"].unique(), key=_method_rank):
        growth = _growth(_first_series(_reference_rows(table, method)), panels[0][0])
        if growth and not math.isnan(growth[0]):
            ratios.append(f"{METHOD_LABELS.get(method, method)} ×{growth[0]:.2f}")
    headline = "Peak memory vs k"
    if ratios:
        headline += f" — growth from k={min(ks)} to k={max(ks)}: " + ", ".join(ratios)
    figure.suptitle(f"{headline}\n{_seed_note(table)}", fontsize=12)
    _legend_below(figure, axes)
    return _save(figure, path)


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


def plot_id_vs_ood(table: pd.DataFrame, path: str | Path) -> Path | None:
    """Scatter of in-domain vs OOD accuracy, one point per (configuration, k), coloured by method."""
    reason = figure_unsupported_reason("id_vs_ood", table)
    if reason:
        logger.info("ID vs OOD not drawn: %s", reason)
        return None
    figure = _new_figure(7.6, 7.0)
    ax = figure.subplots()
    for line in _series(table):
        rows = line.rows[line.rows["id_accuracy_mean"].notna() & line.rows["ood_accuracy_mean"].notna()]
        if rows.empty:
            continue
        ax.errorbar(rows["id_accuracy_mean"], rows["ood_accuracy_mean"], xerr=rows["id_accuracy_std"].fillna(0.0),
                    yerr=rows["ood_accuracy_std"].fillna(0.0), label=line.label, color=line.color,
                    marker=line.marker, markersize=7, linestyle="none", capsize=2, elinewidth=0.8, alpha=0.9)
        for _, row in rows.iterrows():
            ax.annotate(f"k={int(row['shots'])}", (row["id_accuracy_mean"], row["ood_accuracy_mean"]),
                        xytext=(5, 4), textcoords="offset points", fontsize=8, color=line.color)
    _chance_line(ax, "y")
    _chance_line(ax, "x")
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], color="0.75", linewidth=1, linestyle="--", zorder=0, label="OOD = in-domain")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"in-domain accuracy ({_eval_names(table, 'id_eval', 'in-domain')})")
    ax.set_ylabel(f"OOD accuracy ({_eval_names(table, 'ood_eval', 'HANS')}, mean of both labels)")
    ax.grid(True, alpha=0.3)
    best = _best(table[table["id_accuracy_mean"].notna()], "ood_accuracy_mean")
    headline = "In-domain vs OOD accuracy per method and k"
    if best is not None:
        headline += f"\nhighest OOD: {_describe(best)} ({best['ood_accuracy_mean']:.3f})"
    figure.suptitle(f"{headline}\n{_seed_note(table)}", fontsize=11)
    _legend_below(figure, [ax])
    return _save(figure, path)


def plot_alpha_curve(table: pd.DataFrame, path: str | Path) -> Path | None:
    """CD in-domain and OOD accuracy vs alpha (weight of the KL term), one line per k.

    Drawn only when CD ran with more than one alpha; else returns None.
    """
    reason = figure_unsupported_reason("alpha_curve", table)
    if reason:
        logger.info("alpha curve not drawn: %s", reason)
        return None
    from matplotlib import colormaps

    distill = table[(table["method"] == "distill") & table["alpha"].notna()]
    panels = [
        (column, title)
        for column, title in (
            ("id_accuracy", f"In-domain ({_eval_names(distill, 'id_eval', 'in-domain')})"),
            ("ood_accuracy", f"Out-of-domain ({_eval_names(distill, 'ood_eval', 'HANS')}, mean of both labels)"),
        )
        if distill[f"{column}_mean"].notna().any()
    ]
    other = [c for c in ("teacher", "student", "peft", "pattern", "task") if _varies(distill, c)]
    lines = list(distill.groupby(["shots", *other], sort=True, dropna=False))
    ks = sorted({int(k) for k in distill["shots"]})
    cmap = colormaps["viridis"]
    figure = _new_figure(5.6 * len(panels) + 0.6, 4.9)
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (column, title) in zip(axes, panels):
        for index, (key, rows) in enumerate(lines):
            rows = _values(rows.sort_values("alpha"), f"{column}_mean")
            if rows.empty:
                continue
            k = int(rows.iloc[0]["shots"])
            shade = cmap(0.15 + 0.7 * (ks.index(k) / max(1, len(ks) - 1)))
            label = f"CD, k={k}" + ("".join(f", {v}" for v in (key[1:] if isinstance(key, tuple) else ())))
            ax.errorbar(rows["alpha"].astype(float), rows[f"{column}_mean"], yerr=rows[f"{column}_std"].fillna(0.0),
                        label=label, color=shade, marker=_MARKERS[index % len(_MARKERS)], markersize=5, capsize=3,
                        linewidth=1.6, linestyle=_LINESTYLES[(index // len(ks)) % len(_LINESTYLES)])
        _chance_line(ax)
        alphas = sorted({float(a) for a in distill["alpha"]})
        if len(alphas) <= 8:
            ax.set_xticks(alphas)
            ax.set_xticklabels([f"{a:g}" for a in alphas])
        ax.set_xlabel("α (weight of KL to the teacher; 1 − α on gold-label CE)")
        ax.set_title(title, fontsize=11)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy (restricted to label words)")
    column = "ood_accuracy" if "ood_accuracy" in dict(panels) else "id_accuracy"
    best = _best(distill, f"{column}_mean")
    headline = "CD accuracy vs α"
    if best is not None:
        which = "OOD" if column == "ood_accuracy" else "in-domain"
        headline += (f": highest {which} at α={_fmt_alpha(best['alpha'])}, k={int(best['shots'])} "
                     f"({best[f'{column}_mean']:.3f}); paper default α={REFERENCE_ALPHA:g}")
    figure.suptitle(f"{headline}\n{_seed_note(distill)}", fontsize=12)
    _legend_below(figure, axes)
    return _save(figure, path)


def _subcase_sort_key(name: str) -> tuple[int, int, str]:
    """HANS subcase names start with the heuristic (l/s/c) and the label (e/n): group them so."""
    heuristic = {"l": 0, "s": 1, "c": 2}.get(name[:1], 3)
    label = {"e": 0, "n": 1}.get(name[1:2], 2) if "_" in name[:3] else 2
    return (heuristic, label, name)


def _subcase_label(name: str) -> str:
    kind = {"e": "entailment", "n": "non-entailment"}.get(name[1:2]) if name[2:3] == "_" else None
    return f"{name}  ({kind})" if kind else name


def plot_hans_heatmap(subcases: pd.DataFrame | None, path: str | Path) -> Path | None:
    """Accuracy per HANS subcase (rows) and method/k (columns), mean over seeds.

    The diverging colormap is centred at chance (0.5): blue above, red below. ``subcases`` is
    :func:`icldistill.experiments.collect_subcases`'s frame. Returns None without subcase results.
    """
    reason = figure_unsupported_reason("hans_heatmap", subcases)
    if reason:
        logger.info("HANS heatmap not drawn: %s", reason)
        return None
    _require_columns(subcases, SUBCASE_COLUMNS, "experiments.collect_subcases()")
    from matplotlib.colors import TwoSlopeNorm

    data = subcases[subcases["accuracy"].notna()].copy()
    data["subcase"] = data["subcase"].astype(str)
    # A subcase scored in two HANS sets of the same run (hans and hans-lo) is the same rows: count it once.
    run_keys = ["cell", "seed", "method", "model", "shots", "alpha", "subcase"]
    per_run = data.groupby(run_keys, dropna=False)["accuracy"].mean()
    means = per_run.groupby(["method", "model", "alpha", "shots", "subcase"], dropna=False).mean().reset_index()
    columns = list(means.groupby(["method", "model", "alpha", "shots"], dropna=False, sort=False).groups)
    columns.sort(key=lambda c: (_method_rank(c[0]), str(c[1]), _sort_number(c[2]), _sort_number(c[3])))
    many_models = {m: means[means["method"] == m]["model"].nunique() > 1 for m in means["method"].unique()}
    many_alphas = {m: means[means["method"] == m]["alpha"].nunique() > 1 for m in means["method"].unique()}
    names = sorted(means["subcase"].unique(), key=_subcase_sort_key)
    matrix = np.full((len(names), len(columns)), np.nan)
    lookup = {(r.method, str(r.model), _sort_number(r.alpha), _sort_number(r.shots), r.subcase): r.accuracy
              for r in means.itertuples()}
    for j, (method, model, alpha, shots) in enumerate(columns):
        for i, name in enumerate(names):
            matrix[i, j] = lookup.get((method, str(model), _sort_number(alpha), _sort_number(shots), name), np.nan)
    labels = []
    for method, model, alpha, shots in columns:
        label = METHOD_LABELS.get(method, str(method))
        if many_models.get(method):
            label += f" {_short_model(model)}"
        if many_alphas.get(method) and not _missing(alpha):
            label += f" α={_fmt_alpha(alpha)}"
        labels.append(f"{label}, k={int(shots)}")

    figure = _new_figure(max(6.5, 3.8 + 0.62 * len(columns)), max(4.2, 2.2 + 0.3 * len(names)))
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="RdBu", norm=TwoSlopeNorm(vcenter=CHANCE, vmin=0.0, vmax=1.0), aspect="auto")
    if matrix.size <= 900:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                value = matrix[i, j]
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(value - CHANCE) > 0.3 else "black")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(labels, rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([_subcase_label(n) for n in names], fontsize=8)
    groups = [_subcase_sort_key(n)[:2] for n in names]
    for i in range(1, len(names)):
        if groups[i] != groups[i - 1]:
            ax.axhline(i - 0.5, color="black", linewidth=1.2 if groups[i][0] != groups[i - 1][0] else 0.6)
    ax.set_xlabel("method and number of demonstrations k")
    ax.set_ylabel("HANS subcase")
    colorbar = figure.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label(f"accuracy ({CHANCE} = chance)")
    kinds = np.array([_subcase_sort_key(n)[1] for n in names])
    headline = "HANS accuracy by subcase, mean over seeds (blue above chance, red below)"
    if (kinds == 0).any() and (kinds == 1).any():
        headline += (f"\nmean over all columns: entailment subcases {np.nanmean(matrix[kinds == 0]):.2f}, "
                     f"non-entailment subcases {np.nanmean(matrix[kinds == 1]):.2f}")
    figure.suptitle(headline, fontsize=12)
    return _save(figure, path)


_PLOTTERS = {
    "accuracy_vs_k": plot_accuracy_vs_k,
    "memory_vs_k": plot_memory_vs_k,
    "id_vs_ood": plot_id_vs_ood,
    "alpha_curve": plot_alpha_curve,
    "hans_heatmap": plot_hans_heatmap,
}

_CAPTIONS = {
    "accuracy_vs_k": "Accuracy of each method as the number of demonstrations k grows; "
                     "error bars are the std over seeds.",
    "memory_vs_k": "Peak memory per method vs k: training peak for PBFT and CD, scoring peak for ICL; "
                   "right, the cost of answering one query at inference.",
    "id_vs_ood": "Each point is one method at one k; "
                 "points above the dashed diagonal do better out-of-domain than in-domain.",
    "alpha_curve": "CD accuracy as the loss moves from the gold label (α=0) to the teacher's distribution (α=1).",
    "hans_heatmap": "HANS accuracy per subcase: "
                    "a label-biased model is blue on one label's rows and red on the other's.",
}


def make_figures(table: pd.DataFrame, subcases: pd.DataFrame | None, out_dir: str | Path) -> list[FigureResult]:
    """Draw every figure into ``out_dir`` (``<name>.png``); unsupported ones carry their reason."""
    out_dir = Path(out_dir)
    results = []
    for name, plot in _PLOTTERS.items():
        data = subcases if name == "hans_heatmap" else table
        reason = figure_unsupported_reason(name, data)
        path = None if reason else plot(data, out_dir / f"{name}.png")
        results.append(FigureResult(name, FIGURES[name], path, _CAPTIONS[name], reason))
    return results


# ---------------------------------------------------------------------------------------------
# Headline claims, as measured


@dataclass
class Claim:
    """One headline claim of the paper and what this sweep measured for it.

    ``values`` maps k to the numbers behind the sentence (e.g. ``{"cd": .., "baseline": ..,
    "change_percent": ..}``); it is empty when the sweep cannot test the claim, and ``measured``
    then says why.
    """

    topic: str
    paper: str
    measured: str
    values: dict[Any, dict[str, float]]


def _relative_percent(value: float, baseline: float) -> float:
    return (value - baseline) / baseline * 100.0 if baseline else math.nan


def _signed(value: float, digits: int = 1, unit: str = "%") -> str:
    if math.isnan(value):
        return "undefined"
    return f"{'+' if value >= 0 else '−'}{abs(value):.{digits}f}{unit}"


def _pair_by_k(cd: pd.DataFrame, other: pd.DataFrame, column: str) -> dict[int, tuple[float, float]]:
    """k -> (CD mean, baseline mean) of ``column`` where both exist (first configuration of each)."""
    cd, other = _values(cd, f"{column}_mean"), _values(other, f"{column}_mean")
    pairs = {}
    for k in sorted(set(cd["shots"]) & set(other["shots"])):
        pairs[int(k)] = (float(cd[cd["shots"] == k].iloc[0][f"{column}_mean"]),
                         float(other[other["shots"] == k].iloc[0][f"{column}_mean"]))
    return pairs


def _cd_rows(table: pd.DataFrame) -> pd.DataFrame:
    return _first_series(_reference_rows(table, "distill"))


def _matching(table: pd.DataFrame, method: str, cd: pd.DataFrame, same_peft: bool = False) -> pd.DataFrame:
    """Baseline rows on the CD student's model (same task), same PEFT when available."""
    rows = table[table["method"] == method]
    if cd.empty or rows.empty:
        return rows.iloc[0:0]
    first = cd.iloc[0]
    rows = rows[(rows["model"].astype(str) == str(first["student"])) & (rows["task"].astype(str) == str(first["task"]))]
    if same_peft and not _missing(first["peft"]):
        same = rows[rows["peft"].astype(str) == str(first["peft"])]
        rows = same if not same.empty else rows
    return _first_series(rows)


def _cd_note(cd: pd.DataFrame) -> str:
    first = cd.iloc[0]
    note = f"CD = {first['models']}"
    if not _missing(first["alpha"]):
        note += f", α={_fmt_alpha(first['alpha'])}"
    if not _missing(first["peft"]):
        note += f", {first['peft']}"
    return note


def _comparison_claim(topic: str, paper: str, table: pd.DataFrame, baseline: str, column: str,
                      unit: str, digits: int, lower_is_better: bool = False) -> Claim:
    cd = _cd_rows(table)
    base = _matching(table, baseline, cd, same_peft=baseline == "pbft")
    name = METHOD_LABELS[baseline]
    if cd.empty or base.empty:
        missing = "CD" if cd.empty else f"{name} on the CD student's model"
        return Claim(topic, paper, f"Not measurable: the sweep has no {missing} results.", {})
    pairs = _pair_by_k(cd, base, column)
    if not pairs:
        return Claim(topic, paper, f"Not measurable: CD and {name} share no k with {column} results.", {})
    values = {k: {"cd": a, "baseline": b, "change_percent": _relative_percent(a, b)} for k, (a, b) in pairs.items()}
    accuracy = "accuracy" in column
    parts = [f"k={k}: {v['cd']:.{digits}f} vs {v['baseline']:.{digits}f}{unit} ({_signed(v['change_percent'])}"
             + (", both within 0.05 of chance or below" if accuracy and max(v["cd"], v["baseline"]) < CHANCE + 0.05
                else "") + ")"
             for k, v in values.items()]
    changes = [v["change_percent"] for v in values.values() if not math.isnan(v["change_percent"])]
    summary = ""
    if len(changes) > 1 and _signed(min(changes)) != _signed(max(changes)):
        extreme = min(changes) if lower_is_better else max(changes)
        summary = (f"; range {_signed(min(changes))} to {_signed(max(changes))}, "
                   f"most favourable to CD {_signed(extreme)}")
    base_first = base.iloc[0]
    base_note = f"{name} = {base_first['models']}"
    if not _missing(base_first["peft"]):
        base_note += f", {base_first['peft']}"
    text = f"CD vs {name}, " + "; ".join(parts) + f"{summary} ({_cd_note(cd)}; {base_note})."
    return Claim(topic, paper, text, values)


def headline_claims(table: pd.DataFrame) -> list[Claim]:
    """The paper's headline claims (PROTOCOL.md) checked against the comparison table.

    Relative changes are ``(CD - baseline) / baseline * 100`` of the seed means, per k. CD is the
    configuration whose alpha is nearest :data:`REFERENCE_ALPHA`; baselines run on the CD student's
    model (PBFT with the same PEFT where the sweep has it).
    """
    claims = [
        _comparison_claim("CD vs ICL at the student's size: OOD accuracy",
                          "CD gives nearly 50% better out-of-domain accuracy than ICL on a model of similar size",
                          table, "icl-student", "ood_accuracy", "", 3),
        _comparison_claim("CD vs PBFT: peak memory",
                          "CD needs up to 60% less peak memory than PBFT",
                          table, "pbft", "peak_memory_mb", " MB", 0, lower_is_better=True),
        _comparison_claim("CD vs PBFT: OOD accuracy",
                          "CD gives 20% better out-of-domain accuracy than PBFT",
                          table, "pbft", "ood_accuracy", "", 3),
    ]

    topic, paper = "CD memory across k", "CD's memory stays nearly constant as the number of demonstrations grows"
    cd = _cd_rows(table)
    growth = _growth(cd, "peak_memory_mb") if not cd.empty else None
    if growth is None or math.isnan(growth[0]):
        claims.append(Claim(topic, paper, "Not measurable: CD ran at fewer than two k with peak memory recorded.", {}))
    else:
        ratio, k_min, k_max = growth
        values = {"cd": {"ratio": ratio, "k_min": k_min, "k_max": k_max}}
        text = f"CD peak memory at k={k_max} / at k={k_min}: ×{ratio:.2f} ({_cd_note(cd)})"
        teacher = _first_series(_reference_rows(table, "icl-teacher"))
        teacher_growth = _growth(teacher, "peak_memory_mb") if not teacher.empty else None
        if teacher_growth and not math.isnan(teacher_growth[0]):
            values["icl-teacher"] = {"ratio": teacher_growth[0], "k_min": teacher_growth[1], "k_max": teacher_growth[2]}
            text += (f"; for contrast, ICL teacher scoring peak at k={teacher_growth[2]} / k={teacher_growth[1]}: "
                     f"×{teacher_growth[0]:.2f}")
        claims.append(Claim(topic, paper, text + ".", values))

    topic = "Inference cost: CD student vs ICL teacher"
    paper = "no number given; answering without the k demonstrations is what the method is for"
    teacher = _first_series(_reference_rows(table, "icl-teacher"))
    if cd.empty or teacher.empty:
        claims.append(Claim(topic, paper, "Not measurable: the sweep needs both CD and ICL-teacher results.", {}))
    else:
        latency = _pair_by_k(cd, teacher, "inference_latency_ms")
        memory = _pair_by_k(cd, teacher, "inference_peak_memory_mb")
        values, parts = {}, []
        for k in sorted(set(latency) | set(memory)):
            entry, bits = {}, []
            if k in latency:
                (a, b) = latency[k]
                entry.update(cd_latency_ms=a, teacher_latency_ms=b, latency_change_percent=_relative_percent(a, b))
                bits.append(f"{a:.2f} vs {b:.2f} ms/query ({_signed(entry['latency_change_percent'])})")
            if k in memory:
                (a, b) = memory[k]
                entry.update(cd_memory_mb=a, teacher_memory_mb=b, memory_change_percent=_relative_percent(a, b))
                bits.append(f"{a:.0f} vs {b:.0f} MB ({_signed(entry['memory_change_percent'])})")
            values[k] = entry
            parts.append(f"k={k}: " + ", ".join(bits))
        text = ("CD student vs ICL teacher at inference, " + "; ".join(parts) + "." if parts
                else "Not measurable: no k has inference cost for both CD and the ICL teacher.")
        claims.append(Claim(topic, paper, text, values))
    return claims


# ---------------------------------------------------------------------------------------------
# The report: one list of blocks, rendered to markdown and to HTML


def _header_lines(df: pd.DataFrame, runs: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    def names(values: Iterable[Any], key: Any = str) -> str:
        found = sorted({v for v in values if not _missing(v)}, key=key)
        return ", ".join(str(v) for v in found) if found else "—"

    methods = sorted({m for m in df["method"] if not _missing(m)}, key=_method_rank)
    lines = [
        "Methods: " + "; ".join(f"{METHOD_LABELS.get(m, m)} ({m})" for m in methods),
        f"Models: teacher {names(df['teacher'])}; student {names(df['student'])}",
        f"Tasks: {names(df['task'])}; in-domain evaluation: {names(runs['id_eval'])}; "
        f"out-of-domain: {names(runs['ood_eval'])}",
        f"Demonstrations k: {names((int(k) for k in df['shots'] if not _missing(k)), int)}",
        f"Seeds: {names((int(s) for s in df['seed'] if not _missing(s)), int)}",
    ]
    alphas = sorted({float(a) for a in df.loc[df["method"] == "distill", "alpha"] if not _missing(a)})
    if alphas:
        lines.append("CD α: " + ", ".join(f"{a:g}" for a in alphas))
    pefts = names(df["peft"])
    if pefts != "—":
        lines.append(f"Parameter-efficient training: {pefts}")
    counts = runs["status"].value_counts()
    failed = runs[runs["status"].isin(_FAILED)]
    order = ["complete", "partial", "failed", "skipped"]
    states = sorted(counts.index, key=lambda s: (order.index(s) if s in order else len(order), s))
    text = f"Runs (cell × seed): {len(runs)}: " + ", ".join(f"{counts[s]} {_STATUS_WORDS.get(s, s)}" for s in states)
    if "failed" not in counts:
        text += ", 0 failed"
    if len(failed):
        listed = ", ".join(f"{r.cell}" + ("" if f"seed={r.seed}" in str(r.cell) else f" seed {r.seed}")
                           + (" (partly)" if r.status == "partial" else "") for r in failed.head(10).itertuples())
        text += f". Failed: {listed}{', …' if len(failed) > 10 else ''}"
    if len(runs) > counts.get("complete", 0):
        text += ". Only completed evaluations enter the means."
    lines.append(text)
    done = df[df["status"].astype(str) == "complete"]
    if len(done):
        sizes = []
        for name, rows in done.groupby(done["eval"].astype(str), sort=True):
            n = pd.to_numeric(rows["n"], errors="coerce").dropna()
            dropped = int(pd.to_numeric(rows["dropped"], errors="coerce").fillna(0).sum())
            if len(n):
                span = f"{int(n.min())}" if n.min() == n.max() else f"{int(n.min())}–{int(n.max())}"
                sizes.append(f"{name} {span}" + (f" ({dropped} dropped as too long, over all runs)" if dropped else ""))
        if sizes:
            lines.append("Queries scored per run: " + ", ".join(sizes))
    return lines


def _blocks(df: pd.DataFrame, figures: Sequence[FigureResult], title: str) -> list[tuple[str, Any]]:
    runs = in_domain_and_ood(df)
    table = _table_from_runs(runs)
    blocks: list[tuple[str, Any]] = [("h1", title), ("h2", "What ran"), ("ul", _header_lines(df, runs, table))]
    blocks.append(("h2", "Results"))
    if table.empty:
        blocks.append(("p", "No results to tabulate."))
    else:
        blocks.append(("table", _table_view(table)))
        blocks.append(("p", "One row per configuration; accuracy is mean ± std over the seeds that completed; "
                            "costs are means. Peak memory is the training peak for PBFT and CD and the scoring peak "
                            "for ICL; "
                            "inference latency and memory are the cost of answering one query (ICL with its k "
                            "demonstrations, a trained student alone)."))
    blocks.append(("h2", "Figures"))
    for figure in figures:
        blocks.append(("h3", figure.title))
        if figure.path is not None:
            blocks.append(("figure", figure))
        else:
            blocks.append(("p", f"Not drawn: {figure.reason or 'no data'}."))
    blocks.append(("h2", "Headline claims of the paper, as measured here"))
    blocks.append(("p", "Each line quotes the paper (arXiv 2412.13243) and gives what this sweep measured; relative "
                        "changes are (CD − baseline) / baseline of the seed means."))
    blocks.append(("ul", [f"**{c.topic}** (paper: {c.paper}). Measured: {c.measured}" for c in headline_claims(table)]))
    blocks.append(("h2", "Reading this report"))
    blocks.append(("p", READING_NOTES))
    return blocks


def render_markdown(df: pd.DataFrame, figures: Sequence[FigureResult] = (), *, title: str = DEFAULT_TITLE) -> str:
    """``report.md``: header, comparison table, figures (linked by file name), claims, reading notes.

    Figure links are relative to the directory the figures were written to, where ``report.md``
    goes too.
    """
    out: list[str] = []
    for kind, content in _blocks(df, figures, title):
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + content)
        elif kind == "p":
            out.append(content)
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in content))
        elif kind == "table":
            out.append(markdown_table(*content))
        elif kind == "figure":
            out.append(f"![{content.title}]({content.path.name})\n\n*{content.caption}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.5; }
h1, h2, h3 { line-height: 1.25; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: .3em .6em; white-space: nowrap; }
th { background: #f3f3f3; } td.r, th.r { text-align: right; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-style: italic; color: #444; } .missing { color: #777; font-style: italic; }
"""


def _inline_html(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def render_html(df: pd.DataFrame, figures: Sequence[FigureResult] = (), *, title: str = DEFAULT_TITLE) -> str:
    """``report.html``: the same content as :func:`render_markdown`, self-contained (inline CSS, PNGs as data URIs)."""
    body: list[str] = []
    for kind, content in _blocks(df, figures, title):
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            css = ' class="missing"' if content.startswith("Not drawn:") else ""
            body.append(f"<p{css}>{_inline_html(content)}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in content) + "</ul>")
        elif kind == "table":
            headers, rows, align = content
            cls = [' class="r"' if a == "r" else "" for a in align]
            head = "".join(f"<th{c}>{html.escape(h)}</th>" for h, c in zip(headers, cls))
            cells = "".join("<tr>" + "".join(f"<td{c}>{html.escape(v)}</td>" for v, c in zip(row, cls)) + "</tr>"
                            for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "figure":
            data = base64.b64encode(Path(content.path).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(content.title)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(content.caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Collect a sweep's results and write ``report.md``, ``report.html`` and the PNGs.

    Args:
        sweep_dir: the sweep's output directory (what :func:`icldistill.experiments.collect` reads).
        out_dir: where to write; default ``<sweep_dir>/report``.

    Returns:
        ``{"markdown": Path, "html": Path, "figures": {name: Path}, "skipped": {name: reason}}``.

    Raises:
        IcldError: the sweep directory holds no results.
    """
    from . import experiments

    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    df = experiments.collect(sweep_dir)
    if df is None or len(df) == 0:
        raise IcldError(f"No results found under {sweep_dir}; run the sweep first, or point to its output directory.")
    subcases = experiments.collect_subcases(sweep_dir)
    table = comparison_table(df)
    figures = make_figures(table, subcases, out_dir)
    title = f"{DEFAULT_TITLE}: {sweep_dir.resolve().name}"
    markdown_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(markdown_path, render_markdown(df, figures, title=title))
    atomic_write_text(html_path, render_html(df, figures, title=title))
    logger.info("wrote %s and %s", markdown_path, html_path)
    return {
        "markdown": markdown_path,
        "html": html_path,
        "figures": {f.name: f.path for f in figures if f.path is not None},
        "skipped": {f.name: f.reason for f in figures if f.path is None},
    }
