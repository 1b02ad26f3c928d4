"""icld tune: Optuna studies on tiny models and real SST-2 rows, scored on the dev split only.

What is asserted: trial parameters are a function of the sampler seed; trials score the dev split and
never the evaluation sets (which only the final re-runs score); a bad tuning file fails before any
trial; a killed study resumes with no trial lost or run twice; two workers finish exactly the
requested number of trials.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from icldistill.cli import main
from icldistill.experiments.grid import ExperimentError
from icldistill.experiments.tune import (
    PLAN_FILE,
    STUDY_FILE,
    _storage,
    finish,
    load_study,
    load_tuning,
    plan_from_spec,
    run_study,
    trials_table,
)
from icldistill.runtime.records import read_json

optuna = pytest.importorskip("optuna")


def _spec(tiny_dirs, data_dir, cache, **over):
    spec = {
        "name": "tiny-tune", "method": "pbft", "task": "sst2", "eval": ["sst2"], "student": str(tiny_dirs["student"]),
        "data_dir": str(data_dir), "cache_dir": str(cache), "shots": 4, "seeds": [0, 1], "dev_queries": 8,
        "limit": 8, "epochs": 2, "train_batch_size": 2, "batch_size": 8, "dtype": "fp32", "device": "cpu",
        "warmup_ratio": 0.0,
        "search": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "lora_r": [2, 4]},
        "tune": {"trials": 3, "seed": 7, "startup_trials": 2, "heartbeat_s": 1},
    }
    spec.update(over)
    return spec


def _write(tmp_path, spec, name="tune.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_dirs, data_dir):
    root = tmp_path_factory.mktemp("tune")
    plan = plan_from_spec(_spec(tiny_dirs, data_dir, root / "cache"), source="tiny.yaml", output_dir=root / "study")
    study = run_study(plan)
    return plan, study


def test_trials_score_the_dev_split_only(tiny_study):
    plan, study = tiny_study
    finished = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    for t in finished:
        record = read_json(Path(t.user_attrs["directory"]) / "results.json")
        assert record["config"]["seeds"] == [0]  # trials train on the first seed
        assert not record.get("aggregate"), "a trial scored an evaluation set"
        seed = record["seeds"]["0"]
        assert all(h.get("dev_accuracy") is not None for h in seed["history"])
        assert len(seed["dev_examples"]) == 8
        if t.state.name == "COMPLETE":  # the objective is the dev accuracy the trial's record holds
            assert t.value == seed["history"][-1]["dev_accuracy"]


def test_trial_parameters_are_a_function_of_the_seed(tiny_study, tiny_dirs, data_dir, tmp_path):
    plan, study = tiny_study
    again = plan_from_spec(_spec(tiny_dirs, data_dir, plan.base["cache_dir"]), source="tiny.yaml",
                           output_dir=tmp_path / "again")
    other = run_study(again)
    assert [t.params for t in other.get_trials()] == [t.params for t in study.get_trials()]
    assert [t.value for t in other.get_trials()] == [t.value for t in study.get_trials()]  # fp32 CPU is deterministic


def test_finish_evaluates_best_and_defaults_once_with_every_seed(tiny_study):
    plan, study = tiny_study
    records = finish(plan)
    for name in ("best", "defaults"):
        record = records[name]
        assert record["config"]["seeds"] == [0, 1]
        assert set(record["aggregate"]) == {"sst2"} and record["aggregate"]["sst2"]["accuracy"]["n_seeds"] == 2
    assert records["best"]["config"]["lr"] == pytest.approx(study.best_params["lr"])
    assert records["defaults"]["config"]["lr"] == 1e-5 and records["defaults"]["config"]["lora_r"] == 8  # untuned
    from icldistill.report.tuning import write_tuning_report

    paths = write_tuning_report(plan.output_dir)
    text = paths["markdown"].read_text()
    assert f"Trial {study.best_trial.number}" in text and "untuned defaults" in text
    assert paths["trial_history"].read_bytes()[:4] == b"\x89PNG"
    rows = trials_table(plan.output_dir)
    values = [r["value"] for r in rows if r["state"] == "complete"]
    assert values == sorted(values, reverse=True)  # dev accuracy: best first


@pytest.mark.parametrize("change, message", [
    ({"search": {"lr": {"low": 1, "high": 0}}}, "low 1 is greater than high 0"),
    ({"search": {"nope": [1, 2]}}, "has no option 'nope'"),
    ({"search": {"lora_r": ["a", 4]}}, "choice 'a' is not a valid value"),
    ({"method": "icl-teacher"}, "'method' must be one of distill, gen-distill, pbft"),
    ({"tune": {"trials": 0}}, "trials must be >= 1"),
    ({"tune": {"objective": "eval_accuracy"}}, "choose dev_accuracy or dev_loss"),
    ({"tune": {"trails": 3}}, "unknown key(s) trails"),
    ({"dev_queries": 0}, "tuning needs a dev split"),
    ({"lr": 1e-3}, "'lr' is both fixed at the top level and searched"),
    ({"grid": {"shots": [2, 4]}}, "'search:' instead of 'grid:'"),
])
def test_a_bad_tuning_file_fails_before_any_trial(tmp_path, tiny_dirs, data_dir, capsys, change, message):
    spec = _spec(tiny_dirs, data_dir, tmp_path / "cache", output_dir=str(tmp_path / "study"))
    spec.update(change)
    path = _write(tmp_path, spec)
    with pytest.raises(ExperimentError, match="problem") as info:
        load_tuning(path)
    assert any(message in p for p in info.value.problems), info.value.problems
    assert main(["-q", "tune", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study" / STUDY_FILE).exists()  # nothing started


def test_validate_accepts_a_tuning_file(tmp_path, tiny_dirs, data_dir, capsys):
    path = _write(tmp_path, _spec(tiny_dirs, data_dir, tmp_path / "cache"))
    assert main(["validate", str(path)]) == 0
    assert "OK: tuning pbft, 2 searched options, 3 trials" in capsys.readouterr().out


# --------------------------------------------------------------------------- a worker killed inside a trial


class _Killed(BaseException):
    """A worker's death at one point of a trial. Optuna handles Exception and KeyboardInterrupt only, so this
    leaves the storage as SIGKILL does: the trial RUNNING, no further heartbeat, nothing told."""


def _kill_at(monkeypatch, owner, name: str, call: int) -> None:
    """Make the ``call``-th call of ``owner.name`` kill the worker (before it does anything)."""
    original, calls = getattr(owner, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise _Killed(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)


def _fake_runs(monkeypatch) -> list[tuple[str, dict]]:
    """Trials without training: each run is recorded (directory, lr) and scores a dev accuracy from its lr.

    What is checked here is which trials exist, with which parameters, and which runs they make; the
    training of a trial, its checkpoint and its resume are the real-process kill test's."""
    from icldistill.experiments import tune

    runs = []

    def run(method, config, *, on_evaluate, score_eval_sets, progress):
        runs.append((Path(config.output_dir).name, {"lr": config.lr, "lora_r": config.lora_r}))
        history = [{"step": 1, "dev_accuracy": min(1.0, 10 * config.lr)}]
        return {"seeds": {"0": {"history": history, "selected": {"step": 1}}}}

    monkeypatch.setattr(tune, "run_trial_config", run)
    return runs


