"""The tuning report of an ``icld tune`` study: best parameters, trial history, parameter importances,
and the best configuration beside the untuned defaults on the evaluation sets (same seeds).

Reads what :mod:`icldistill.experiments.tune` left in the study directory (``tune.json``, the
Optuna storage, ``final.json`` and the ``best`` / ``defaults`` runs) and writes
``report/tuning.md`` with two PNG figures. The dev values are what the study optimised; the
evaluation-set numbers come from the single final evaluation of each configuration.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from icldistill.errors import IcldError
from icldistill.experiments.tune import FINAL_RUNS, PLAN_FILE, load_study, selected_dev_value, trials_table
from icldistill.report.console import fmt as _fmt  # the project's one number format
from icldistill.runtime.records import atomic_write_bytes, atomic_write_text, read_json

logger = logging.getLogger(__name__)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _history_figure(rows: list[dict[str, Any]], maximize: bool, objective: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    by_number = sorted((r for r in rows if r["value"] is not None), key=lambda r: r["trial"])
    for state, marker, color in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:gray")):
        points = [(r["trial"], r["value"]) for r in by_number if r["state"] == state]
        if points:
            label = state + (" (last dev value)" if state == "pruned" else "")
            ax.scatter(*zip(*points), marker=marker, color=color, label=label)
    best, xs, ys = None, [], []
    for r in by_number:
        if r["state"] != "complete":
            continue
        if best is None or (r["value"] > best if maximize else r["value"] < best):
            best = r["value"]
        xs.append(r["trial"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title("Trial history (dev split)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _importances(directory: Path) -> dict[str, float]:
    import optuna

    study = load_study(directory)
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError) as exc:  # too few complete trials, or no parameter varied
        logger.info("no parameter importances: %s", exc)
        return {}


def _eval_accuracies(record: Mapping[str, Any]) -> dict[str, tuple[float | None, float | None, int]]:
    out = {}
    for name, agg in (record.get("aggregate") or {}).items():
        acc = agg.get("accuracy") or {}
        out[name] = (acc.get("mean"), acc.get("std"), acc.get("n_seeds", 1))
    return out


def _dev_values(record: Mapping[str, Any], key: str) -> list[float]:
    values = [selected_dev_value(s, key) for s in (record.get("seeds") or {}).values()]
    return [v for v in values if v is not None]


def write_tuning_report(directory: str | Path, output_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``tuning.md`` and its figures for the study in ``directory``; returns their paths."""
    directory = Path(directory)
    if not (directory / PLAN_FILE).is_file():
        raise IcldError(f"{directory} is not a tuning directory (no {PLAN_FILE}); run `icld tune` first.")
    meta = read_json(directory / PLAN_FILE)
    out = Path(output_dir) if output_dir else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    objective = meta["settings"]["objective"]
    maximize = objective == "dev_accuracy"
    rows = trials_table(directory)
    states = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    lines = [f"# Tuning report: {meta['name']}", "",
             f"Method `{meta['method']}`, objective **{objective}** on the dev split "
             f"({'higher' if maximize else 'lower'} is better), TPE sampler (seed {meta['settings']['seed']}), "
             f"median pruner. Trials: {states['complete']} complete, {states['pruned']} pruned, "
             f"{states['fail']} failed, {states['running']} running. The evaluation sets were not scored during "
             "the search: each trial trained on the first seed and was scored on the dev split only.", "",
             "Search space: " + "; ".join(f"`{d}`" for d in meta["search"]) + ".", ""]
    complete = [r for r in rows if r["state"] == "complete"]
    paths: dict[str, Path] = {}
    if complete:
        best = complete[0]
        lines += ["## Best parameters", "",
                  f"Trial {best['trial']}, {objective} {_fmt(best['value'])} on the dev split.", ""]
        lines += _table(["parameter", "value"], [[k, v] for k, v in best["params"].items()]) + [""]
        figure = out / "trial_history.png"
        atomic_write_bytes(figure, _history_figure(rows, maximize, objective))
        paths["trial_history"] = figure
        lines += ["## Trial history", "", f"![trial history]({figure.name})", ""]
        top = rows[:10]
        lines += _table(["trial", "state", objective, "seconds", *best["params"]],
                        [[r["trial"], r["state"], r["value"], r["duration_s"],
                          *(r["params"].get(k) for k in best["params"])] for r in top]) + [""]
    importances = _importances(directory)
    if importances:
        lines += ["## Parameter importances", "",
                  "Optuna's default evaluator over the complete trials; with few trials these are rough.", ""]
        lines += _table(["parameter", "importance"], [[k, v] for k, v in importances.items()]) + [""]
    final = directory / "final.json"
    if final.is_file() and all((directory / name / "results.json").is_file() for name in FINAL_RUNS):
        summary = read_json(final)
        records = {name: read_json(directory / name / "results.json") for name in FINAL_RUNS}
        key = "dev_accuracy" if maximize else "dev_loss"
        lines += ["## Best configuration against the untuned defaults", "",
                  f"Both re-trained with seeds {summary['seeds']}; each evaluated once on the evaluation sets.", ""]
        dev = {name: _dev_values(records[name], key) for name in FINAL_RUNS}
        rows_dev = [[name, sum(v) / len(v) if v else None, len(v)] for name, v in dev.items()]
        lines += _table(["configuration", f"{objective} on the dev split (mean over seeds)", "seeds"], rows_dev) + [""]
        acc = {name: _eval_accuracies(records[name]) for name in FINAL_RUNS}
        sets = list(dict.fromkeys(s for a in acc.values() for s in a))
        table = []
        for s in sets:
            b, d = acc["best"].get(s, (None, None, 0)), acc["defaults"].get(s, (None, None, 0))
            diff = b[0] - d[0] if b[0] is not None and d[0] is not None else None
            table.append([s, _pm(b), _pm(d), diff])
        lines += _table(["evaluation set", "best: accuracy", "defaults: accuracy", "difference"], table) + [""]
        lines += ["The difference is of means over the same seeds; for a paired interval over queries run "
                  f"`icld compare {directory / 'best'} {directory / 'defaults'}`.", ""]
    else:
        lines += ["## Final evaluation", "", "Not run yet: `icld tune` re-trains the best configuration and the "
                  "defaults when the study is complete (or run it again with `--finish`).", ""]
    markdown = out / "tuning.md"
    atomic_write_text(markdown, "\n".join(lines))
    paths["markdown"] = markdown
    return paths


def _pm(stat: tuple[float | None, float | None, int]) -> str:
    mean, std, n = stat
    if mean is None:
        return "-"
    return f"{mean:.3f}±{std:.3f}" if n > 1 and std is not None else f"{mean:.3f}"
