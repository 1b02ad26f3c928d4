"""The CD variants of a study share one cached teacher pass (issue 20): label KL, vocabulary KL and the
label-free CE target score the same teacher, demonstrations and queries, so the second and third runs find the
first one's signal in the cache, and it carries the top-k that the vocabulary KL needs.
"""

from __future__ import annotations

import pytest

from icldistill.config import DistillOptions, build_config


@pytest.mark.parametrize("first", ["label", "vocab"])
def test_label_and_vocab_kl_runs_share_one_teacher_pass(first, tiny_dirs, data_dir, cache_dir, tmp_path):
    from icldistill.methods.distill import run_distill

    def run(name: str, **options: object) -> dict:
        values = dict(teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["student"]), task="mnli",
                      eval=["mnli-m"], shots=4, seeds=[0], limit=4, batch_size=8, data_dir=str(data_dir),
                      output_dir=str(tmp_path / name), max_steps=1, train_queries=4, train_batch_size=4,
                      warmup_ratio=0.0, dtype="fp32", device="cpu", dev_queries=4, eval_every=-1, teacher_topk=16)
        return run_distill(build_config(DistillOptions, {**values, **options}), progress=False)

    second = "vocab" if first == "label" else "label"
    records = [run("a", kl_space=first), run("b", kl_space=second), run("c", kl_space="label", ce_target="teacher")]
    passes = [r["teacher_pass"] for r in records]
    assert passes[0]["cache_hits"] == 0 and passes[0]["teacher_loaded"]
    for later in passes[1:]:
        assert later["keys"] == passes[0]["keys"]
        assert later["cache_hits"] == 1 and not later["teacher_loaded"]  # the teacher was not even loaded
    assert all(r["status"] == "complete" for r in records)
    assert [r["config"]["kl_space"] for r in records] == [first, second, "label"]
