"""The report's first screen: what the sweep found for context distillation, and how sure it is.

The paper's claims (:func:`icldistill.report.render.headline_claims`) compare CD with baselines at the same
k. A reader first wants one plain answer: did the distilled student (no demonstrations) beat the same student
answering zero-shot, and the same student with the teacher's demonstrations, in domain, by more than the query
sample can explain? :func:`headline_lines` says so from the comparison table and the paired comparisons;
:func:`zero_shot_paired` adds the comparison with the zero-shot student (k = 0), which
:func:`icldistill.experiments.compare.sweep_paired` does not make (it pairs only equal k).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from icldistill.report.tables import METHOD_LABELS, _first_series, _missing, _reference_rows

__all__ = ["headline_lines", "verdict", "zero_shot_paired"]

PREDICTIONS = "predictions.jsonl"  # runtime.rundir's PREDICTIONS_FILE, as experiments.compare reads it


def _prediction_files(cell_dir: Path) -> list[Path]:
    files = [cell_dir / PREDICTIONS] + sorted(cell_dir.glob(f"eval-*/{PREDICTIONS}"))
    return [f for f in files if f.is_file()]


def _zero_shot_rows(done: pd.DataFrame, cd: Mapping[str, Any]) -> pd.DataFrame:
    """The completed zero-shot runs (ICL, k = 0) of the CD student's model on the CD task."""
    return done[(done["method"] == "icl-student") & (done["shots"] == 0)
                & (done["model"].astype(str) == str(cd["student"])) & (done["task"].astype(str) == str(cd["task"]))]


