"""Metrics from label-word scores: restricted, full-vocabulary and calibrated accuracy, AUC, breakdowns.

Takes the arrays the scorer produces and returns plain JSON-ready dicts; imports only numpy and
the standard library so results can be recomputed and tested without a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from icldistill.errors import DataError

__all__ = ["aggregate_seeds", "compute_metrics", "hans_ood_accuracy"]

# Two-sided 95% critical values of Student's t for df = 1..30; beyond that the normal 1.96 is
# within 2% and a seed sweep never gets there.
_T_CRITICAL_95 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z_95 = 1.96


def compute_metrics(
    label_logprobs: np.ndarray,
    gold: np.ndarray,
    top_token_is_label: np.ndarray,
    *,
    class_names: Sequence[str],
    content_free_logprobs: np.ndarray | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    dropped: int = 0,
) -> dict[str, Any]:
    """Score one evaluation run from its label-word log-probabilities.

    Restricted accuracy alone hides how label-biased small models are (PROTOCOL.md, "Scoring"),
    so the full-vocabulary view, contextual calibration and the AUC of the label margin are
    reported beside it.

    Args:
        label_logprobs: ``(n, C)`` log-probability of each class's label word over the full
            vocabulary at the answer position. Every metric depends only on differences within a
            row, so a per-row constant (the full-vocabulary normaliser) changes nothing.
        gold: ``(n,)`` integer gold class index in ``[0, C)``.
        top_token_is_label: ``(n,)`` integer ``c`` if the full-vocabulary argmax token is class
            ``c``'s label word, else ``-1``.
        class_names: ``C`` distinct names, used as keys of the per-class results.
        content_free_logprobs: ``(C,)`` or ``(m, C)`` label log-probabilities for content-free
            inputs (e.g. ``'N/A'``) under the same demonstrations; enables contextual calibration
            (Zhao et al. 2021, "Calibrate Before Use").
        groups: optional ``{key: (n,) group values}``; each key adds ``by_<key>`` and
            ``by_<key>_label`` breakdowns (e.g. HANS ``heuristic`` x label, ``subcase``).
        dropped: rows removed before scoring (e.g. too long for the context); reported, not scored.

    Returns:
        A dict of plain Python numbers, strings, dicts and ``None``: ``n``, ``dropped``,
        ``accuracy``, ``accuracy_full_vocab``, ``non_label_rate``, ``calibrated_accuracy``,
        ``auc``, ``macro_f1``, ``calibrated_macro_f1``, ``per_label``, ``prediction_rate``,
        ``mean_prob``, ``chance_rate`` (1 / C), ``majority_rate`` (share of the most frequent gold
        class), ``confusion`` (``{gold: {predicted: count}}``) and the group breakdowns. Rates are
        ``None`` where they have no rows to average over.

    Raises:
        DataError: shapes, class indices, names or group lengths are inconsistent, or a score is
            not finite.
    """
    logprobs, gold_index, top_label, names = _validate(label_logprobs, gold, top_token_is_label, class_names)
    if isinstance(dropped, bool) or not isinstance(dropped, (int, np.integer)) or dropped < 0:
        raise DataError(f"dropped must be a non-negative int, got {dropped!r}")
    n, num_classes = logprobs.shape

    probs = np.exp(_log_renormalise(logprobs))  # (n, C), rows sum to 1
    predicted = np.argmax(logprobs, axis=1)
    correct = predicted == gold_index

    metrics: dict[str, Any] = {
        "n": int(n),
        "dropped": int(dropped),
        "accuracy": _mean_or_none(correct),
        "accuracy_full_vocab": _mean_or_none(top_label == gold_index),
        "non_label_rate": _mean_or_none(top_label == -1),
        "calibrated_accuracy": None,
        "auc": _label_margin_auc(logprobs, probs, gold_index),
        "macro_f1": _macro_f1(predicted, gold_index, num_classes),
        **_per_class(names, gold_index, predicted, probs),
        # What "no skill" scores on this set: uniform guessing, and always answering its most frequent class.
        "chance_rate": 1.0 / num_classes,
        "majority_rate": float(np.bincount(gold_index, minlength=num_classes).max() / n) if n else None,
        "calibrated_macro_f1": None,
    }

    if content_free_logprobs is not None:
        calibration = _content_free_probs(content_free_logprobs, num_classes)
        # Zhao et al. 2021: W = diag(p_cf)^-1, so argmax(W p) = argmax(log p - log p_cf); in log
        # space a tiny p_cf cannot overflow the ratio.
        calibrated = np.argmax(_log_renormalise(logprobs) - np.log(calibration), axis=1)
        metrics["calibrated_accuracy"] = _mean_or_none(calibrated == gold_index)
        metrics["calibrated_macro_f1"] = _macro_f1(calibrated, gold_index, num_classes)

    for key, values in (groups or {}).items():
        metrics.update(_group_breakdowns(key, values, correct, gold_index, names))
    return metrics


def _per_class(names: Sequence[str], gold_index: np.ndarray, predicted: np.ndarray,
               probs: np.ndarray) -> dict[str, Any]:
    """Per-class breakdowns: ``per_label`` (n, accuracy), ``prediction_rate``, ``mean_prob``, ``confusion``."""
    correct = predicted == gold_index
    return {
        "per_label": {
            name: {"n": int(np.sum(gold_index == c)), "accuracy": _mean_or_none(correct[gold_index == c])}
            for c, name in enumerate(names)
        },
        "prediction_rate": {name: _mean_or_none(predicted == c) for c, name in enumerate(names)},
        "mean_prob": {name: _mean_or_none(probs[:, c]) for c, name in enumerate(names)},
        "confusion": {gold_name: {pred_name: int(np.sum((gold_index == g) & (predicted == p)))
                                  for p, pred_name in enumerate(names)} for g, gold_name in enumerate(names)},
    }


def aggregate_seeds(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summarise the metric dicts of several seeds on the same evaluation set.

    The structure is mirrored: every numeric leaf becomes ``{"mean", "std", "min", "max",
    "n_seeds", "ci95"}`` over the seeds where it is not ``None``. ``std`` is the sample standard
    deviation (ddof=1; 0.0 for one seed) and ``ci95`` the half-width of the 95% Student-t interval
    of the mean (``None`` for one seed), since a handful of seeds is the norm and a normal
    interval would be too narrow. A leaf that is ``None`` in every seed stays ``None``; a
    non-numeric leaf (a string) is kept if all seeds agree, else listed per seed.

    Args:
        per_seed: metric dicts as returned by :func:`compute_metrics`, one per seed.

    Raises:
        DataError: no seeds were given, or a key is a dict in one seed and a value in another.
    """
    if not per_seed:
        raise DataError("aggregate_seeds needs the metrics of at least one seed, got none")
    return _aggregate_mapping(list(per_seed), path="")


