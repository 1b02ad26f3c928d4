"""A sweep directory belongs to one experiment (issue 21, cases 1, 4 and 8): mixed, changed or broken cells."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from icldistill import cli
from icldistill.errors import ConfigError
from icldistill.experiments.grid import expand
from icldistill.experiments.results import aggregate, collect
from icldistill.experiments.sweep import run_cell, run_sweep, write_sweep_record

V0 = Path(__file__).resolve().parents[1] / "fixtures" / "v0"


def _spec(tiny_dirs, data_dir, **kw):
    return {"task": "mnli", "eval": ["mnli-m"], "student": str(tiny_dirs["student"]), "data_dir": str(data_dir),
            "limit": 4, "batch_size": 8, "dtype": "fp32", "device": "cpu", "shots": 2,
            "grid": {"method": ["icl-student"], "seed": [0, 1]}, **kw}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dirs, data_dir):
    root = tmp_path_factory.mktemp("sweep-a")
    experiment = expand(_spec(tiny_dirs, data_dir), source="a.yaml", output_dir=root)
    assert run_sweep(experiment, progress=False).finished
    return root


def test_a_second_experiment_in_the_same_directory_is_left_out_with_a_note(finished, tmp_path, tiny_dirs,
                                                                          data_dir, capsys):
    """Case 4: two sweeps with different experiment files split the cells; results averaged them silently."""
    root = tmp_path / "sweep"
    shutil.copytree(finished, root)
    other = expand(_spec(tiny_dirs, data_dir, limit=6), source="b.yaml", output_dir=root)
    with pytest.raises(ConfigError, match="run by another experiment"):
        run_sweep(other, progress=False)
    with pytest.raises(ConfigError, match="--overwrite"):  # a worker of B that reaches a cell A claimed
        run_cell(other.cells[0], progress=False)
    write_sweep_record(other)  # as if B started while A's cells were still running, and took over sweep.json
    runs = collect(root)
    assert set(runs["status"]) == {"other-experiment"}
    assert len(runs.attrs["notes"]) == 2 and "another experiment" in runs.attrs["notes"][0]
    table = aggregate(runs)
    assert table["n_seeds"].tolist() == [0] and table["n_failed"].tolist() == [2]
    assert cli.main(["results", str(root)]) == 0
    assert "another experiment" in capsys.readouterr().out


def test_an_unfinished_cell_does_not_resume_under_a_changed_experiment(finished, tmp_path, tiny_dirs, data_dir):
    """Case 1 (sweeps): an unfinished cell resumed after the experiment file changed recorded the new options."""
    root = tmp_path / "sweep"
    shutil.copytree(finished, root)
    cell = next((root / "cells").iterdir())
    record = json.loads((cell / "results.json").read_text())
    (cell / "results.json").write_text(json.dumps({**record, "status": "running", "seeds": {}}))  # killed mid-run
    with pytest.raises(ConfigError, match=r"running; limit: 4 -> 6"):
        run_sweep(expand(_spec(tiny_dirs, data_dir, limit=6), source="a.yaml", output_dir=root), progress=False)


def test_broken_records_are_named_and_do_not_count(tmp_path):
    """Case 8: an unreadable results.json vanished; a seed without a numeric metric still counted in n_seeds."""
    root = tmp_path / "sweep"
    shutil.copytree(V0 / "sweep", root)
    icl, pbft = sorted((root / "cells").iterdir())
    (icl / "results.json").write_text('{"method": "icl", "seeds": {')
    record = json.loads((pbft / "results.json").read_text())
    record["seeds"]["0"]["eval"]["mnli-m"]["accuracy"] = "n/a"
    (pbft / "results.json").write_text(json.dumps(record))
    runs = collect(root)
    by_cell = {c: set(part["status"]) for c, part in runs.groupby("cell")}
    assert by_cell[icl.name] == {"unreadable"}
    assert by_cell[pbft.name] == {"broken", "complete"}  # hans-lo still has its accuracy
    notes = " ".join(runs.attrs["notes"])
    assert str(icl / "results.json") in notes and "no numeric accuracy on mnli-m" in notes
    table = aggregate(runs).set_index(["method", "eval"])
    assert table.loc[("pbft", "mnli-m"), "n_seeds"] == 0 and table.loc[("pbft", "mnli-m"), "n_failed"] == 1
    assert math.isnan(table.loc[("pbft", "mnli-m"), "accuracy_mean"])
    assert table.loc[("icl-student", "mnli-m"), "n_failed"] == 1


@pytest.mark.parametrize("measured", [None, "whole", "after epoch 2 (resumed)"])
def test_a_resumed_seed_without_its_earlier_memory_is_left_out_of_the_peaks(tmp_path, measured):
    """A seed resumed after epoch 2 measured only what ran after the resume: its peaks are not reported as the
    training's (a record older than the "measured" field is judged by its resume alone)."""
    root = tmp_path / "sweep"
    shutil.copytree(V0 / "sweep", root)
    pbft = sorted((root / "cells").iterdir())[1]
    record = json.loads((pbft / "results.json").read_text())
    resources = record["seeds"]["0"]["resources"]
    resources["resumed_from_epoch"] = 2
    if measured is not None:
        resources["training"]["measured"] = measured
    (pbft / "results.json").write_text(json.dumps(record))
    runs = collect(root)
    rows = runs[runs["cell"] == pbft.name]
    left_out = measured != "whole"
    assert rows["train_peak_memory_mb"].isna().all() == left_out and rows["peak_memory_mb"].isna().all() == left_out
    assert rows["train_time_s"].notna().all()  # optimisation time is kept across resumes
    assert any("resumed after epoch 2" in n for n in runs.attrs["notes"]) == left_out
    if measured is None:  # the report says so where a reader looks for what ran
        assert cli.main(["report", str(root), "--output-dir", str(tmp_path / "rep")]) == 0
        assert f"- Note: {pbft}: seed 0 resumed after epoch 2" in (tmp_path / "rep" / "report.md").read_text()


