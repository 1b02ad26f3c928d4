"""Text for the terminal and for table cells: one number format, one missing-value mark, aligned tables.

``cli`` prints what these functions return (it is the only module that prints); the markdown tables of
the reports format their cells with the same :func:`fmt`, so a value reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MISSING = "-"  # the mark of a value that was not measured (or could not be), in every table of the project

# The per-evaluation-set columns of a run's table: (header, aggregate key, digits).
_RUN_COLUMNS = (
    ("n", "n", 0), ("dropped", "dropped", 0), ("accuracy", "accuracy", 3), ("majority", "majority_rate", 3),
    ("calibrated", "calibrated_accuracy", 3), ("auc", "auc", 3), ("full_vocab", "accuracy_full_vocab", 3),
    ("non_label", "non_label_rate", 3), ("ood(HANS-LO)", "ood_accuracy", 3),
)
_ONLY_WHERE_PRESENT = frozenset({"ood_accuracy"})  # a HANS column only where a HANS set was evaluated


def is_missing(value: Any) -> bool:
    """None, NaN (Python, numpy or pandas) and pandas' NA count as missing."""
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN and NA are the values not equal to themselves
    except (TypeError, ValueError):
        return False


def fmt(value: Any, digits: int | None = None) -> str:
    """A value for a table cell.

    Missing -> ``MISSING``; a statistic over seeds (a mapping with ``mean``, ``std``, ``n_seeds``) -> its
    mean, with ``±std`` when several seeds made it; a float -> ``digits`` decimals with thousands separators,
    or, without ``digits``, 0 decimals from 100 up, 1 from 10 up and 4 significant digits below (so that a
    learning rate of 1e-05 keeps its value); anything else -> ``str``.
    """
    if is_missing(value):
        return MISSING
    if isinstance(value, Mapping):
        mean, std = value.get("mean"), value.get("std")
        if is_missing(mean):
            return MISSING
        text = fmt(mean, 3 if digits is None else digits)
        if value.get("n_seeds", 1) > 1 and not is_missing(std):
            text += f"±{fmt(std, 3 if digits is None else digits)}"
        return text
    if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, int) and digits is None:
        return str(value)
    value = float(value)
    if digits is None:
        if abs(value) >= 100:
            digits = 0
        elif abs(value) >= 10:
            digits = 1
        else:
            return f"{value:.4g}"
    return f"{value:,.{digits}f}"


def format_table(rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_table(record: Mapping[str, Any]) -> str:
    """A run's per-evaluation-set table of the aggregated metrics (mean±std over seeds)."""
    aggregates = record.get("aggregate", {})
    columns = [c for c in _RUN_COLUMNS if c[1] not in _ONLY_WHERE_PRESENT
               or any(not is_missing(agg.get(c[1])) for agg in aggregates.values())]
    rows: list[list[str]] = [["eval", *(header for header, _, _ in columns)]]
    for name, agg in aggregates.items():
        rows.append([name, *(fmt(agg.get(key), digits) for _, key, digits in columns)])
    return format_table(rows)


def run_summary(record: Mapping[str, Any], out: str | Path) -> list[str]:
    """The lines printed after a run: skipped seeds, the results table, time and memory, where the record is."""
    lines = [f"seed {seed} skipped: {e['skipped']}" for seed, e in record.get("seeds", {}).items() if "skipped" in e]
    if record.get("aggregate"):
        lines.append(results_table(record))
    total = record.get("resources", {}).get("total", {})
    lines.append(f"wall time {total.get('wall_time_s', 0):.1f} s, peak memory {total.get('peak_memory_mb', 0):.0f} MB "
                 f"({total.get('memory_kind', '')})")
    lines.append(f"results: {Path(out) / 'results.json'}")
    return lines


def duration(seconds: float | None) -> str:
    """A short duration for progress lines: 42s, 3m05s, 2h07m; '?' when unknown."""
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def short(value: Any) -> str:
    """A hyperparameter value in a progress line: 4 significant digits for floats."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
