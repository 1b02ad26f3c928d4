"""ICL, PBFT and distillation on a 3-class task file with tiny models (issue 10): nothing assumes two classes."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from icldistill.config import DistillOptions, IclOptions, PbftOptions, build_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tickets"
TINY_TASK = """\
base: tickets.yaml
patterns:
  tiny:  # single tokens of the tiny test tokenizer
    template: "{text} question: answer:"
    label_words: [" Yes", " No", " True"]
default_pattern: tiny
"""


@pytest.fixture
def task_file(tmp_path: Path) -> str:
    for name in ("tickets.yaml", "tickets.csv"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    (tmp_path / "tiny.yaml").write_text(TINY_TASK, encoding="utf-8")
    return str(tmp_path / "tiny.yaml")


def _values(tmp_path: Path, task_file: str, **kw) -> dict:
    base = dict(task=task_file, shots=3, seeds=[0], limit=12, batch_size=8, output_dir=str(tmp_path / "out"),
                dtype="fp32", device="cpu")
    return {**base, **kw}


def test_icl_on_three_classes(tmp_path, task_file, tiny_dirs):
    from icldistill.methods.icl import run_icl

    record = run_icl(build_config(IclOptions, _values(tmp_path, task_file, model=str(tiny_dirs["teacher"]))),
                     progress=False)
    metrics = record["seeds"]["0"]["eval"]["test"]
    assert record["classes"] == ["billing", "technical", "account"]
    assert metrics["n"] == 12 and metrics["chance_rate"] == pytest.approx(1 / 3)
    assert sum(sum(r.values()) for r in metrics["confusion"].values()) == 12
    assert set(metrics["prediction_rate"]) == set(record["classes"])
    assert math.isclose(sum(metrics["prediction_rate"].values()), 1.0)


def test_distill_and_pbft_train_over_three_classes(tmp_path, task_file, tiny_dirs, cache_dir):
    from icldistill.methods.distill import run_distill
    from icldistill.methods.pbft import run_pbft

    train = dict(epochs=3, lr=1e-2, train_batch_size=4, warmup_ratio=0.0, lora_dropout=0.0, eval_every=-1)
    distill = run_distill(build_config(DistillOptions, _values(
        tmp_path, task_file, teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["student"]),
        train_queries=12, alpha=1.0, **train)), progress=False)
    seed = distill["seeds"]["0"]
    kls = [h["train_kl"] for h in seed["history"]]
    assert kls[-1] < kls[0], kls  # the student moves toward the teacher's 3-way distribution
    assert seed["eval"]["test"]["n"] == 12 and len(seed["eval"]["test"]["per_label"]) == 3
    pbft = run_pbft(build_config(PbftOptions, _values(tmp_path, task_file, model=str(tiny_dirs["student"]),
                                                      output_dir=str(tmp_path / "pbft"), shots=6, **train)),
                    progress=False)
    assert pbft["status"] == "complete" and len(pbft["seeds"]["0"]["train_examples"]) == 6