KILL_POINTS = {  # where in trial 1 its worker dies: (object, attribute, which call of it)
    "after its creation, before its first heartbeat": (optuna.study._optimize, "get_heartbeat_thread", 2),
    "after its heartbeat, before its parameter draw": ("SearchSpace", "suggest", 2),
    "part-way through its parameter draw (lr drawn, lora_r not)": (optuna.trial.Trial, "suggest_categorical", 2),
}


@pytest.mark.parametrize("where", KILL_POINTS)
def test_a_trial_killed_before_its_parameters_exist_is_retried_as_itself(tmp_path, tiny_dirs, data_dir,
                                                                        monkeypatch, where):
    """A kill between a trial's creation and its draw: its retry drew another trial's parameters (seeded by
    the retry's own number, as the next new trial then was: one run done twice), or, killed before the
    first heartbeat, the trial never went stale and the study waited for it for ever, one trial short."""
    from icldistill.experiments import search

    spec = _spec(tiny_dirs, data_dir, tmp_path / "cache",
                 tune={"trials": 3, "seed": 7, "startup_trials": 3, "heartbeat_s": 1, "timeout_s": 60})
    runs = _fake_runs(monkeypatch)
    reference = run_study(plan_from_spec(spec, source="t.yaml", output_dir=tmp_path / "uninterrupted"))
    expected = sorted((t.params for t in reference.get_trials()), key=lambda p: p["lr"])
    runs.clear()

    plan = plan_from_spec(spec, source="t.yaml", output_dir=tmp_path / "study")
    owner, name, call = KILL_POINTS[where]
    with monkeypatch.context() as patch:
        _kill_at(patch, search.SearchSpace if owner == "SearchSpace" else owner, name, call)
        with pytest.raises(_Killed):
            run_study(plan)
    killed = {n: (s, p) for n, s, p in _states(plan.output_dir)}[1]
    assert killed[0] == "RUNNING" and len(killed[1]) == (1 if "part-way" in where else 0)
    with sqlite3.connect(plan.output_dir / STUDY_FILE) as db:  # an hour passes before the study is resumed
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour')")

    study = run_study(plan)
    finished = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(finished) == 3 and study.trials[1].state.name == "FAIL"  # none lost
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 3  # none drawn twice
    retry = next(t for t in finished if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 1)
    assert killed[1].items() <= retry.params.items() and retry.user_attrs["directory"].endswith("trial-0001")
    directories = [d for d, _ in runs]
    assert len(directories) == len(set(directories)) == 3 and "trial-0001" in directories  # no run done twice
    # The kill changed no draw: the uninterrupted study's parameters (all of a draw that had not begun).
    got = sorted((t.params for t in finished), key=lambda p: p["lr"])
    assert [p["lr"] for p in got] == [p["lr"] for p in expected]
    if "part-way" not in where:
        assert got == expected


