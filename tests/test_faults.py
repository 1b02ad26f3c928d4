"""Faults: full disks, unwritable directories, SIGKILL at random points, Ctrl-C.

A finished result is never lost or half-written, a killed run resumes, and the resumed result equals
the uninterrupted one (fp32 on CPU is deterministic). The kill loops run real subprocesses and are
marked slow; ``make test`` runs them.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from icldistill.cli import main
from icldistill.errors import IcldError
from icldistill.runtime.records import atomic_write_json


def test_full_disk_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"complete": True})
    real_fsync = os.fsync

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(IcldError, match="No space left on device.*Free disk space"):
        atomic_write_json(target, {"complete": False, "big": "x" * 10_000})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(target.read_text()) == {"complete": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_unwritable_output_directory_is_a_clear_error(tmp_path, data_dir, tiny_dirs, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code = main(["-q", "icl", "--model", str(tiny_dirs["student"]), "--eval", "mnli-m", "--shots", "2", "--seeds", "0",
                 "--limit", "2", "--data-dir", str(data_dir), "--output-dir", str(blocker / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--output-dir" in err and "Traceback" not in err


# --------------------------------------------------------------------------- kills in real subprocesses


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    # SIGINT back to its default: a test suite started in the background by a script (``cmd &``) inherits
    # SIGINT ignored (POSIX), and Python then installs no KeyboardInterrupt handler, so Ctrl-C would do nothing.
    return subprocess.Popen([sys.executable, "-m", "icldistill.cli", "-q", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _env(cache_dir: Path) -> dict[str, str]:
    return dict(os.environ, ICLDISTILL_CACHE=str(cache_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _check_no_partial_files(root: Path) -> None:
    """Every results file that exists is complete JSON: a kill never leaves half a file."""
    for path in list(root.rglob("*.json")) + list(root.rglob("*.jsonl")):
        if path.name.startswith("."):
            continue  # temporary files of an interrupted write, never read
        text = path.read_text()
        if path.suffix == ".jsonl":
            for line in text.splitlines():
                json.loads(line)
        else:
            json.loads(text)


def _kill_until_done(args: list[str], out: Path, env: dict[str, str], rng: random.Random, kills: int) -> int:
    """Start ``args`` repeatedly, SIGKILL it after a random delay, until it finishes on its own."""
    killed = 0
    for _ in range(kills + 10):
        proc = _cli(args, env)
        if killed < kills:
            try:
                proc.wait(timeout=rng.uniform(3.0, 9.0))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed += 1
                _check_no_partial_files(out)
                continue
        else:
            proc.wait(timeout=600)
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-2000:]
        return killed
    raise AssertionError("the run never finished")


def _metrics(path: Path) -> dict:
    record = json.loads((path / "results.json").read_text())
    assert record["status"] == "complete"
    return {seed: entry["eval"] for seed, entry in record["seeds"].items()}


@pytest.mark.slow
def test_training_killed_at_random_points_resumes_to_the_same_result(tmp_path, data_dir, tiny_dirs, cache_dir):
    common = ["--model", str(tiny_dirs["student"]), "--eval", "mnli-m", "--shots", "8", "--seeds", "0,1",
              "--limit", "8", "--epochs", "6", "--lr", "1e-2", "--train-batch-size", "2", "--data-dir", str(data_dir),
              "--dtype", "fp32", "--device", "cpu", "--resume"]
    env = _env(cache_dir)
    reference = _cli(["pbft", *common, "--output-dir", str(tmp_path / "ref")], env)
    assert reference.wait(timeout=600) == 0, reference.communicate()[1][-2000:]
    killed = _kill_until_done(["pbft", *common, "--output-dir", str(tmp_path / "killed")], tmp_path / "killed", env,
                              random.Random(1), kills=4)
    assert killed >= 1
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "ref")


@pytest.mark.slow
def test_distillation_killed_during_the_teacher_pass_and_training(tmp_path, data_dir, tiny_dirs, cache_dir):
    common = ["--teacher", str(tiny_dirs["teacher"]), "--student", str(tiny_dirs["student"]), "--eval", "mnli-m",
              "--shots", "4", "--seeds", "0", "--limit", "8", "--train-queries", "64", "--teacher-contexts", "3",
              "--epochs", "3", "--lr", "1e-2", "--train-batch-size", "4", "--batch-size", "2", "--data-dir",
              str(data_dir), "--dtype", "fp32", "--device", "cpu", "--resume"]
    reference = _cli(["distill", *common, "--output-dir", str(tmp_path / "ref")], _env(tmp_path / "ref-cache"))
    assert reference.wait(timeout=600) == 0, reference.communicate()[1][-2000:]
    env = _env(cache_dir)
    _kill_until_done(["distill", *common, "--output-dir", str(tmp_path / "killed")], tmp_path / "killed", env,
                     random.Random(2), kills=4)
    _check_no_partial_files(cache_dir)
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "ref")


@pytest.mark.slow
def test_sweep_killed_resumes_only_the_missing_cells(tmp_path, data_dir, tiny_dirs, cache_dir):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"name: faults\noutput_dir: {tmp_path / 'sweep'}\ndata_dir: {data_dir}\neval: [mnli-m]\nlimit: 6\n"
        f"teacher: {tiny_dirs['teacher']}\nstudent: {tiny_dirs['student']}\nepochs: 2\ntrain_queries: 4\n"
        "dtype: fp32\ndevice: cpu\ngrid:\n  method: [icl-teacher, pbft, distill]\n  shots: [2]\n  seed: [0, 1]\n")
    env = _env(cache_dir)
    _kill_until_done(["sweep", str(spec)], tmp_path / "sweep", env, random.Random(3), kills=3)
    cells = sorted((tmp_path / "sweep" / "cells").iterdir())
    assert len(cells) == 6
    assert all(json.loads((c / "results.json").read_text())["status"] == "complete" for c in cells)
    # A second run finds nothing to do.
    again = _cli(["sweep", str(spec)], env)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "6 done before; 0 to run" in out or "[6/6] done before" in out


@pytest.mark.slow
def test_ctrl_c_exits_cleanly_and_the_run_resumes(tmp_path, data_dir, tiny_dirs, cache_dir):
    # 400 epochs: a run that may end before the signal lands (a loaded machine can delay this process for
    # seconds after the first checkpoint) would test nothing; SIGINT stops it after the first few (_cli
    # makes sure the child handles SIGINT even when this suite runs as a background job).
    args = ["pbft", "--model", str(tiny_dirs["student"]), "--eval", "mnli-m", "--shots", "8", "--seeds", "0",
            "--limit", "8", "--epochs", "400", "--lr", "1e-3", "--train-batch-size", "2", "--data-dir", str(data_dir),
            "--dtype", "fp32", "--device", "cpu", "--output-dir", str(tmp_path / "run"), "--resume"]
    env = _env(cache_dir)
    proc = _cli(args, env)
    checkpoint = tmp_path / "run" / "seed-0" / "checkpoint"
    deadline = time.monotonic() + 120
    while not (checkpoint / "trainer_state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    _check_no_partial_files(tmp_path / "run")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert 1 <= state["epochs_done"] < 400


def test_a_busy_cell_says_how_to_proceed_when_its_worker_is_gone(tmp_path):
    """Issue 21 case 10: a cell held by another host's worker names who holds it and what to do."""
    import time

    from icldistill.experiments import sweep

    lock_file = tmp_path / sweep.LOCK_FILE
    lock_file.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "time": time.time()}), encoding="utf-8")
    lock = sweep.CellLock(tmp_path)
    assert not lock.acquire()
    detail = sweep._describe(lock.holder(), lock.path)
    assert "pid 4242 on elsewhere" in detail and "run this command again" in detail
    assert f"delete {lock_file}" in detail
