"""Figures of a sweep report, drawn from the comparison table (:mod:`icldistill.report.tables`) as PNG files.

Accuracy and peak memory against k, in-domain vs OOD accuracy, CD accuracy against alpha and HANS
accuracy by subcase; a figure the sweep cannot support is not drawn, and
:func:`figure_unsupported_reason` says why.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icldistill.report.tables import (
    CHANCE,
    METHOD_LABELS,
    REFERENCE_ALPHA,
    SERIES_COLUMNS,
    SUBCASE_COLUMNS,
    _first_series,
    _fmt_alpha,
    _growth,
    _joined,
    _method_rank,
    _missing,
    _reference_rows,
    _require_columns,
    _short_model,
    _sort_number,
    _values,
    _varies,
)
from icldistill.runtime.records import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "FigureResult",
    "figure_unsupported_reason",
    "plot_accuracy_vs_k",
    "plot_memory_vs_k",
    "plot_id_vs_ood",
    "plot_alpha_curve",
    "plot_hans_heatmap",
    "plot_confusions",
    "make_figures",
]

METHOD_COLORS = {"icl-teacher": "#1f77b4", "icl-student": "#ff7f0e", "pbft": "#2ca02c", "distill": "#d62728"}
_EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")

DPI = 150

FIGURES = {
    "accuracy_vs_k": "Accuracy vs number of demonstrations k",
    "memory_vs_k": "Peak memory vs number of demonstrations k",
    "id_vs_ood": "In-domain vs out-of-domain accuracy",
    "alpha_curve": "CD accuracy vs loss weight alpha",
    "hans_heatmap": "HANS accuracy by subcase",
    "confusion": "Confusion matrix per method (tasks with more than two classes)",
}


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
    if name == "confusion":
        if data is None or data.empty:
            return "the sweep recorded no confusion matrices"
        if max(data.groupby("eval")["gold"].nunique(), default=0) <= 2:
            return "every evaluation set has two classes; the accuracy tables say it all"
        return None
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
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


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


def _chance_levels(table: pd.DataFrame | None) -> list[tuple[float, str]]:
    """Chance (1 / number of classes) of each task in the table; 0.5 when a task cannot be resolved."""
    from icldistill.errors import IcldError
    from icldistill.tasks.registry import family_of, get_task

    levels: dict[float, list[str]] = {}
    tasks = [] if table is None or "task" not in table else sorted({str(t) for t in table["task"] if not _missing(t)})
    for name in tasks:
        try:
            chance = 1.0 / len(family_of(get_task(name)).classes)
        except IcldError:
            chance = CHANCE
        levels.setdefault(round(chance, 4), []).append(Path(name).stem)
    if not levels:
        return [(CHANCE, "")]
    return [(value, ", ".join(names) if len(levels) > 1 else "") for value, names in sorted(levels.items())]


def _chance_line(ax: Any, axis: str = "y", table: pd.DataFrame | None = None) -> None:
    style = {"color": "0.45", "linestyle": ":", "linewidth": 1.2, "zorder": 0}
    for value, names in _chance_levels(table):
        label = f"chance ({value:.3g}{', ' + names if names else ''})"
        if axis == "y":
            ax.axhline(value, label=label, **style)
        else:
            ax.axvline(value, **style)


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
        _plot_series_vs_k(ax, series, column)
        _chance_line(ax, table=table)
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


def _plot_series_vs_k(ax: Any, series: list, column: str) -> None:
    """One line per series: the mean of ``column`` against k, with the std over seeds as error bars."""
    for index, line in enumerate(series):
        rows = _values(line.rows, f"{column}_mean")
        if rows.empty:
            continue
        x = _dodge(rows["shots"].to_numpy(dtype=float), index, len(series))
        ax.errorbar(x, rows[f"{column}_mean"], yerr=rows[f"{column}_std"].fillna(0.0), label=line.label,
                    color=line.color, linestyle=line.linestyle, marker=line.marker, markersize=5, capsize=3,
                    linewidth=1.6)


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
        _plot_series_vs_k(ax, series, column)
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
        _chance_line(ax, table=distill)
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
    :func:`icldistill.experiments.results.collect_subcases`'s frame. Returns None without subcase results.
    """
    reason = figure_unsupported_reason("hans_heatmap", subcases)
    if reason:
        logger.info("HANS heatmap not drawn: %s", reason)
        return None
    _require_columns(subcases, SUBCASE_COLUMNS, "results.collect_subcases()")
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