# --------------------------------------------------------------------------- real processes


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, ICLDISTILL_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _tune(path: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "icldistill.cli", "-q", "tune", str(path), "--no-finish", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _states(directory: Path) -> list[tuple[int, str, dict]]:
    study = load_study(directory)  # as `icld results` reads a running study (it may be creating its tables)
    return [(t.number, t.state.name, t.params) for t in study.get_trials()]


@pytest.mark.slow
def test_a_killed_study_resumes_with_no_trial_lost_or_run_twice(tmp_path, tiny_dirs, data_dir):
    study_dir = tmp_path / "study"
    spec = _spec(tiny_dirs, data_dir, tmp_path / "cache", output_dir=str(study_dir), epochs=3,
                 tune={"trials": 4, "seed": 3, "startup_trials": 4, "heartbeat_s": 1})
    path = _write(tmp_path, spec)
    env = _env(tmp_path / "cache")
    proc = _tune(path, env)
    deadline = time.monotonic() + 300
    # Kill it while its second trial runs (the first one finished).
    while time.monotonic() < deadline:
        if (study_dir / PLAN_FILE).exists() and (study_dir / STUDY_FILE).exists():
            try:
                trials = _states(study_dir)
            except KeyError:  # the database file exists a moment before the study is created in it
                trials = []
            states = [s for _, s, _ in trials]
            # ... at whatever point of it (before or after its draw: the kill tests above pin each window)
            if states.count("COMPLETE") >= 1 and "RUNNING" in states:
                break
        if proc.poll() is not None:
            pytest.fail("tune ended before it could be killed: " + proc.communicate()[1][-2000:])
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _states(study_dir)
    killed = [(n, p) for n, s, p in before if s == "RUNNING"]
    assert len(killed) == 1
    out, err = _tune(path, env).communicate(timeout=600)
    assert "Traceback" not in err, err[-3000:]
    after = load_study(study_dir).get_trials()
    finished = [t for t in after if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4  # the requested number: none lost
    # The killed trial was failed and retried once with what it had drawn; nothing ran twice to the end.
    assert after[killed[0][0]].state.name == "FAIL"
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    retries = [t for t in finished if retried(t) == killed[0][0]]
    assert len(retries) == 1 and killed[0][1].items() <= retries[0].params.items()
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 4


@pytest.mark.slow
def test_two_workers_on_one_sqlite_study_finish_the_requested_trials(tmp_path, tiny_dirs, data_dir):
    study_dir = tmp_path / "study"
    spec = _spec(tiny_dirs, data_dir, tmp_path / "cache", output_dir=str(study_dir),
                 tune={"trials": 5, "seed": 0, "startup_trials": 5, "heartbeat_s": 1})
    path = _write(tmp_path, spec)
    env = _env(tmp_path / "cache")
    workers = [_tune(path, env) for _ in range(2)]
    results = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [r[1][-2000:] for r in results]
    after = _states(study_dir)
    assert sum(s in ("COMPLETE", "PRUNED") for _, s, _ in after) == 5  # exactly, not 5 + the other worker's last
    assert not [s for _, s, _ in after if s in ("RUNNING", "FAIL")]
    started = [sum(" trial " in line and "=" in line for line in out.splitlines()) for out, _ in results]
    assert all(n >= 1 for n in started), started  # both took part


def test_opening_a_storage_that_another_process_is_creating_is_tried_again(monkeypatch):
    """A reader racing a worker's schema creation gets the database's unique-constraint error: tried again."""
    from sqlalchemy.exc import IntegrityError

    monkeypatch.setattr("icldistill.experiments.tune.time.sleep", lambda s: None)
    calls = []

    def racing():
        calls.append(1)
        if len(calls) < 3:
            raise IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
        return "storage"

    assert _storage(racing) == "storage" and len(calls) == 3

    def always():
        raise IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))

    with pytest.raises(IntegrityError):
        _storage(always, attempts=2)


