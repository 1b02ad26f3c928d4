"""Slow: TREC 6-way ICL with the real SmolLM2-135M through the task-file path (issue 10).

The `question` pattern's label words are single tokens for SmolLM2, so this runs on the single-token
fast path; multi-token words are the scoring issue's (TREC's `capitalised` pattern).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icldistill.config import IclOptions, build_config
from icldistill.methods.icl import run_icl

pytestmark = pytest.mark.slow


def test_trec_six_way_icl_with_smollm2(tmp_path: Path, data_dir: Path) -> None:
    config = build_config(IclOptions, {"task": "trec", "model": "smollm2-135m", "shots": 6, "seeds": [0],
                                       "limit": 36, "batch_size": 12, "data_dir": str(data_dir),
                                       "output_dir": str(tmp_path)})
    record = run_icl(config, progress=False)
    assert record["status"] == "complete" and len(record["classes"]) == 6
    metrics = record["seeds"]["0"]["eval"]["trec"]
    assert metrics["n"] == 36 and metrics["chance_rate"] == pytest.approx(1 / 6)
    assert set(metrics["confusion"]) == set(record["classes"])
    assert sum(sum(row.values()) for row in metrics["confusion"].values()) == 36
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["macro_f1"] is not None
    demos = record["seeds"]["0"]["demonstrations"]
    assert len(demos) == 6
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 36 and all(len(p["label_logprobs"]) == 6 for p in predictions)
    # a real model with 6 demonstrations beats answering one class for everything on some class
    assert len({p["pred"] for p in predictions}) > 1
