"""Paired comparison: exact McNemar, paired bootstrap and the pairing of two runs' predictions,
against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from icldistill.errors import IcldError
from icldistill.experiments.compare import compare_runs, mcnemar_exact, paired_bootstrap


@pytest.mark.parametrize("a_only,b_only,expected", [
    (1, 5, 2 * (1 + 6) / 64),            # n=6: 2 * (C(6,0) + C(6,1)) / 2^6 = 0.21875
    (0, 6, 2 / 64),                      # 0.03125
    (2, 8, 2 * (1 + 10 + 45) / 1024),    # 0.109375 (statsmodels' mcnemar(exact=True) gives the same)
    (3, 3, 1.0),                         # symmetric split: capped at 1
    (0, 0, 1.0),                         # no discordant query
])
def test_mcnemar_exact_by_hand(a_only, b_only, expected):
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected)
    assert mcnemar_exact(b_only, a_only) == pytest.approx(expected)


def test_bootstrap_interval_of_a_known_distribution():
    # One seed, differences (1, 0, 0): a resample's mean is k/3 with k ~ Binomial(3, 1/3);
    # P(k=0) = 8/27 > 2.5% and P(k=3) = 1/27 > 2.5%, so the 95% percentile interval is [0, 1].
    diff, low, high = paired_bootstrap(np.array([[1, 0, 1]]), np.array([[0, 0, 1]]), resamples=4000, seed=3)
    assert diff == pytest.approx(1 / 3) and (low, high) == (0.0, 1.0)


def test_bootstrap_resamples_seeds_in_pairs():
    # Seed 0: A right everywhere, B wrong; seed 1: both right. Query resampling alone would give 0.5 always;
    # resampling the two seeds gives 0, 0.5 or 1 with P(0) = P(1) = 1/4.
    a = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])
    b = np.array([[0, 0, 0, 0], [1, 1, 1, 1]])
    diff, low, high = paired_bootstrap(a, b, resamples=2000, seed=0)
    assert diff == 0.5 and (low, high) == (0.0, 1.0)
    one_seed = paired_bootstrap(a[:1], b[:1], resamples=200)
    assert one_seed == (1.0, 1.0, 1.0)


def test_stratified_bootstrap_keeps_class_sizes():
    # Balanced accuracy over two classes: class 0 diff mean 1, class 1 diff mean 0, so every stratified resample
    # gives (1 + 0) / 2 = 0.5; an unstratified one would vary.
    a = np.array([[1, 1, 0, 0, 0, 0]])
    b = np.array([[0, 0, 0, 0, 0, 0]])
    strata = np.array([0, 0, 1, 1, 1, 1])
    assert paired_bootstrap(a, b, strata=strata, resamples=500) == (0.5, 0.5, 0.5)
    _, low, high = paired_bootstrap(a, b, resamples=500)
    assert low < high


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(2, 30), st.integers(0, 2**16))
def test_bootstrap_properties(n_seeds, n_queries, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, (n_seeds, n_queries))
    b = rng.integers(0, 2, (n_seeds, n_queries))
    diff, low, high = paired_bootstrap(a, b, resamples=300, seed=seed)
    assert diff == pytest.approx((a - b).mean())
    assert -1 <= low <= high <= 1
    swapped = paired_bootstrap(b, a, resamples=300, seed=seed)  # the same draws: the interval mirrors
    assert swapped == pytest.approx((-diff, -high, -low))
    assert paired_bootstrap(a, b, resamples=300, seed=seed) == (diff, low, high)  # seeded
    assert paired_bootstrap(a, a, resamples=50, seed=seed) == (0.0, 0.0, 0.0)


def _write(run, rows):
    run.mkdir(parents=True, exist_ok=True)
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_runs_on_a_fixed_example(tmp_path):
    gold = [0, 1, 0, 1, 0, 1, 0, 1]
    pred_a = [0, 1, 0, 1, 0, 1, 1, 0]  # right on q0..q5
    pred_b = [0, 0, 1, 0, 0, 1, 0, 0]  # right on q0, q4, q5, q6
    a = [{"seed": 0, "eval": "mnli-m", "id": f"q{i}", "gold": g, "pred": p}
         for i, (g, p) in enumerate(zip(gold, pred_a))]
    b = [{"seed": 0, "eval": "mnli-m", "id": f"q{i}", "gold": g, "pred": p}
         for i, (g, p) in enumerate(zip(gold, pred_b))]
    b.append({"seed": 0, "eval": "mnli-m", "id": "only-b", "gold": 0, "pred": 0})  # not scored by A: left out
    b.append({"seed": 1, "eval": "mnli-m", "id": "q0", "gold": 0, "pred": 0})  # seed A lacks: left out
    _write(tmp_path / "a", a)
    _write(tmp_path / "b", b)
    (result,) = compare_runs(tmp_path / "a", tmp_path / "b", resamples=1000)
    assert result.seeds == [0] and result.queries == 8
    assert result.accuracy_a == 6 / 8 and result.accuracy_b == 4 / 8 and result.difference == pytest.approx(0.25)
    assert (result.a_only, result.b_only) == (3, 1)  # q1, q2, q3 vs q6
    assert result.mcnemar_p == pytest.approx(2 * (1 + 4) / 16)  # n=4: 0.625
    assert result.ci95_low < 0.25 < result.ci95_high and not result.distinguishable
    assert "not distinguishable from 0" in result.sentence()


def test_compare_hans_adds_the_ood_accuracy(tmp_path):
    rows_a, rows_b = [], []
    for i in range(6):
        gold = i % 2
        meta = {"heuristic": "lexical_overlap" if i < 4 else "subsequence"}
        rows_a.append({"seed": 0, "eval": "hans", "id": str(i), "gold": gold, "pred": 0, **meta})  # always "entailment"
        rows_b.append({"seed": 0, "eval": "hans", "id": str(i), "gold": gold, "pred": gold, **meta})
    _write(tmp_path / "a", rows_a)
    _write(tmp_path / "b", rows_b)
    accuracy, ood = compare_runs(tmp_path / "a", tmp_path / "b", resamples=200)
    assert accuracy.metric == "accuracy" and accuracy.queries == 6 and accuracy.difference == pytest.approx(-0.5)
    assert ood.metric == "ood_accuracy" and ood.queries == 4  # lexical overlap only
    assert ood.accuracy_a == 0.5 and ood.accuracy_b == 1.0  # mean of the per-label accuracies (1 and 0)
    assert (ood.ci95_low, ood.ci95_high) == (-0.5, -0.5) and ood.distinguishable


def test_compare_errors_name_the_problem(tmp_path):
    _write(tmp_path / "a", [{"seed": 0, "eval": "mnli-m", "id": "1", "gold": 0, "pred": 0}])
    _write(tmp_path / "b", [{"seed": 3, "eval": "mnli-m", "id": "1", "gold": 0, "pred": 0}])
    with pytest.raises(IcldError, match="share no seed"):
        compare_runs(tmp_path / "a", tmp_path / "b")
    with pytest.raises(IcldError, match="predictions.jsonl"):
        compare_runs(tmp_path / "a", tmp_path / "missing")
    _write(tmp_path / "c", [{"seed": 0, "eval": "mnli-m", "id": "1", "gold": 0}])
    with pytest.raises(IcldError, match=r"predictions.jsonl:1: not a prediction row"):
        compare_runs(tmp_path / "a", tmp_path / "c")
    assert math.isclose(mcnemar_exact(10, 0), 2 / 1024)


def test_generation_runs_compare_by_exact_match(tmp_path):
    """Generation rows carry exact_match, not classes: accuracy is exact match, paired query by query."""
    right_a = [1, 1, 1, 1, 0, 0]
    right_b = [1, 0, 0, 0, 0, 1]
    for name, right in (("a", right_a), ("b", right_b)):
        _write(tmp_path / name, [{"seed": 0, "eval": "gsm8k", "id": f"q{i}", "text": "...", "answer": "7",
                                  "gold_answer": "7" if r else "8", "exact_match": float(r), "token_f1": float(r)}
                                 for i, r in enumerate(right)])
    result, f1 = compare_runs(tmp_path / "a", tmp_path / "b", resamples=500)
    assert result.metric == "accuracy" and f1.metric == "token_f1"
    assert result.queries == 6 and result.accuracy_a == 4 / 6 and result.accuracy_b == 2 / 6
    assert (result.a_only, result.b_only) == (3, 1)
    assert result.difference == pytest.approx(2 / 6)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=30), st.integers(1, 3))
def test_generation_runs_compare_by_token_f1(tmp_path_factory, pairs, n_seeds):
    """Token F1 pairs query by query over every seed: the difference is the mean per-query difference, the
    discordant counts are the queries where one F1 is higher, and the p-value is their exact sign test."""
    tmp = tmp_path_factory.mktemp("f1")
    for name, side in (("a", 0), ("b", 1)):
        _write(tmp / name, [{"seed": s, "eval": "held-out", "id": f"q{i}", "text": "t", "exact_match": 0.0,
                             "token_f1": pair[side] * (s + 1) / n_seeds} for s in range(n_seeds)
                            for i, pair in enumerate(pairs)])
    exact, f1 = compare_runs(tmp / "a", tmp / "b", resamples=300)
    assert exact.difference == 0.0 and f1.metric == "token_f1" and f1.seeds == list(range(n_seeds))
    diffs = np.array([[(a - b) * (s + 1) / n_seeds for a, b in pairs] for s in range(n_seeds)])
    assert f1.difference == pytest.approx(diffs.mean())
    assert (f1.a_only, f1.b_only) == (int((diffs > 0).sum()), int((diffs < 0).sum()))
    assert f1.mcnemar_p == pytest.approx(mcnemar_exact(f1.a_only, f1.b_only))
    # A bootstrap mean of the per-query differences lies within their range.
    assert diffs.min() - 1e-9 <= f1.ci95_low <= f1.ci95_high <= diffs.max() + 1e-9


def test_token_f1_of_classification_rows_is_refused(tmp_path):
    from icldistill.experiments.compare import compare_predictions, read_predictions

    for name in ("a", "b"):
        _write(tmp_path / name, [{"seed": 0, "eval": "mnli-m", "id": "1", "gold": 0, "pred": 0}])
    a, b = read_predictions([tmp_path / "a"]), read_predictions([tmp_path / "b"])
    assert [r.metric for r in compare_runs(tmp_path / "a", tmp_path / "b", resamples=100)] == ["accuracy"]
    with pytest.raises(IcldError, match="no token_f1"):
        compare_predictions(a, b, "mnli-m", metric="token_f1")


def test_a_row_with_neither_classes_nor_exact_match_is_named(tmp_path):
    _write(tmp_path / "a", [{"seed": 0, "eval": "gsm8k", "id": "q0", "text": "no reference"}])
    _write(tmp_path / "b", [{"seed": 0, "eval": "gsm8k", "id": "q0", "exact_match": 1.0}])
    with pytest.raises(IcldError, match="exact_match"):
        compare_runs(tmp_path / "a", tmp_path / "b")


def test_kl_spaces_are_different_configurations():
    """sweep_paired merges the cells of one configuration across seeds: a label-KL and a vocab-KL cell of one
    seed must not merge (their predictions would hold each query twice and the report would stop)."""
    from icldistill.experiments.compare import config_key

    row = {"task": "mnli", "method": "distill", "teacher": "t", "student": "s", "shots": 16, "alpha": 0.5,
           "peft": "lora", "ce_target": "gold"}
    assert config_key({**row, "kl_space": "label"}) != config_key({**row, "kl_space": "vocab"})
    assert config_key({**row, "kl_space": "label", "seed": 0}) == config_key({**row, "kl_space": "label", "seed": 1})
