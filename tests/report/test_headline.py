"""The report's first screen (report/headline): CD against the zero-shot and the ICL student, with paired intervals."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from icldistill.experiments.compare import config_key
from icldistill.report.headline import headline_lines, verdict, zero_shot_paired
from icldistill.report.render import render_markdown
from icldistill.report.tables import RESULT_COLUMNS, comparison_table

TEACHER, STUDENT, K = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", 16
# (cell, method, model, k, accuracy)
CELLS = [("zero", "icl-student", STUDENT, 0, 0.47), ("icl", "icl-student", STUDENT, K, 0.60),
         ("teacher", "icl-teacher", TEACHER, K, 0.86), ("cd", "distill", STUDENT, K, 0.72)]


def _runs(cells=CELLS, seeds=(0,)) -> pd.DataFrame:
    """A collect()-shaped frame: one row per (cell, seed) on MNLI-m."""
    rows = []
    for cell, method, model, k, accuracy in cells:
        for seed in seeds if k else (0,):
            row = dict.fromkeys(RESULT_COLUMNS, math.nan)
            row["labelled_examples"] = {"distill": 64, "icl-teacher": 16}.get(method, 16 if k else 0)
            row.update(cell=cell, method=method, model=model, teacher=TEACHER, student=STUDENT, task="mnli", shots=k,
                       seed=seed, alpha=0.5 if method == "distill" else math.nan,
                       peft="lora" if method == "distill" else None, pattern="gpt3", eval="mnli-m", n=10, dropped=0,
                       accuracy=accuracy, status="complete")
            rows.append(row)
    return pd.DataFrame(rows, columns=[*RESULT_COLUMNS, "labelled_examples"])


def _paired(table: pd.DataFrame, zero: tuple[float, float], icl: tuple[float, float]) -> pd.DataFrame:
    """sweep_paired()-shaped rows: CD against the zero-shot and the ICL student, with the given intervals."""
    cd = table[table["method"] == "distill"].iloc[0].to_dict()
    rows = []
    for (low, high), k in ((zero, 0), (icl, K)):
        base = table[(table["method"] == "icl-student") & (table["shots"] == k)].iloc[0].to_dict()
        rows.append({"cd_key": config_key(cd), "baseline_key": config_key(base), "eval": "mnli-m",
                     "metric": "accuracy", "difference": (low + high) / 2, "ci95_low": low, "ci95_high": high,
                     "queries": 100, "n_seeds": 1, "a_only": 0, "b_only": 0, "mcnemar_p": 1.0, "sentence": "-"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("low", "high", "words"), [(0.1, 0.3, "excludes 0: **CD is better"),
                                                      (-0.3, -0.1, "excludes 0: **CD is worse"),
                                                      (-0.1, 0.2, "covers 0: **this run cannot tell")])
def test_verdict_says_whether_the_interval_excludes_zero(low, high, words):
    assert words in verdict({"ci95_low": low, "ci95_high": high}, "zero-shot student")


def test_the_first_screen_names_each_difference_its_interval_and_verdict():
    runs = _runs()
    table = comparison_table(runs)
    lines = headline_lines(table, _paired(table, zero=(0.15, 0.35), icl=(-0.02, 0.26)))
    zero, icl = lines[0], lines[1]
    assert "zero-shot student" in zero and "0.720 vs 0.470" in zero and "+0.250 [95% CI +0.150, +0.350" in zero
    assert "excludes 0: **CD is better than the zero-shot student" in zero
    assert "(labelled examples 64 vs 0)" in zero  # CD's gold CE labels are part of what it was given
    assert "ICL student (same 16 demonstrations)" in icl and "0.720 vs 0.600" in icl and "covers 0" in icl
    assert any("0.860" in line and "teacher" in line for line in lines)
    markdown = render_markdown(runs, [], paired=_paired(table, zero=(0.15, 0.35), icl=(-0.02, 0.26)))
    assert markdown.index("## What was found") < markdown.index("## What ran") < markdown.index("## Results")
    assert "CD is better than the zero-shot student" in markdown.split("## What ran")[0]


def test_missing_runs_are_said_not_guessed():
    no_zero = comparison_table(_runs([c for c in CELLS if c[0] != "zero"]))
    lines = headline_lines(no_zero, None)
    assert "zero-shot student: not measurable" in lines[0] and "no paired interval" in lines[1]
    no_cd = comparison_table(_runs([c for c in CELLS if c[0] != "cd"]))
    assert headline_lines(no_cd, None)[0].startswith("No context-distillation (CD) run completed")


def _write(path, seed: int, correct: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for i, ok in enumerate(correct):
            gold = i % 2
            f.write(json.dumps({"seed": seed, "eval": "mnli-m", "id": f"q{i}", "gold": gold,
                                "pred": gold if ok else 1 - gold}) + "\n")


def test_zero_shot_pairing_stands_the_seed_free_run_beside_every_cd_seed(tmp_path):
    n = 40
    cd_right = np.ones(n, dtype=bool)
    cd_right[:4] = False  # 0.9
    zero_right = np.arange(n) < 12  # 0.3; the first 4 are right where CD is wrong
    for seed in (0, 1):
        _write(tmp_path / "cells" / f"cd-s{seed}" / "predictions.jsonl", seed, cd_right)
    _write(tmp_path / "cells" / "zero" / "predictions.jsonl", 0, zero_right)
    runs = _runs([("zero", "icl-student", STUDENT, 0, 0.3), ("cd", "distill", STUDENT, K, 0.9)], seeds=(0, 1))
    runs.loc[runs["method"] == "distill", "cell"] = ["cd-s0", "cd-s1"]
    paired = zero_shot_paired(tmp_path, runs, resamples=500)
    assert len(paired) == 1
    hit = paired.iloc[0]
    assert hit["n_seeds"] == 2 and hit["queries"] == n  # both CD seeds, paired with the one zero-shot run
    assert hit["difference"] == pytest.approx(0.9 - 0.3)
    assert 0 < hit["ci95_low"] < 0.6 < hit["ci95_high"]
    assert (hit["a_only"], hit["b_only"]) == (2 * 28, 2 * 4)  # CD alone right on q12..q39, zero-shot alone on q0..q3
    assert hit["baseline_key"] == config_key(runs[runs["method"] == "icl-student"].iloc[0].to_dict())
    # a sweep without a zero-shot student gets no rows (and the headline then says so)
    assert zero_shot_paired(tmp_path, runs[runs["method"] == "distill"]).empty
