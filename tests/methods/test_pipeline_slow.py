"""Slow: a distilled SmolLM2-135M student exported, reloaded with plain transformers and used on SST-2 rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icldistill.config import DistillOptions, PredictOptions, build_config

pytestmark = pytest.mark.slow


def test_distilled_smollm2_exports_and_predicts_sst2(tmp_path, data_dir):
    from icldistill.methods.distill import run_distill
    from icldistill.methods.export import export_run
    from icldistill.methods.predict import run_predict

    # Self-distillation with an online teacher (no teacher-signal cache written), a tiny budget.
    config = build_config(DistillOptions, dict(
        teacher="smollm2-135m", student="smollm2-135m", task="sst2", eval=["sst2"], shots=4, train_queries=8,
        limit=8, epochs=1, lr=1e-3, train_batch_size=4, warmup_ratio=0.0, seeds=[0], eval_every=-1,
        teacher_signal="online", data_dir=str(data_dir), dtype="fp32", device="cpu", batch_size=8,
        output_dir=str(tmp_path / "cd")))
    record = run_distill(config, progress=False)
    assert record["status"] == "complete"
    out = tmp_path / "export"
    export_run(str(tmp_path / "cd" / "seed-0"), out)
    assert (out / "model.safetensors").is_file()
    assert "Apache-2.0" in (out / "README.md").read_text()

    scored = [json.loads(line) for line in (tmp_path / "cd" / "predictions.jsonl").read_text().splitlines()]
    assert len(scored) == 8
    from icldistill.tasks import data as data_mod
    from icldistill.tasks.registry import get_eval_set, get_task

    rows = {ex.id: ex for ex in data_mod.load(get_eval_set("sst2", get_task("sst2")), data_dir).examples}
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"id": r["id"], "sentence": rows[r["id"]].fields["sentence"]}) + "\n"
                              for r in scored))
    # predict loads the export with plain AutoModelForCausalLM.from_pretrained (a local directory)
    summary = run_predict(build_config(PredictOptions, dict(model=str(out), input=str(source), device="cpu",
                                                            output=str(tmp_path / "answers.jsonl"))), progress=False)
    assert summary["task"] == "sst2" and summary["scored"] == 8 and summary["label_words"] == [" positive", " negative"]
    answers = {json.loads(line)["id"]: json.loads(line)
               for line in (tmp_path / "answers.jsonl").read_text().splitlines()}
    for r in scored:  # the exported model answers as the run's student did in its final evaluation
        assert answers[r["id"]]["pred"] == r["pred"]
        assert np.allclose(answers[r["id"]]["label_logprobs"], r["label_logprobs"], atol=1e-4)