def test_a_dead_workers_lock_on_another_host_is_taken_over_after_its_heartbeat_stops(tmp_path, monkeypatch):
    """Issue 21 case 10: a lock of another host was honoured forever, with no hint."""
    import os
    import time

    import icldistill.experiments.sweep as sweep

    lock_file = tmp_path / sweep.LOCK_FILE
    lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": time.time()}))
    assert not sweep.CellLock(tmp_path).acquire()  # alive as far as anyone here can tell
    assert "taken over 10 min after its last heartbeat" in sweep._describe(json.loads(lock_file.read_text()))
    old = time.time() - sweep.LOCK_TIMEOUT_S - 5
    os.utime(lock_file, (old, old))
    taker = sweep.CellLock(tmp_path)
    assert taker.acquire()
    # The new holder's heartbeat keeps its lock fresh for workers elsewhere.
    monkeypatch.setattr(sweep, "HEARTBEAT_S", 0.05)
    taker.release()
    beating = sweep.CellLock(tmp_path)
    assert beating.acquire()
    aged_at = time.time()
    os.utime(lock_file, (old, old))
    # The heartbeat (every 0.05 s here) sets the lock's time to now: wait for a refresh after the ageing
    # rather than timing it, so a busy machine that delays the thread cannot fail the test.
    deadline = time.time() + 30
    while lock_file.stat().st_mtime < aged_at and time.time() < deadline:
        time.sleep(0.05)
    assert lock_file.stat().st_mtime >= aged_at  # refreshed after it was aged: fresh again
    beating.release()
    assert not lock_file.exists()


def test_an_unwritable_sweep_or_cache_directory_fails_before_any_cell(tmp_path, tiny_dirs, data_dir):
    """Issue 21 case 13: output and cache directories are probed before any expensive work."""
    from icldistill.errors import IcldError

    blocker = tmp_path / "file"
    blocker.write_text("x")

    def runner(cell, progress):
        raise AssertionError("a cell ran")

    with pytest.raises(IcldError, match="--output-dir"):
        run_sweep(expand(_spec(tiny_dirs, data_dir), source="a.yaml", output_dir=blocker / "sweep"), runner=runner)
    spec = _spec(tiny_dirs, data_dir, cache_dir=str(blocker / "cache"))
    with pytest.raises(IcldError, match="cache_dir"):
        run_sweep(expand(spec, source="a.yaml", output_dir=tmp_path / "sweep"), runner=runner)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_cell_trained_with_gradient_checkpointing_is_named_where_memory_is_compared(tmp_path, checkpointing):
    """It is not part of the identity (the same numbers), so a sweep resumed with it mixes cells that paid
    different memory and time for them: the report says which."""
    root = tmp_path / "sweep"
    shutil.copytree(V0 / "sweep", root)
    pbft = sorted((root / "cells").iterdir())[1]
    record = json.loads((pbft / "results.json").read_text())
    record["config"]["gradient_checkpointing"] = checkpointing
    (pbft / "results.json").write_text(json.dumps(record))
    notes = collect(root).attrs["notes"]
    assert any(f"{pbft} trained with --gradient-checkpointing" in n for n in notes) == checkpointing
