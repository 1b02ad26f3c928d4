"""A run directory belongs to one run (issue 21, cases 1-3): resumes, moved runs and reused directories."""

from __future__ import annotations

import json
import shutil

import pytest

from icldistill.config import PbftOptions, build_config
from icldistill.errors import ConfigError
from icldistill.methods.evaluate import sources_of
from icldistill.methods.pbft import run_pbft
from icldistill.methods.trained import resolve_source


def _pbft(data_dir, model, output_dir, **kw):
    values = dict(model=str(model), task="mnli", eval=["mnli-m"], shots=2, seeds=[0], limit=6, batch_size=8,
                  data_dir=str(data_dir), output_dir=str(output_dir), epochs=1, lr=1e-2, train_batch_size=2,
                  warmup_ratio=0.0, lora_dropout=0.0, dtype="fp32", device="cpu", eval_every=-1, dev_queries=0)
    values.update(kw)
    return build_config(PbftOptions, values)


def _on_disk(path):
    return json.loads(path.read_text())


def test_resume_with_changed_options_is_refused_not_relabelled(tmp_path, data_dir, tiny_dirs):
    """Case 1: --resume with other epochs/lr used to print "seed 0 already complete" and relabel old numbers."""
    out = tmp_path / "r"
    first = run_pbft(_pbft(data_dir, tiny_dirs["student"], out, resume=True), progress=False)
    changed = r"holds a pbft run with other options \(epochs: 1 -> 2; lr: 0\.01 -> 0\.05\)"
    with pytest.raises(ConfigError, match=changed):
        run_pbft(_pbft(data_dir, tiny_dirs["student"], out, resume=True, epochs=2, lr=5e-2), progress=False)
    assert _on_disk(out / "results.json")["config"]["lr"] == 0.01  # the refused run changed nothing
    again = run_pbft(_pbft(data_dir, tiny_dirs["student"], out, resume=True), progress=False)  # the same run resumes
    assert again["seeds"]["0"]["eval"] == first["seeds"]["0"]["eval"]
    replaced = run_pbft(_pbft(data_dir, tiny_dirs["student"], out, resume=True, epochs=2, lr=5e-2, overwrite=True),
                        progress=False)
    record = _on_disk(out / "results.json")
    assert record["config"]["epochs"] == 2 and record["status"] == "complete"
    assert record["seeds"]["0"]["resources"]["epochs_done"] == 2  # trained again, not reused
    assert replaced["identity"] == record["identity"] == _on_disk(out / "seed-0" / "seed_result.json")["identity"]
    assert record["identity"] != first["identity"]


def test_a_moved_run_loads_its_own_adapter_from_anywhere(tmp_path, data_dir, tiny_dirs, monkeypatch):
    """Case 2: artefact paths were relative to the working directory; a moved run exported another run's adapter."""
    monkeypatch.chdir(tmp_path)
    run_pbft(_pbft(data_dir, tiny_dirs["student"], "runs/latest"), progress=False)
    assert _on_disk(tmp_path / "runs/latest/seed-0/seed_result.json")["artefacts"] == {"adapter": "adapter"}
    shutil.move("runs/latest", "runs/old")
    run_pbft(_pbft(data_dir, tiny_dirs["student"], "runs/latest", lr=5e-2), progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    old = resolve_source(str(tmp_path / "runs/old/seed-0"))
    assert old.record.artefact("adapter") == tmp_path / "runs/old/seed-0/adapter"
    assert old.run.config["lr"] == 0.01
    new = resolve_source(str(tmp_path / "runs/latest"))
    assert new.record.artefact("adapter") == tmp_path / "runs/latest/seed-0/adapter" and new.run.config["lr"] == 0.05


def test_a_reused_directory_never_mixes_runs(tmp_path, data_dir, tiny_dirs):
    """Case 3: a 2-seed run, then a 1-seed run with another lr: eval used to evaluate both seed directories."""
    out = tmp_path / "r"
    run_pbft(_pbft(data_dir, tiny_dirs["student"], out, seeds=[0, 1]), progress=False)
    with pytest.raises(ConfigError, match="--overwrite"):
        run_pbft(_pbft(data_dir, tiny_dirs["student"], out, lr=5e-2), progress=False)
    run_pbft(_pbft(data_dir, tiny_dirs["student"], out, lr=5e-2, overwrite=True), progress=False)
    assert not (out / "seed-1").exists()
    assert [s.seed for s in sources_of(str(out))] == [0]
    # The same run with fewer seeds: seed-1 stays on disk from the earlier run but is not this run's.
    run_pbft(_pbft(data_dir, tiny_dirs["student"], out, seeds=[0, 1], lr=5e-2, overwrite=True), progress=False)
    run_pbft(_pbft(data_dir, tiny_dirs["student"], out, seeds=[0], lr=5e-2, resume=True), progress=False)
    assert (out / "seed-1" / "seed_result.json").is_file()
    assert [s.seed for s in sources_of(str(out))] == [0]
    assert {json.loads(line)["seed"] for line in (out / "predictions.jsonl").read_text().splitlines()} == {0}


def test_a_rerun_claims_the_directory_before_it_trains(tmp_path, data_dir, tiny_dirs, monkeypatch):
    """Case 3, killed re-run: the old results.json must not stay beside the new run's artefacts."""
    out = tmp_path / "r"
    run_pbft(_pbft(data_dir, tiny_dirs["student"], out), progress=False)
    import icldistill.methods.pbft as pbft

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pbft, "train_and_evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pbft(_pbft(data_dir, tiny_dirs["student"], out, lr=5e-2, overwrite=True), progress=False)
    record = _on_disk(out / "results.json")
    assert record["status"] == "running" and record["config"]["lr"] == 0.05 and not record["seeds"]
    assert not (out / "seed-0").exists()


def test_the_recorded_wall_time_covers_the_whole_run(tmp_path, data_dir, tiny_dirs):
    """Issue 23 item 9: the total wall time was the training time alone."""
    record = run_pbft(_pbft(data_dir, tiny_dirs["student"], tmp_path / "r"), progress=False)
    total = record["resources"]["total"]
    assert total["wall_time_s"] > total["training_wall_time_s"] > 0
    assert total["wall_time_s"] >= record["seeds"]["0"]["resources"]["training"]["wall_time_s"]


def test_gradient_checkpointing_is_not_part_of_a_runs_identity(tmp_path, data_dir, tiny_dirs):
    """It trades memory for compute with the same numbers, so a run resumed with it switched on is the same run
    (a user who ran out of memory turns it on and resumes): it is recorded, and nothing is retrained."""
    out = tmp_path / "r"
    first = run_pbft(_pbft(data_dir, tiny_dirs["student"], out, resume=True), progress=False)
    again = run_pbft(_pbft(data_dir, tiny_dirs["student"], out, resume=True, gradient_checkpointing=True),
                     progress=False)
    assert again["identity"] == first["identity"]
    assert again["seeds"]["0"]["eval"] == first["seeds"]["0"]["eval"]
