"""Metrics of free-form answers: an extracted final answer's exact match, token F1, and their intervals.

Pure Python and numpy (no torch, no transformers), like ``scoring.metrics``. The conventions follow the
field's: GSM8K's final answer is the number after ``####`` (the reference solutions end so), else the
last number in the text, compared after removing thousands separators, a currency sign and a trailing
``.0`` (lm-eval's ``gsm8k`` "flexible-extract"); token F1 is SQuAD's (lower case, punctuation and the
articles a/an/the removed, bag-of-tokens overlap).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from icldistill.errors import ConfigError
from icldistill.scoring.bootstrap import bootstrap_interval

NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")
FINAL_MARK = re.compile(r"####\s*(-?[$]?\d[\d,]*(?:\.\d+)?)")
EXTRACTORS = ("gsm8k", "last-number", "regex", "none")
"""How a final answer is taken from a text: after ``####`` else the last number (``gsm8k``), the last
number, the first group of a user's regular expression, or the whole stripped text."""


@dataclass(frozen=True)
class Extractor:
    """A named way to take the final answer out of a text (``EXTRACTORS``); ``pattern`` for ``regex``."""

    kind: str = "gsm8k"
    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXTRACTORS:
            raise ConfigError(f"answer extractor {self.kind!r} is unknown; use one of {', '.join(EXTRACTORS)}.")
        if self.kind == "regex":
            if not self.pattern:
                raise ConfigError("the regex answer extractor needs a pattern (answer_pattern in the task file).")
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ConfigError(f"answer_pattern {self.pattern!r} is not a regular expression: {err}") from None

    def __call__(self, text: str) -> str | None:
        """The final answer in ``text`` (normalised when it is a number), or None when there is none."""
        if self.kind == "none":
            return text.strip()
        if self.kind == "regex":
            match = re.search(self.pattern or "", text)
            if match is None:
                return None
            return normalise_number((match.group(1) if match.groups() else match.group(0)).strip())
        if self.kind == "gsm8k":
            marked = FINAL_MARK.search(text)
            if marked:
                return normalise_number(marked.group(1))
        numbers = NUMBER.findall(text)
        return normalise_number(numbers[-1]) if numbers else None


def normalise_number(text: str) -> str:
    """``"$1,234.50"`` -> ``"1234.5"``, ``"7.0"`` -> ``"7"``; a text that is no number comes back stripped."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return text.strip()
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _squad_tokens(text: str) -> list[str]:
    lowered = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return [t for t in lowered.split() if t not in ("a", "an", "the")]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of two texts in [0, 1] (1 when both are empty after normalisation)."""
    pred, ref = _squad_tokens(prediction), _squad_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_interval(values: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (queries resampled; seeded): the one
    bootstrap (:func:`icldistill.scoring.bootstrap.bootstrap_interval`) on one run's values."""
    return bootstrap_interval(np.asarray(values, dtype=np.float64), resamples=resamples, seed=seed)


def score_answer(text: str, reference: str | None, extractor: Extractor) -> dict[str, Any]:
    """One answer's per-query record: its extracted answer and, with a reference, exact match and token F1.

    The reference goes through the same extractor (a GSM8K solution ends in ``#### N``); exact match
    compares the extracted answers, token F1 the extracted answer with the extracted reference.
    """
    answer = extractor(text)
    row: dict[str, Any] = {"answer": answer}
    if reference is not None:
        gold = extractor(reference)
        row["gold_answer"] = gold
        row["exact_match"] = float(answer is not None and gold is not None and answer == gold)
        row["token_f1"] = token_f1(answer or "", gold or "")
    return row


def generation_metrics(rows: Sequence[dict[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """A set's metrics from its per-query rows (``score_answer`` plus ``tokens``): means with intervals.

    ``exact_match`` and ``token_f1`` (with ``_ci95`` bootstrap intervals) only when references exist;
    ``answered`` is the share of answers from which a final answer could be extracted.
    """
    out: dict[str, Any] = {"n": len(rows)}
    if not rows:
        return out
    out["answered"] = float(np.mean([r.get("answer") is not None for r in rows]))
    lengths = [r["tokens"] for r in rows if "tokens" in r]
    if lengths:
        out["answer_tokens"] = float(np.mean(lengths))
    for name in ("exact_match", "token_f1"):
        values = [r[name] for r in rows if name in r]
        if values:
            out[name] = float(np.mean(values))
            out[f"{name}_ci95"] = list(mean_interval(values, seed=seed))
    return out