@pytest.mark.parametrize("objective, direction", [("dev_accuracy", "maximize"), ("dev_loss", "minimize")])
def test_trials_table_shows_no_value_for_a_trial_that_did_not_finish(tmp_path, objective, direction):
    storage = f"sqlite:///{tmp_path / STUDY_FILE}"
    plan = {"name": "t", "storage": storage, "settings": {"objective": objective}}
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan))
    study = optuna.create_study(study_name="t", storage=storage, direction=direction)
    distributions = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)}
    made = optuna.trial.create_trial

    def trial(state, value=None, reports=None):
        study.add_trial(made(state=state, value=value, params={"lr": 1e-3}, distributions=distributions,
                             intermediate_values=reports or {}))

    trial(optuna.trial.TrialState.COMPLETE, 0.3, {0: 0.2, 1: 0.3})
    trial(optuna.trial.TrialState.COMPLETE, 0.7, {0: 0.7})
    trial(optuna.trial.TrialState.PRUNED, None, {0: 0.6, 1: 0.1})  # stopped at epoch 1, where it had 0.1
    trial(optuna.trial.TrialState.FAIL, None, {0: 0.9})  # killed: its one report is of a run that did not finish
    trial(optuna.trial.TrialState.RUNNING, None, {0: 0.8})
    rows = trials_table(tmp_path)
    value = {r["trial"]: r["value"] for r in rows}
    assert value == {0: 0.3, 1: 0.7, 2: 0.1, 3: None, 4: None}
    complete = [r["trial"] for r in rows if r["state"] == "complete"]
    assert complete == ([1, 0] if direction == "maximize" else [0, 1])  # best first
    assert [r["state"] for r in rows][:3] == ["complete", "complete", "pruned"]


def test_a_second_finish_waits_for_the_first_and_trains_nothing(tiny_study, monkeypatch):
    """Issue 21 case 10: two workers both re-trained best/defaults; one died on the other's files."""
    import threading

    import icldistill.methods.finetune as finetune
    from icldistill.experiments.sweep import CellLock

    plan, _ = tiny_study
    first = finish(plan)
    holder = CellLock(plan.output_dir / "best")  # a worker still finishing
    assert holder.acquire()
    threading.Timer(0.5, holder.release).start()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished final run was trained again")

    monkeypatch.setattr(finetune, "fit", no_training)
    second = finish(plan)  # waits for the lock, then reads the complete seeds back
    for name in ("best", "defaults"):
        assert second[name]["aggregate"] == first[name]["aggregate"]
        assert second[name]["identity"] == first[name]["identity"]


def test_finish_only_after_the_tuning_file_changed_is_refused(tiny_study):
    """Issue 21 case 1 (tune): --finish-only after an edit recorded 8 epochs over a 4-epoch run."""
    import dataclasses

    from icldistill.errors import ConfigError

    plan, _ = tiny_study
    finish(plan)
    edited = dataclasses.replace(plan, base={**plan.base, "epochs": plan.base["epochs"] + 3})
    with pytest.raises(ConfigError, match="epochs.*--overwrite"):
        finish(edited)
