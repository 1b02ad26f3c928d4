"""Tests for icldistill.scoring.metrics: hand-computed metrics, AUC against brute force, calibration, seeds."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from icldistill.errors import DataError, IcldError
from icldistill.scoring.metrics import aggregate_seeds, compute_metrics, hans_ood_accuracy

# A 4-row binary example where restricted accuracy (3/4), full-vocabulary accuracy (1/4) and the
# non-label rate (2/4) all differ. Margins logp[:, 0] - logp[:, 1] are 1, 2, -3, 3.
SMALL_LOGPROBS = np.array([[-1.0, -2.0], [-1.0, -3.0], [-4.0, -1.0], [-2.0, -5.0]])
SMALL_GOLD = np.array([0, 0, 1, 1])
SMALL_TOP = np.array([0, -1, -1, 0])
YES_NO = ["yes", "no"]
HANS_LABELS = ["entailment", "non-entailment"]


def small_metrics(**kwargs):
    return compute_metrics(SMALL_LOGPROBS, SMALL_GOLD, SMALL_TOP, class_names=YES_NO, **kwargs)


def brute_force_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2, over all pairs."""
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def assert_plain_json(value) -> None:
    """Only builtin types: np.float64 subclasses float and would slip through json.dumps."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str
            assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain_json(item)
    else:
        assert type(value) in (int, float, str, bool, type(None)), (value, type(value))


# --------------------------------------------------------------------------------------------
# compute_metrics: hand-computed cases


def test_small_example_rates_differ():
    metrics = small_metrics(dropped=3)
    assert metrics["n"] == 4
    assert metrics["dropped"] == 3
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["accuracy_full_vocab"] == pytest.approx(0.25)
    assert metrics["non_label_rate"] == pytest.approx(0.5)
    assert metrics["calibrated_accuracy"] is None


def test_small_example_per_label_prediction_rate_and_f1():
    metrics = small_metrics()
    assert metrics["per_label"] == {"yes": {"n": 2, "accuracy": 1.0}, "no": {"n": 2, "accuracy": 0.5}}
    assert metrics["prediction_rate"] == pytest.approx({"yes": 0.75, "no": 0.25})
    # yes: TP 2, FP 1, FN 0 -> F1 4/5; no: TP 1, FP 0, FN 1 -> F1 2/3.
    assert metrics["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_small_example_mean_prob_is_renormalised_over_label_words():
    metrics = small_metrics()
    margins = np.array([1.0, 2.0, -3.0, 3.0])
    p_yes = 1 / (1 + np.exp(-margins))
    assert metrics["mean_prob"]["yes"] == pytest.approx(p_yes.mean())
    assert metrics["mean_prob"]["no"] == pytest.approx(1 - p_yes.mean())


def test_small_example_auc_by_hand():
    # Positives (gold yes) have margins 1, 2; negatives -3, 3: each beats -3 and loses to 3.
    assert small_metrics()["auc"] == pytest.approx(0.5)


def test_calibrated_accuracy_by_hand_single_content_free_row():
    # p_cf favours "yes" by a log-odds of 2.5, so every margin drops by 2.5:
    # -1.5, -0.5, -5.5, 0.5 -> predictions no, no, no, yes -> only row 2 is right.
    metrics = small_metrics(content_free_logprobs=np.array([0.0, -2.5]))
    assert metrics["calibrated_accuracy"] == pytest.approx(0.25)


def test_calibration_averages_probabilities_not_logprobs():
    # Mean of the renormalised probabilities gives log-odds 0.976 (predictions yes, yes, no, yes:
    # 3/4 right); averaging log-probabilities instead would give 1.5 and 2/4 right.
    content_free = np.array([[0.0, -3.0], [0.0, 0.0]])
    assert small_metrics(content_free_logprobs=content_free)["calibrated_accuracy"] == pytest.approx(0.75)


def test_contextual_calibration_removes_constant_label_bias():
    rng = np.random.default_rng(0)
    n, num_classes = 300, 3
    unbiased = rng.normal(size=(n, num_classes)) * 2
    gold = np.where(rng.random(n) < 0.7, unbiased.argmax(axis=1), rng.integers(0, num_classes, n))
    bias = np.array([3.0, 0.0, 0.0])
    # Same bias on every row, plus a per-row full-vocabulary normaliser that must not matter.
    biased = unbiased + bias + rng.normal(size=(n, 1)) * 5
    top = np.full(n, -1)
    names = ["entailment", "neutral", "contradiction"]

    reference = compute_metrics(unbiased, gold, top, class_names=names)
    biased_metrics = compute_metrics(biased, gold, top, class_names=names, content_free_logprobs=bias - 7.0)

    assert biased_metrics["prediction_rate"]["entailment"] > 0.7
    assert biased_metrics["accuracy"] < reference["accuracy"] - 0.2
    assert biased_metrics["calibrated_accuracy"] == pytest.approx(reference["accuracy"])


def test_multiclass_auc_is_macro_one_vs_rest_of_renormalised_probs():
    rng = np.random.default_rng(1)
    logprobs = rng.normal(size=(40, 3))
    gold = rng.integers(0, 3, 40)
    probs = np.exp(logprobs) / np.exp(logprobs).sum(axis=1, keepdims=True)
    expected = np.mean([brute_force_auc(probs[:, c], gold == c) for c in range(3)])
    metrics = compute_metrics(logprobs, gold, np.full(40, -1), class_names=["a", "b", "c"])
    assert metrics["auc"] == pytest.approx(expected)


def test_multiclass_auc_skips_classes_absent_from_gold():
    rng = np.random.default_rng(2)
    logprobs = rng.normal(size=(30, 3))
    gold = rng.integers(0, 2, 30)  # class "c" never gold
    probs = np.exp(logprobs) / np.exp(logprobs).sum(axis=1, keepdims=True)
    expected = np.mean([brute_force_auc(probs[:, c], gold == c) for c in range(2)])
    metrics = compute_metrics(logprobs, gold, np.full(30, -1), class_names=["a", "b", "c"])
    assert metrics["auc"] == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# AUC properties


def test_auc_perfect_reversed_and_constant_margins():
    gold = np.array([0, 0, 0, 1, 1])
    top = np.full(5, -1)
    separated = np.array([[3.0, 0.0], [2.0, 0.0], [1.5, 0.0], [-1.0, 0.0], [-2.0, 0.0]])
    assert compute_metrics(separated, gold, top, class_names=YES_NO)["auc"] == 1.0
    assert compute_metrics(separated[:, ::-1], gold, top, class_names=YES_NO)["auc"] == 0.0
    constant = np.tile([-1.0, -2.0], (5, 1))
    assert compute_metrics(constant, gold, top, class_names=YES_NO)["auc"] == 0.5


def test_auc_is_none_with_one_gold_class():
    metrics = compute_metrics(SMALL_LOGPROBS, np.zeros(4, dtype=int), SMALL_TOP, class_names=YES_NO)
    assert metrics["auc"] is None
    assert metrics["accuracy"] == pytest.approx(0.75)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 1)), min_size=1, max_size=30),
)
def test_auc_matches_pairwise_count_with_ties(rows):
    margins = np.array([m for m, _ in rows], dtype=float)
    gold = np.array([g for _, g in rows])
    logprobs = np.stack([margins, np.zeros_like(margins)], axis=1)
    auc = compute_metrics(logprobs, gold, np.full(len(rows), -1), class_names=YES_NO)["auc"]
    if len(set(gold.tolist())) < 2:
        assert auc is None
    else:
        assert auc == pytest.approx(brute_force_auc(margins, gold == 0), abs=1e-12)


# --------------------------------------------------------------------------------------------
# Invariance to the full-vocabulary normaliser


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_metrics_invariant_to_per_row_constant(data):
    n = data.draw(st.integers(1, 20), label="n")
    num_classes = data.draw(st.integers(2, 4), label="C")
    # Quarter-integers and integer shifts are exact in float64, so invariance must hold exactly.
    quarters = st.integers(-160, 0).map(lambda q: q / 4)
    row = st.lists(quarters, min_size=num_classes, max_size=num_classes)
    logprobs = np.array(data.draw(st.lists(row, min_size=n, max_size=n)))
    shift = np.array(data.draw(st.lists(st.integers(-30, 30), min_size=n, max_size=n)), dtype=float)[:, None]
    gold = np.array(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)))
    top = np.array(data.draw(st.lists(st.integers(-1, num_classes - 1), min_size=n, max_size=n)))
    content_free = np.array(data.draw(st.lists(quarters, min_size=num_classes, max_size=num_classes)))
    names = [f"class{c}" for c in range(num_classes)]

    base = compute_metrics(logprobs, gold, top, class_names=names, content_free_logprobs=content_free)
    shifted = compute_metrics(logprobs + shift, gold, top, class_names=names, content_free_logprobs=content_free + 11.0)
    assert shifted == base


# --------------------------------------------------------------------------------------------
# Group breakdowns (HANS heuristic x label, subcase)


def test_group_breakdowns_count_and_score():
    logprobs = np.array([[0.0, -1.0]] * 3 + [[-1.0, 0.0]] * 3)  # predictions: yes x3, no x3
    gold = np.array([0, 1, 0, 1, 1, 0])  # correct: T F T T T F
    groups = {
        "heuristic": ["lexical_overlap"] * 2 + ["subsequence", "lexical_overlap"] + ["subsequence"] * 2,
        "subcase": ["ln_a", "ln_a", "sn_b", "ln_c", "sn_b", "sn_b"],
    }
    metrics = compute_metrics(logprobs, gold, np.full(6, -1), class_names=HANS_LABELS, groups=groups)

    assert metrics["by_heuristic"] == {
        "lexical_overlap": {"n": 3, "accuracy": pytest.approx(2 / 3)},
        "subsequence": {"n": 3, "accuracy": pytest.approx(2 / 3)},
    }
    assert metrics["by_heuristic_label"] == {
        "lexical_overlap/entailment": {"n": 1, "accuracy": 1.0},
        "lexical_overlap/non-entailment": {"n": 2, "accuracy": 0.5},
        "subsequence/entailment": {"n": 2, "accuracy": 0.5},
        "subsequence/non-entailment": {"n": 1, "accuracy": 1.0},
    }
    assert metrics["by_subcase"] == {
        "ln_a": {"n": 2, "accuracy": 0.5},
        "ln_c": {"n": 1, "accuracy": 1.0},
        "sn_b": {"n": 3, "accuracy": pytest.approx(2 / 3)},
    }
    assert sum(cell["n"] for cell in metrics["by_subcase_label"].values()) == 6


def test_group_with_wrong_length_is_rejected():
    with pytest.raises(DataError, match="heuristic"):
        small_metrics(groups={"heuristic": ["a", "b"]})


# --------------------------------------------------------------------------------------------
# Output format, edge cases, validation


def test_output_is_plain_json():
    content_free = np.array([[0.0, -1.0], [-0.5, 0.0]])
    metrics = small_metrics(content_free_logprobs=content_free, groups={"g": ["x", "y", "x", "y"]})
    json.dumps(metrics, allow_nan=False)
    assert_plain_json(metrics)
    assert_plain_json(aggregate_seeds([metrics, small_metrics(groups={"g": ["x", "x", "y", "y"]})]))


def test_empty_eval_set_gives_none_rates_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = compute_metrics(
            np.zeros((0, 2)),
            np.array([]),
            np.array([]),
            class_names=YES_NO,
            content_free_logprobs=np.array([0.0, -1.0]),
            groups={"heuristic": []},
            dropped=5,
        )
    assert metrics["n"] == 0
    assert metrics["dropped"] == 5
    for key in ("accuracy", "accuracy_full_vocab", "non_label_rate", "calibrated_accuracy", "auc", "macro_f1"):
        assert metrics[key] is None, key
    assert metrics["per_label"] == {"yes": {"n": 0, "accuracy": None}, "no": {"n": 0, "accuracy": None}}
    assert metrics["prediction_rate"] == {"yes": None, "no": None}
    assert metrics["mean_prob"] == {"yes": None, "no": None}
    assert metrics["by_heuristic"] == {} and metrics["by_heuristic_label"] == {}
    json.dumps(metrics)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label_logprobs": np.zeros(4)}, "shape"),
        ({"gold": np.array([0, 1, 2, 0])}, "gold"),
        ({"gold": np.array([0.0, 1.0, 1.0, 0.0])}, "integer"),
        ({"top_token_is_label": np.array([0, -2, 0, 0])}, "top_token_is_label"),
        ({"top_token_is_label": np.array([0, 0])}, "shape"),
        ({"class_names": ["yes", "no", "maybe"]}, "class_names"),
        ({"class_names": ["yes", "yes"]}, "distinct"),
        ({"label_logprobs": np.array([[0.0, np.nan]] * 4)}, "NaN"),
        ({"content_free_logprobs": np.zeros(3)}, "content_free"),
        ({"dropped": -1}, "dropped"),
    ],
)
def test_inconsistent_inputs_fail_with_a_clear_error(kwargs, match):
    arguments = {
        "label_logprobs": SMALL_LOGPROBS,
        "gold": SMALL_GOLD,
        "top_token_is_label": SMALL_TOP,
        "class_names": YES_NO,
    }
    arguments.update(kwargs)
    with pytest.raises(IcldError, match=match):
        compute_metrics(
            arguments.pop("label_logprobs"), arguments.pop("gold"), arguments.pop("top_token_is_label"), **arguments
        )


# --------------------------------------------------------------------------------------------
# aggregate_seeds


def test_aggregate_seeds_matches_numpy_on_random_nested_metrics():
    rng = np.random.default_rng(3)
    values = rng.random((5, 3))
    per_seed = [
        {"accuracy": float(v[0]), "per_label": {"yes": {"n": 10, "accuracy": float(v[1])}}, "auc": float(v[2])}
        for v in values
    ]
    aggregated = aggregate_seeds(per_seed)
    leaves = (aggregated["accuracy"], aggregated["per_label"]["yes"]["accuracy"], aggregated["auc"])
    for column, leaf in enumerate(leaves):
        data = values[:, column]
        assert leaf["mean"] == pytest.approx(np.mean(data))
        assert leaf["std"] == pytest.approx(np.std(data, ddof=1))
        assert leaf["min"] == pytest.approx(np.min(data))
        assert leaf["max"] == pytest.approx(np.max(data))
        assert leaf["n_seeds"] == 5
        assert leaf["ci95"] == pytest.approx(2.7764 * np.std(data, ddof=1) / math.sqrt(5))
    constant = {"mean": 10.0, "std": 0.0, "min": 10.0, "max": 10.0, "n_seeds": 5, "ci95": 0.0}
    assert aggregated["per_label"]["yes"]["n"] == constant


def test_aggregate_one_seed_has_zero_std_and_no_interval():
    leaf = aggregate_seeds([{"accuracy": 0.6}])["accuracy"]
    assert leaf == {"mean": 0.6, "std": 0.0, "min": 0.6, "max": 0.6, "n_seeds": 1, "ci95": None}


def test_aggregate_uses_t_for_few_seeds_and_normal_beyond_thirty():
    two = aggregate_seeds([{"x": 0.0}, {"x": 1.0}])["x"]
    assert two["ci95"] == pytest.approx(12.7062 * math.sqrt(0.5) / math.sqrt(2))
    many = np.arange(40, dtype=float)
    leaf = aggregate_seeds([{"x": v} for v in many])["x"]
    assert leaf["ci95"] == pytest.approx(1.96 * np.std(many, ddof=1) / math.sqrt(40))


def test_aggregate_skips_none_and_keeps_all_none_as_none():
    aggregated = aggregate_seeds(
        [
            {"auc": 0.5, "calibrated_accuracy": None, "task": "mnli", "per_label": {"no": {"accuracy": None}}},
            {"auc": None, "calibrated_accuracy": None, "task": "mnli", "per_label": {"no": {"accuracy": 0.3}}},
            {"auc": 0.7, "calibrated_accuracy": None, "task": "mnli"},
        ]
    )
    assert aggregated["auc"]["n_seeds"] == 2
    assert aggregated["auc"]["mean"] == pytest.approx(0.6)
    assert aggregated["calibrated_accuracy"] is None
    assert aggregated["task"] == "mnli"
    assert aggregated["per_label"]["no"]["accuracy"]["n_seeds"] == 1


def test_aggregate_rejects_no_seeds_and_mismatched_structure():
    with pytest.raises(DataError):
        aggregate_seeds([])
    with pytest.raises(DataError, match="per_label"):
        aggregate_seeds([{"per_label": {"yes": 1.0}}, {"per_label": 0.5}])


# --------------------------------------------------------------------------------------------
# HANS lexical-overlap OOD number


def test_hans_ood_is_mean_of_label_accuracies():
    # A "yes to everything" model: 1.0 on entailment, 0.0 on non-entailment -> 0.5, not the pooled rate.
    logprobs = np.array([[0.0, -2.0]] * 5)
    gold = np.array([0, 0, 0, 0, 1])
    metrics = compute_metrics(logprobs, gold, np.zeros(5, dtype=int), class_names=HANS_LABELS)
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert hans_ood_accuracy(metrics)["ood_accuracy"] == pytest.approx(0.5)


def test_hans_ood_is_none_when_a_label_is_missing():
    metrics = compute_metrics(
        np.array([[0.0, -2.0]]), np.array([0]), np.array([0]), class_names=HANS_LABELS
    )
    assert metrics["per_label"]["non-entailment"]["accuracy"] is None
    assert hans_ood_accuracy(metrics)["ood_accuracy"] is None
    assert hans_ood_accuracy({})["ood_accuracy"] is None


def test_hans_ood_uses_lexical_overlap_rows_of_a_full_hans_run():
    logprobs = np.array([[0.0, -1.0], [-1.0, 0.0], [0.0, -1.0], [0.0, -1.0]])
    gold = np.array([0, 1, 1, 1])  # lexical_overlap rows are all correct; subsequence rows are wrong
    groups = {"heuristic": ["lexical_overlap", "lexical_overlap", "subsequence", "subsequence"]}
    metrics = compute_metrics(logprobs, gold, np.full(4, -1), class_names=HANS_LABELS, groups=groups)
    assert metrics["per_label"]["non-entailment"]["accuracy"] == pytest.approx(1 / 3)
    by_heuristic = hans_ood_accuracy(metrics)["ood_accuracy_by_heuristic"]
    assert by_heuristic["lexical_overlap"] == pytest.approx(1.0)  # other heuristics never leak into it
    assert by_heuristic["subsequence"] is None  # its rows are all non-entailment: one label has no accuracy


# --------------------------------------------------------------------------------------------
# C > 2 by hand (issue 10): a 3-class example of 5 rows

THREE_LOGPROBS = np.log(np.array([
    [0.6, 0.3, 0.1],  # gold a, pred a
    [0.2, 0.5, 0.3],  # gold b, pred b
    [0.5, 0.1, 0.4],  # gold c, pred a
    [0.1, 0.2, 0.7],  # gold c, pred c
    [0.4, 0.35, 0.25],  # gold b, pred a
]))
THREE_GOLD = np.array([0, 1, 2, 2, 1])
ABC = ["a", "b", "c"]


def test_three_classes_accuracy_f1_rates_and_confusion_by_hand():
    m = compute_metrics(THREE_LOGPROBS, THREE_GOLD, np.array([0, 1, -1, 2, 0]), class_names=ABC)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # F1: a: tp 1, fp 2, fn 0 -> 2/4; b: tp 1, fp 0, fn 1 -> 2/3; c: tp 1, fp 0, fn 1 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert m["per_label"] == {"a": {"n": 1, "accuracy": 1.0}, "b": {"n": 2, "accuracy": 0.5},
                              "c": {"n": 2, "accuracy": 0.5}}
    assert m["prediction_rate"] == pytest.approx({"a": 3 / 5, "b": 1 / 5, "c": 1 / 5})
    assert m["confusion"] == {"a": {"a": 1, "b": 0, "c": 0}, "b": {"a": 1, "b": 1, "c": 0},
                              "c": {"a": 1, "b": 0, "c": 1}}
    assert m["chance_rate"] == pytest.approx(1 / 3) and m["majority_rate"] == pytest.approx(2 / 5)
    assert m["accuracy_full_vocab"] == pytest.approx(3 / 5) and m["non_label_rate"] == pytest.approx(1 / 5)
    # one-vs-rest AUCs by hand: a: pos 0.6 beats 0.2, 0.5, 0.1, 0.4 -> 1; b: pos {0.5, 0.35} vs neg
    # {0.3, 0.1, 0.2}: 6/6 -> 1; c: pos {0.4, 0.7} vs neg {0.1, 0.3, 0.25}: 6/6 -> 1
    assert m["auc"] == pytest.approx(1.0)


def test_three_class_contextual_calibration_by_hand():
    # content-free p = (0.5, 0.3, 0.2): divide each row by it and take the argmax
    # row 2 (gold c): 0.5/0.5=1.0, 0.1/0.3=0.33, 0.4/0.2=2.0 -> c (was a); row 4 (gold b):
    # 0.8, 1.17, 1.25 -> c (was a); the others keep a, b, c
    cf = np.log(np.array([0.5, 0.3, 0.2]))
    m = compute_metrics(THREE_LOGPROBS, THREE_GOLD, np.full(5, -1), class_names=ABC, content_free_logprobs=cf)
    assert m["calibrated_accuracy"] == pytest.approx(4 / 5)
    # calibrated predictions a, b, c, c, c: F1 a 1, b 2/3 (tp 1, fn 1), c 4/5 (tp 2, fp 1)
    assert m["calibrated_macro_f1"] == pytest.approx((1 + 2 / 3 + 0.8) / 3)


def test_confusion_rows_sum_to_gold_counts_for_any_number_of_classes():
    rng = np.random.default_rng(3)
    for c in (2, 4, 6):
        logprobs, gold = rng.normal(size=(50, c)), rng.integers(0, c, 50)
        names = [f"k{i}" for i in range(c)]
        m = compute_metrics(logprobs, gold, np.full(50, -1), class_names=names)
        assert [sum(m["confusion"][n].values()) for n in names] == np.bincount(gold, minlength=c).tolist()
        assert sum(m["confusion"][n][n] for n in names) == round(m["accuracy"] * 50)
        assert m["majority_rate"] == pytest.approx(np.bincount(gold).max() / 50)