def plot_confusions(confusions: pd.DataFrame | None, path: str | Path) -> Path | None:
    """One confusion matrix per method (rows gold, columns predicted, each row normalised to 1), for C > 2.

    Counts are summed over seeds; each method shows its largest k (and, for CD, its first α) on the
    first evaluation set that has more than two classes.
    """
    reason = figure_unsupported_reason("confusion", confusions)
    if reason:
        logger.info("confusion matrices not drawn: %s", reason)
        return None
    data = confusions[confusions["count"].notna()]
    classes_per_set = data.groupby("eval")["gold"].unique()
    eval_name = next(name for name, gold in classes_per_set.items() if len(gold) > 2)
    data = data[data["eval"] == eval_name]
    order = list(dict.fromkeys(data["gold"]))
    panels = []
    for method in sorted(data["method"].unique(), key=_method_rank):
        part = data[data["method"] == method]
        shots = max(int(k) for k in part["shots"])
        part = part[part["shots"] == shots]
        alphas = sorted({_sort_number(a) for a in part["alpha"]})
        if len(alphas) > 1:
            part = part[[_sort_number(a) == alphas[0] for a in part["alpha"]]]
        counts = part.groupby(["gold", "predicted"])["count"].sum()
        matrix = np.array([[counts.get((g, p), 0.0) for p in order] for g in order], dtype=float)
        label = f"{METHOD_LABELS.get(method, method)} ({_short_model(part['model'].iloc[0])}), k={shots}"
        if method == "distill" and not _missing(part["alpha"].iloc[0]):
            label += f", α={_fmt_alpha(part['alpha'].iloc[0])}"
        panels.append((label, matrix))
    size = 2.2 + 0.45 * len(order)
    figure = _new_figure(size * len(panels) + 0.8, size + 1.2)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, matrix) in zip(axes, panels):
        totals = matrix.sum(axis=1, keepdims=True)
        rates = np.divide(matrix, totals, out=np.full_like(matrix, np.nan), where=totals > 0)
        image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
        if len(order) <= 12:
            for i in range(len(order)):
                for j in range(len(order)):
                    if not np.isnan(rates[i, j]):
                        ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if rates[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels(order, fontsize=8)
        ax.set_xlabel("predicted")
        accuracy = np.trace(matrix) / matrix.sum() if matrix.sum() else float("nan")
        ax.set_title(f"{label}\naccuracy {accuracy:.2f}", fontsize=9)
    axes[0].set_ylabel("gold")
    figure.colorbar(image, ax=list(axes), shrink=0.8).set_label("share of the gold class's rows")
    figure.suptitle(f"Confusion matrices on {eval_name} (rows: gold class, summed over seeds)", fontsize=12)
    return _save(figure, path)


_PLOTTERS = {
    "accuracy_vs_k": plot_accuracy_vs_k,
    "memory_vs_k": plot_memory_vs_k,
    "id_vs_ood": plot_id_vs_ood,
    "alpha_curve": plot_alpha_curve,
    "hans_heatmap": plot_hans_heatmap,
    "confusion": plot_confusions,
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
    "confusion": "Each row is a gold class, normalised to 1: the diagonal is per-class accuracy, and a "
                 "column that is dark everywhere is a class the model answers for everything.",
}


def make_figures(table: pd.DataFrame, subcases: pd.DataFrame | None, out_dir: str | Path,
                 confusions: pd.DataFrame | None = None) -> list[FigureResult]:
    """Draw every figure into ``out_dir`` (``<name>.png``); unsupported ones carry their reason."""
    out_dir = Path(out_dir)
    results = []
    for name, plot in _PLOTTERS.items():
        data = subcases if name == "hans_heatmap" else confusions if name == "confusion" else table
        reason = figure_unsupported_reason(name, data)
        path = None if reason else plot(data, out_dir / f"{name}.png")
        results.append(FigureResult(name, FIGURES[name], path, _CAPTIONS[name], reason))
    return results
