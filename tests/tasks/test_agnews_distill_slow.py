"""Slow: distillation gemma3-270m -> smollm2-135m on AG News (4 classes) with label words of several
tokens (the `phrase` pattern: ' world news', ' science and technology'), across two tokenizers (issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from icldistill.config import DistillOptions, build_config
from icldistill.methods.distill import run_distill

pytestmark = pytest.mark.slow


def test_agnews_distillation_with_multi_token_words(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    config = build_config(DistillOptions, {
        "task": "agnews", "pattern": "phrase", "teacher": "gemma3-270m", "student": "smollm2-135m", "shots": 4,
        "seeds": [0], "train_queries": 8, "dev_queries": 4, "limit": 12, "max_steps": 4, "train_batch_size": 4,
        "lr": 1e-3, "warmup_ratio": 0.0, "eval_every": -1, "batch_size": 12, "data_dir": str(data_dir),
        "output_dir": str(tmp_path / "run"), "dtype": "fp32", "device": "cpu"})
    record = run_distill(config, progress=False)
    seed = record["seeds"]["0"]
    metrics = seed["eval"]["agnews"]
    assert record["status"] == "complete" and record["classes"] == ["world", "sports", "business", "sci-tech"]
    assert metrics["n"] == 12 and metrics["chance_rate"] == pytest.approx(0.25)
    # ' world news' and ' science and technology' are several tokens for both models: full-vocabulary accuracy
    # is read on the first token, and the record says so.
    assert metrics["full_vocab_basis"] in ("first_token", "not_applicable")
    steps = [h["train_loss"] for h in seed["history"] if "train_loss" in h]
    assert seed["resources"]["steps"] == 4 and len(steps) >= 1
    assert seed["history"][-1]["train_kl"] is not None  # the KL over the 4-class label distribution was trained
    # The answers written are the record's: accuracy from predictions.jsonl equals the metric.
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(len(r["label_logprobs"]) == 4 for r in rows)
    accuracy = np.mean([int(np.argmax(r["label_logprobs"])) == r["gold"] for r in rows])
    assert accuracy == pytest.approx(metrics["accuracy"])
