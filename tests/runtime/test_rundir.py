"""The run directory writer and its typed records: identity, claims, migration, relative artefact paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from icldistill.errors import ConfigError, IcldError
from icldistill.runtime.rundir import (
    RECORD_VERSION,
    RESULTS_FILE,
    RunDir,
    RunRecord,
    SeedRecord,
    _artefact_path,
    migrate_run,
    probe_writable,
    run_identity,
)

V0 = Path(__file__).resolve().parents[1] / "fixtures" / "v0"


def _record(method="pbft", seeds=(0, 1), **config):
    options = {"lr": 0.01, "epochs": 3, "output_dir": "x", "seeds": list(seeds), **config}
    return {"version": RECORD_VERSION, "method": method, "status": "running",
            "identity": run_identity(method, options), "planned_seeds": list(seeds), "config": options}


def test_identity_ignores_where_files_are_and_sees_what_shapes_the_numbers():
    base = {"lr": 0.01, "epochs": 3, "output_dir": "a", "cache_dir": None, "seeds": [0], "resume": False}
    moved = {**base, "output_dir": "b", "cache_dir": "/c", "seeds": [0, 1, 2], "resume": True}
    assert run_identity("pbft", base) == run_identity("pbft", moved)
    assert run_identity("pbft", base) != run_identity("pbft", {**base, "lr": 0.05})
    assert run_identity("pbft", base) != run_identity("distill", base)


@given(st.dictionaries(st.sampled_from(["lr", "epochs", "alpha", "shots"]), st.integers(0, 5), min_size=1),
       st.sampled_from(["lr", "epochs", "alpha", "shots"]), st.integers(6, 9))
def test_any_change_of_a_shaping_option_changes_the_identity(config, key, value):
    assert run_identity("distill", config) != run_identity("distill", {**config, key: value})


def test_claim_refuses_another_run_unless_overwrite(tmp_path):
    run = RunDir(tmp_path / "r")
    run.claim(_record())
    (run.seed_dir(1)).mkdir()
    run.claim(_record(output_dir="elsewhere"))  # the same run again (e.g. --resume): accepted
    with pytest.raises(ConfigError, match=r"lr: 0\.01 -> 0\.05.*--overwrite"):
        run.claim(_record(lr=0.05))
    assert run.seed_dir(1).is_dir()  # nothing deleted by a refusal
    (run.path / "eval-hans-lo").mkdir()  # an evaluation of the run being replaced
    run.claim(_record(lr=0.05, seeds=(0,)), overwrite=True)
    assert not run.seed_dir(1).exists() and not (run.path / "eval-hans-lo").exists()
    claimed = run.read()
    assert claimed.status == "running" and claimed.planned_seeds == [0] and claimed.config["lr"] == 0.05


def test_claim_refuses_seeds_another_run_trained(tmp_path):
    run = RunDir(tmp_path / "r")
    (run.seed_dir(1)).mkdir(parents=True)  # a seed of a run killed before any record (kept: resumable)
    (run.seed_dir(0)).mkdir(parents=True)
    run.seed_result_path(0).write_text(json.dumps({"seed": 0, "identity": "0123456789abcdef"}))
    with pytest.raises(ConfigError, match=r"seeds of another run \(seed-0\).*--overwrite"):
        run.claim(_record())
    run.seed_result_path(0).write_text(json.dumps({"seed": 0, "identity": _record()["identity"]}))
    run.claim(_record())  # this run's own seed: resumable


def test_duplicate_seeds_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--seeds 0,0 names seed 0 more than once"):
        RunDir(tmp_path / "r").claim(_record(seeds=(0, 0)))
    assert not (tmp_path / "r").exists()


def test_unwritable_directories_fail_before_any_work_naming_the_option(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(IcldError, match=r"--cache-dir .*file.* choose another --cache-dir"):
        probe_writable(blocker, "--cache-dir")
    with pytest.raises(IcldError, match="--output-dir"):
        RunDir(blocker / "run").claim(_record())
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        with pytest.raises(IcldError, match="not a writable directory"):
            probe_writable(locked, "--output-dir")


def test_an_unreadable_record_is_an_error_naming_the_file(tmp_path):
    run = RunDir(tmp_path)
    run.results_path.write_text('{"method": "pbft", "seeds": ')
    with pytest.raises(IcldError, match=f"{RESULTS_FILE}.*--overwrite"):
        run.read()
    with pytest.raises(IcldError):
        run.claim(_record())
    run.claim(_record(), overwrite=True)
    assert run.read().status == "running"


def test_artefacts_are_written_relative_to_their_seed_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunDir("runs/latest")
    run.claim(_record(seeds=(3,)))
    run.write_seed(3, {"seed": 3, "method": "pbft", "status": "complete", "identity": "x", "eval": {},
                       "artefacts": {"adapter": "runs/latest/seed-3/adapter",
                                     "merged": str(tmp_path / "runs/latest/seed-3/merged")}})
    on_disk = json.loads(run.seed_result_path(3).read_text())
    assert on_disk["artefacts"] == {"adapter": "adapter", "merged": "merged"}
    (tmp_path / "runs/latest").rename(tmp_path / "moved")
    seed = RunDir(tmp_path / "moved").read_seed(3)
    assert seed.artefact("adapter") == tmp_path / "moved" / "seed-3" / "adapter"


@pytest.mark.parametrize("recorded, expected", [
    ("adapter", "adapter"),  # version 1
    ("runs/latest/seed-0/adapter", "adapter"),  # version 0, relative to where the command ran
    ("/home/u/exp/runs/latest/seed-0/trainable.safetensors", "trainable.safetensors"),  # version 0, absolute
    ("runs/seed-0/x/seed-0/adapter", "adapter"),  # the last seed-N component is the seed directory
])
def test_artefact_paths_of_every_version_resolve_inside_the_seed_directory(tmp_path, recorded, expected):
    seed_dir = tmp_path / "old" / "seed-0"
    assert _artefact_path(seed_dir, recorded) == seed_dir / expected


def test_v0_records_migrate_to_the_identity_a_new_run_computes():
    data = json.loads((V0 / "pbft" / RESULTS_FILE).read_text())
    assert "version" not in data and "identity" not in data
    record = RunRecord.from_dict(data, V0 / "pbft")
    assert record.version == 0 and record.planned_seeds == [0, 1] and record.finished_seeds() == ["0", "1"]
    assert record.identity == run_identity("pbft", data["config"])
    seed = record.seed_record(1)
    assert seed.artefact("adapter") == V0 / "pbft" / "seed-1" / "adapter"
    assert (seed.artefact("adapter") / "adapter_config.json").is_file()
    again = RunRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again.identity == record.identity and again.version == 0 and again.seeds == record.seeds
    with pytest.raises(ValueError):
        migrate_run([])
    foreign = migrate_run({"status": "complete", "config": {"lr": 1}, "seeds": {}})  # no method: identity unknown
    assert foreign["identity"] is None and foreign["method"] == ""


def test_held_seeds_come_from_the_record_not_the_directory(tmp_path):
    run = RunDir(tmp_path)
    first = _record(seeds=(0, 1))
    run.claim(first)
    for seed in (0, 1):
        run.write_seed(seed, {"seed": seed, "method": "pbft", "status": "complete", "identity": first["identity"],
                              "eval": {"x": {"accuracy": 1.0}}, "artefacts": {}})
    # While running: the planned seeds finished by this run.
    assert [s.seed for s in run.held_seeds(run.read())] == [0, 1]
    again = _record(seeds=(0,))
    run.claim(again)
    run.write({**again, "status": "complete", "seeds": {"0": {"eval": {"x": {"accuracy": 1.0}}}}})
    assert [s.seed for s in run.held_seeds(run.read())] == [0]  # seed-1 is on disk but not this run's


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    from icldistill.runtime import distributed

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    run = RunDir(tmp_path / "r")
    run.write(_record())
    run.write_seed(0, {"seed": 0})
    run.write_predictions([{"seed": 0}])
    assert not (tmp_path / "r").exists()


def test_seed_record_round_trip():
    seed = SeedRecord.from_dict({"seed": "2", "method": "distill", "status": "complete", "identity": "abc",
                                 "eval": {"m": {"accuracy": 0.5}}, "artefacts": {"adapter": "adapter"},
                                 "history": [1, 2]}, Path("/r/seed-2"))
    assert seed.seed == 2 and seed.fields == {"history": [1, 2]}
    assert SeedRecord.from_dict(seed.to_dict()).to_dict() == seed.to_dict()
    assert seed.artefact("adapter") == Path("/r/seed-2/adapter") and seed.artefact("merged") is None