def zero_shot_paired(sweep_dir: str | Path, runs: pd.DataFrame, *, resamples: int | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """Rows shaped like :func:`~icldistill.experiments.compare.sweep_paired`'s: each CD configuration against
    the zero-shot student of its model and task, on every set both scored (accuracy; on HANS also OOD
    accuracy), paired by query and by CD's seeds. Empty where the sweep has no zero-shot student."""
    from icldistill.errors import IcldError
    from icldistill.experiments.compare import (
        REPORT_RESAMPLES,
        compare_predictions,
        config_key,
        read_predictions,
    )

    done = runs[runs["status"] == "complete"] if len(runs) else runs
    out = []
    for cd_key, cd_rows in _by_config(done[done["method"] == "distill"] if len(done) else done, config_key):
        zero = _zero_shot_rows(done, cd_rows[0])
        if zero.empty:
            continue
        base_key = config_key(zero.iloc[0].to_dict())
        cd_files = [f for r in cd_rows for f in _prediction_files(Path(sweep_dir) / "cells" / str(r["cell"]))]
        base_files = [f for c in sorted(set(zero["cell"].astype(str)))
                      for f in _prediction_files(Path(sweep_dir) / "cells" / c)]
        if not cd_files or not base_files:
            continue
        a = read_predictions(sorted(set(cd_files)), source=cd_key)
        b = read_predictions(base_files, source=base_key)
        for name in [n for n in a.eval_sets() if n in b.eval_sets()]:
            b_all = b.standing_for(a.seeds(name))  # its prompts do not depend on the seed
            for metric in ("accuracy", "ood_accuracy") if name.startswith("hans") else ("accuracy",):
                try:
                    r = compare_predictions(a, b_all, name, metric=metric, seed=seed,
                                            resamples=resamples or REPORT_RESAMPLES)
                except IcldError:  # no common seed or query: nothing to pair
                    continue
                out.append([cd_key, base_key, name, metric, r.difference, r.ci95_low, r.ci95_high, r.queries,
                            len(r.seeds), r.a_only, r.b_only, r.mcnemar_p, r.sentence()])
    return pd.DataFrame(out, columns=["cd_key", "baseline_key", "eval", "metric", "difference", "ci95_low",
                                      "ci95_high", "queries", "n_seeds", "a_only", "b_only", "mcnemar_p", "sentence"])


def _by_config(rows: pd.DataFrame, key: Any) -> list[tuple[str, list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows.to_dict(orient="records"):
        groups.setdefault(key(row), []).append(row)
    return list(groups.items())


def verdict(hit: Mapping[str, Any], baseline: str) -> str:
    """Whether a paired 95% interval excludes 0, in words a reader acts on."""
    low, high = float(hit["ci95_low"]), float(hit["ci95_high"])
    if low > 0:
        return f"the interval excludes 0: **CD is better than the {baseline}** on these queries"
    if high < 0:
        return f"the interval excludes 0: **CD is worse than the {baseline}** on these queries"
    return f"the interval covers 0: **this run cannot tell CD from the {baseline}**"


def _difference(hit: Mapping[str, Any]) -> str:
    seeds = int(hit["n_seeds"])
    return (f"{float(hit['difference']):+.3f} [95% CI {float(hit['ci95_low']):+.3f}, {float(hit['ci95_high']):+.3f}; "
            f"paired over {int(hit['queries'])} queries x {seeds} seed{'s' * (seeds != 1)}]")


def _one_line(cd: pd.Series, base: pd.DataFrame, paired: pd.DataFrame | None, what: str) -> str:
    """'CD vs <what>, in domain (<set>): a vs b, difference ... : verdict.' for one baseline row (or why not)."""
    from icldistill.experiments.compare import paired_lookup

    k = int(cd["shots"])
    if base.empty:
        return f"CD (k={k}) vs the {what}: not measurable, the sweep has no such run."
    row = base.iloc[0]
    eval_set = None if _missing(cd["id_eval"]) else str(cd["id_eval"])
    text = (f"**CD student vs {what}**, in domain ({eval_set or 'in-domain set'}), k={k}: "
            f"{float(cd['id_accuracy_mean']):.3f} vs {float(row['id_accuracy_mean']):.3f}")
    text += f" (labelled examples {_labels(cd)} vs {_labels(row)})"
    hit = paired_lookup(paired, cd.to_dict(), row.to_dict(), eval_set, "accuracy")
    if hit is None:
        return text + "; no paired interval (the runs share no per-query predictions)."
    return text + f", difference {_difference(hit)}: {verdict(hit, what)}."


def _labels(row: pd.Series) -> str:
    """A run's label budget (CD with gold CE also uses its training queries' labels), '?' where not recorded."""
    value = row.get("labelled_examples_mean")
    return "?" if _missing(value) else f"{float(value):.0f}"


def _rows_at(table: pd.DataFrame, cd: pd.Series, method: str, k: int) -> pd.DataFrame:
    """The rows of ``method`` at k on the CD row's task, on its teacher's model (ICL teacher) or its student's."""
    model = cd["teacher"] if method == "icl-teacher" else cd["student"]
    rows = table[(table["method"] == method) & (table["shots"] == k) & (table["task"] == cd["task"])
                 & (table["model"].astype(str) == str(model))]
    return _first_series(rows[rows["id_accuracy_mean"].notna()])


def headline_lines(table: pd.DataFrame, paired: pd.DataFrame | None) -> list[str]:
    """The first screen of the report: CD against the zero-shot and the ICL student in domain, each with its
    paired 95% interval and whether it excludes 0, the teacher for reference, and what the interval covers."""
    cd_all = _first_series(_reference_rows(table, "distill"))
    cd_all = cd_all[cd_all["id_accuracy_mean"].notna()] if len(cd_all) else cd_all
    if cd_all.empty:
        return ["No context-distillation (CD) run completed: there is no finding to report; the table below "
                "holds what ran."]
    lines = []
    for _, cd in cd_all.iterrows():
        k = int(cd["shots"])
        lines.append(_one_line(cd, _rows_at(table, cd, "icl-student", 0), paired, "zero-shot student"))
        lines.append(_one_line(cd, _rows_at(table, cd, "icl-student", k), paired,
                               f"ICL student (same {k} demonstrations)"))
        teacher = _rows_at(table, cd, "icl-teacher", k)
        if not teacher.empty:
            lines.append(f"For reference, the teacher with its {k} demonstrations (what CD distils): "
                         f"{float(teacher.iloc[0]['id_accuracy_mean']):.3f} ({METHOD_LABELS['icl-teacher']}, "
                         f"{teacher.iloc[0]['models']}).")
    lines.append("How sure: each interval is a paired bootstrap over the queries both runs scored and over the "
                 "seeds (paired by seed); it measures how much the choice of queries moves the difference. With "
                 "one seed it says nothing about another draw of demonstrations and training queries.")
    return lines
