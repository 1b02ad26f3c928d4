"""Generation distillation on real weights: each signal trains a step with Qwen2.5-Coder-0.5B as both the
teacher (with a demonstration in its chat context) and the student (the query alone), on GSM8K rows."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from icldistill.config import GenDistillOptions, build_config
from icldistill.methods.gen_distill import run_gen_distill


def _qwen() -> str:
    """The fetched 0.5B: $ICLDISTILL_QWEN_05B, else its packaged directory in the cache (skipped when absent)."""
    given = os.environ.get("ICLDISTILL_QWEN_05B")
    path = Path(given) if given else Path.home() / ".cache" / "icldistill" / "models" / "qwen2.5-coder-0.5b"
    if not (path / "config.json").is_file():
        pytest.skip(f"qwen2.5-coder-0.5b is not fetched ({path}); set $ICLDISTILL_QWEN_05B to its directory")
    return str(path)


@pytest.mark.slow
def test_each_signal_trains_on_real_weights(tmp_path, data_dir):
    model = _qwen()
    for signal in ("token", "sequence", "on-policy", "reference"):
        out = tmp_path / signal
        config = build_config(GenDistillOptions, dict(
            teacher=model, student=model, signal=signal, task="gsm8k", shots=1, seeds=[0], limit=2, batch_size=2,
            max_new_tokens=16, data_dir=str(data_dir), output_dir=str(out), dtype="fp32", device="cpu",
            train_queries=2, dev_queries=0, max_steps=1, train_batch_size=1, lr=1e-3, warmup_ratio=0.0,
            teacher_topk=16,
            cache_dir=str(tmp_path / "cache")))
        # The evaluation sets once (the same for every signal; decoding them is most of a signal's cost on CPU).
        scored = signal == "sequence"
        record = run_gen_distill(config, progress=False, score_eval_sets=scored)
        seed = record["seeds"]["0"]
        assert record["status"] == "complete" and seed["resources"]["steps"] == 1, signal
        assert math.isfinite(seed["history"][-1]["train_loss"]) and seed["history"][-1]["train_loss"] >= 0, signal
        state = load_file(str(out / "seed-0" / "adapter" / "adapter_model.safetensors"))
        assert sum(float(t.abs().sum()) for n, t in state.items() if "lora_B" in n) > 0, signal
        if scored:
            assert seed["eval"]["gsm8k"]["n"] == 2 and seed["resources"]["inference"]["queries"] == 2
        if signal == "on-policy":
            assert seed["on_policy_draws"] == 1
        if signal in ("sequence", "token"):
            assert seed["teacher_pass"]["answers"]["n"] == 2 and seed["teacher_pass"]["answers"]["mean_tokens"] > 0
            # sequence reads the answers token's pass cached: the teacher is not loaded again.
            assert record["resources"]["teacher_pass"]["teacher_loaded"] == (signal == "token")