# --------------------------------------------------------------------------------------------
# Helpers


def _validate(
    label_logprobs: np.ndarray,
    gold: np.ndarray,
    top_token_is_label: np.ndarray,
    class_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Check shapes and ranges once, so the metrics below can assume clean ``(n, C)`` / ``(n,)`` arrays."""
    logprobs = np.asarray(label_logprobs, dtype=np.float64)
    if logprobs.ndim != 2:
        raise DataError(f"label_logprobs must have shape (n, C), got shape {logprobs.shape}")
    n, num_classes = logprobs.shape
    if isinstance(class_names, str):
        raise DataError("class_names must be a sequence of names, not a single string")
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise DataError(f"class_names has {len(names)} names but label_logprobs has {num_classes} columns")
    if num_classes < 2:
        raise DataError(f"need at least 2 classes to score, got {num_classes}")
    if len(set(names)) != len(names):
        raise DataError(f"class_names must be distinct, got {names}")
    if not np.all(np.isfinite(logprobs)):
        raise DataError(
            "label_logprobs contains NaN or infinite values; score in float32 or higher so that "
            "label-word log-probabilities do not underflow"
        )
    gold_index = _as_index_array(gold, "gold", n)
    top_label = _as_index_array(top_token_is_label, "top_token_is_label", n)
    if np.any((gold_index < 0) | (gold_index >= num_classes)):
        raise DataError(f"gold class indices must lie in [0, {num_classes}), got {sorted(set(gold_index.tolist()))}")
    if np.any((top_label < -1) | (top_label >= num_classes)):
        raise DataError(f"top_token_is_label must lie in [-1, {num_classes}), got {sorted(set(top_label.tolist()))}")
    return logprobs, gold_index, top_label, names


def _as_index_array(values: np.ndarray, name: str, n: int) -> np.ndarray:
    """``(n,)`` int64 copy of an index array; an empty array of any dtype is accepted as no rows."""
    array = np.asarray(values)
    if array.shape != (n,):
        raise DataError(f"{name} must have shape ({n},) to match label_logprobs, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    return array.astype(np.int64)


def _log_renormalise(logprobs: np.ndarray) -> np.ndarray:
    """``(n, C) -> (n, C)`` log-softmax over the label words only.

    The row maximum is subtracted first: besides avoiding overflow, it makes the result exactly
    invariant to a per-row constant (e.g. a different full-vocabulary normaliser).
    """
    if logprobs.shape[0] == 0:
        return logprobs.copy()
    shifted = logprobs - logprobs.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _content_free_probs(content_free_logprobs: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C,)`` or ``(m, C) -> (C,)`` mean renormalised label distribution of the content-free inputs."""
    scores = np.asarray(content_free_logprobs, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[None, :]
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] != num_classes:
        raise DataError(
            f"content_free_logprobs must have shape ({num_classes},) or (m, {num_classes}) with m >= 1, "
            f"got shape {np.shape(content_free_logprobs)}"
        )
    if not np.all(np.isfinite(scores)):
        raise DataError("content_free_logprobs contains NaN or infinite values")
    return np.exp(_log_renormalise(scores)).mean(axis=0)


def _mean_or_none(values: np.ndarray) -> float | None:
    """Mean of a 1-D array as a Python float, ``None`` for an empty array (no 0/0 warning)."""
    return float(np.mean(values)) if values.size else None


def _rank_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC by Mann-Whitney U: ``P(score_pos > score_neg) + P(tie) / 2``.

    ``scores`` and ``positive`` are ``(n,)``; ties get averaged ranks, which gives the 1/2 credit.
    ``None`` if either class is empty, because AUC is undefined there.
    """
    n_positive = int(np.sum(positive))
    n_negative = positive.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Start index of each run of equal scores; the run's members share the mean of its 1-based ranks.
    run_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    run_ends = np.r_[run_starts[1:], scores.size]
    run_ranks = (run_starts + run_ends + 1) / 2.0
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(run_ranks, run_ends - run_starts)
    u_statistic = ranks[positive].sum() - n_positive * (n_positive + 1) / 2.0
    return float(u_statistic / (n_positive * n_negative))


def _label_margin_auc(logprobs: np.ndarray, probs: np.ndarray, gold_index: np.ndarray) -> float | None:
    """AUC of the label scores, blind to a constant label bias that sinks restricted accuracy.

    Binary: AUC of ``logp[:, 0] - logp[:, 1]`` with class 0 positive. More classes: macro mean of
    the one-vs-rest AUC of each class's renormalised probability, over the classes present in
    ``gold`` (absent ones have no AUC). ``None`` when fewer than two classes are present.
    """
    if np.unique(gold_index).size < 2:
        return None
    if logprobs.shape[1] == 2:
        return _rank_auc(logprobs[:, 0] - logprobs[:, 1], gold_index == 0)
    per_class = [_rank_auc(probs[:, c], gold_index == c) for c in range(logprobs.shape[1])]
    present = [auc for auc in per_class if auc is not None]
    return float(np.mean(present))


def _macro_f1(predicted: np.ndarray, gold_index: np.ndarray, num_classes: int) -> float | None:
    """Unweighted mean F1 over the classes that occur in ``gold`` or ``predicted`` (``(n,)`` each).

    Classes that occur in neither have an undefined F1 and are left out, as scikit-learn does
    without an explicit label list.
    """
    if gold_index.size == 0:
        return None
    scores = []
    for c in range(num_classes):
        true_positive = int(np.sum((predicted == c) & (gold_index == c)))
        false_positive = int(np.sum((predicted == c) & (gold_index != c)))
        false_negative = int(np.sum((predicted != c) & (gold_index == c)))
        denominator = 2 * true_positive + false_positive + false_negative
        if denominator:
            scores.append(2 * true_positive / denominator)
    return float(np.mean(scores))


def _group_breakdowns(
    key: str,
    values: Sequence[str],
    correct: np.ndarray,
    gold_index: np.ndarray,
    names: list[str],
) -> dict[str, dict[str, dict[str, Any]]]:
    """``by_<key>`` and ``by_<key>_label`` accuracy tables for one grouping of the ``(n,)`` rows.

    Only combinations that occur are listed, sorted by value, so that the output is stable.
    """
    if not isinstance(key, str) or not key:
        raise DataError(f"group keys must be non-empty strings, got {key!r}")
    if isinstance(values, str):
        raise DataError(f"groups[{key!r}] must be a sequence with one value per row, not a string")
    labels = [str(value) for value in values]
    if len(labels) != gold_index.size:
        raise DataError(f"groups[{key!r}] has {len(labels)} values but there are {gold_index.size} rows")
    group_array = np.asarray(labels, dtype=object)

    by_group: dict[str, dict[str, Any]] = {}
    by_group_label: dict[str, dict[str, Any]] = {}
    for group in sorted(set(labels)):
        in_group = group_array == group
        by_group[group] = {"n": int(np.sum(in_group)), "accuracy": _mean_or_none(correct[in_group])}
        for c, name in enumerate(names):
            cell = in_group & (gold_index == c)
            if np.any(cell):
                by_group_label[f"{group}/{name}"] = {"n": int(np.sum(cell)), "accuracy": _mean_or_none(correct[cell])}
    return {f"by_{key}": by_group, f"by_{key}_label": by_group_label}


def _is_number(value: Any) -> bool:
    """True for int/float scalars (numpy ones included) but not for bools, which are flags."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _aggregate_mapping(seeds: list[Mapping[str, Any]], path: str) -> dict[str, Any]:
    """Mirror the union of keys of ``seeds`` (first-seen order); a key missing from a seed counts as ``None``."""
    keys: dict[str, None] = {}
    for seed in seeds:
        keys.update(dict.fromkeys(seed))
    result: dict[str, Any] = {}
    for key in keys:
        values = [seed.get(key) for seed in seeds]
        present = [value for value in values if value is not None]
        where = f"{path}.{key}" if path else str(key)
        if not present:
            result[key] = None
        elif all(isinstance(value, Mapping) for value in present):
            result[key] = _aggregate_mapping(present, where)
        elif any(isinstance(value, Mapping) for value in present):
            raise DataError(
                f"metric {where!r} is a dict in some seeds and a value in others; "
                "aggregate only metrics produced by the same code"
            )
        elif all(_is_number(value) for value in present):
            result[key] = _summarise([float(value) for value in present])
        elif all(value == present[0] for value in present):
            result[key] = present[0]
        else:
            result[key] = values
    return result


def _summarise(values: list[float]) -> dict[str, Any]:
    """Mean, sample std, range and 95% t-interval half-width of one metric over seeds."""
    array = np.asarray(values, dtype=np.float64)
    n_seeds = array.size
    std = float(np.std(array, ddof=1)) if n_seeds > 1 else 0.0
    ci95 = None
    if n_seeds > 1:
        degrees_of_freedom = n_seeds - 1
        t_critical = _T_CRITICAL_95[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T_CRITICAL_95) else _Z_95
        ci95 = float(t_critical * std / math.sqrt(n_seeds))
    return {
        "mean": float(np.mean(array)),
        "std": std,
        "min": float(np.min(array)),
        "max": float(np.max(array)),
        "n_seeds": int(n_seeds),
        "ci95": ci95,
    }


def hans_ood_accuracy(
    metrics: Mapping[str, Any],
    *,
    entailment: str = "entailment",
    non_entailment: str = "non-entailment",
) -> dict[str, Any]:
    """HANS out-of-domain accuracy of any HANS set: the mean of its label-wise accuracies.

    HANS is balanced between its labels, so the mean of the two label accuracies (not the pooled
    accuracy) is what the lineage reports; a model that always answers one label scores 0.5. This holds
    for every subset (``hans-lo``, ``hans-sub``, ``hans-const``) and for the whole set; with a
    ``heuristic`` group the same number is also given per heuristic, from ``by_heuristic_label``.

    Returns:
        ``ood_accuracy`` (None if a label's accuracy is missing), ``ood_metric`` (what it is), and, with
        heuristic groups, ``ood_accuracy_by_heuristic`` mapping each heuristic to its label mean.
    """
    def label_mean(entries: Sequence[Any]) -> float | None:
        accuracies = [entry.get("accuracy") if isinstance(entry, Mapping) else None for entry in entries]
        if any(accuracy is None for accuracy in accuracies):
            return None
        return float(sum(accuracies) / len(accuracies))

    per_label = metrics.get("per_label", {})
    out: dict[str, Any] = {
        "ood_accuracy": label_mean([per_label.get(name) for name in (entailment, non_entailment)]),
        "ood_metric": "mean of the entailment and non-entailment accuracies",
    }
    heuristics = metrics.get("by_heuristic")
    if isinstance(heuristics, Mapping) and heuristics:
        by_label = metrics.get("by_heuristic_label", {})
        out["ood_accuracy_by_heuristic"] = {
            h: label_mean([by_label.get(f"{h}/{name}") for name in (entailment, non_entailment)]) for h in heuristics
        }
    return out
