"""Sweeps: experiment files and their checks, grid expansion, a real tiny sweep, resume, failures, workers."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from icldistill import cli
from icldistill.errors import ConfigError
from icldistill.experiments.grid import (
    ExperimentError,
    expand,
    load_experiment,
    validate_file,
)
from icldistill.experiments.results import (
    COLUMNS,
    SUBCASE_COLUMNS,
    aggregate,
    collect,
    collect_confusions,
    collect_subcases,
)
from icldistill.experiments.sweep import LOCK_FILE, CellLock, run_sweep
from icldistill.models.packaged import PACKAGED_MODELS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# ---------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_is_valid(path):
    if path.name.startswith("tune-"):
        from icldistill.experiments.tune import load_tuning

        plan = load_tuning(path)  # raises listing every problem
        assert plan.space.dimensions and plan.settings.trials >= 1
        return
    report = validate_file(path)
    assert report.ok, report.problems
    assert report.kind == "experiment" and report.summary


def _by_method(experiment):
    return Counter(c.method for c in experiment.cells)


def test_the_teachers_pbft_is_the_students_pbft_on_the_1_5b():
    """The study's memory baseline (study-qwen-teacher-pbft.yaml) runs exactly the student PBFT cells' options
    (study-qwen.yaml), seed for seed, on the teacher's model: the claim RESULTS.md makes of it."""
    from icldistill.config import to_dict

    def configs(name, method):
        cells = [c for c in load_experiment(CONFIGS / name).cells if c.method == method]
        return {c.seed: {k: v for k, v in to_dict(c.config).items() if k not in ("output_dir", "model")}
                for c in cells}, {c.config.model for c in cells}

    student, student_models = configs("study-qwen.yaml", "pbft")
    teacher, teacher_models = configs("study-qwen-teacher-pbft.yaml", "pbft-teacher")
    assert (student_models, teacher_models) == ({"qwen2.5-coder-0.5b"}, {"qwen2.5-coder-1.5b"})
    assert teacher == student and sorted(teacher) == [0, 1, 2]


def test_paper_preset_is_the_protocol():
    experiment = load_experiment(CONFIGS / "paper.yaml")
    assert _by_method(experiment) == {"icl-teacher": 25, "icl-student": 25, "pbft-teacher": 50, "pbft": 50,
                                      "distill": 50}
    for cell in experiment.cells:
        c = cell.config
        assert ((c.task, c.eval, c.seeds[0] in range(5), c.shots in (2, 4, 8, 16, 32))
                == ("mnli", ["mnli-m", "hans-lo"], True, True))
        if cell.method in ("icl-teacher", "pbft-teacher"):
            assert c.model == "facebook/opt-1.3b"
        elif cell.method in ("icl-student", "pbft"):
            assert c.model == "facebook/opt-125m"
        if cell.method in ("pbft", "pbft-teacher", "distill"):
            assert (c.lora_r, c.lora_alpha, c.lora_targets, c.lora_dropout) == (8, 32, ["q_proj", "v_proj"], 0.05)
            assert (c.lr, c.epochs, c.dtype, c.resume) == (1e-5, 40, "bf16", True)
            # Equal step budgets, model selection on the dev split only (issue 12).
            assert (c.max_steps, c.select, c.dev_queries) == (80, "last", 256)
        if cell.method == "distill":
            assert (c.teacher, c.student, c.alpha) == ("facebook/opt-1.3b", "facebook/opt-125m", 0.5)
    assert {c.config.peft for c in experiment.cells if c.method == "pbft"} == {"lora", "bitfit"}
    assert {(c.config.shots, c.config.seeds[0]) for c in experiment.cells if c.method == "distill"} == {
        (k, s) for k in (2, 4, 8, 16, 32) for s in range(5)}


def test_the_demo_distils_the_qwen_pair_against_its_zero_shot_and_icl_student():
    demo, zero = load_experiment(CONFIGS / "demo.yaml"), load_experiment(CONFIGS / "demo-zeroshot.yaml")
    assert _by_method(demo) == {"icl-teacher": 1, "icl-student": 1, "distill": 1}
    assert [(c.method, c.config.shots) for c in zero.cells] == [("icl-student", 0)]
    assert demo.output_dir == zero.output_dir  # one sweep directory, so the report pairs CD with k = 0
    (cd,) = [c.config for c in demo.cells if c.method == "distill"]
    assert (cd.teacher, cd.student, cd.shots) == ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", 16)
    assert {cd.teacher, cd.student} <= set(PACKAGED_MODELS)
    # every cell scores the same queries: the paired intervals of the report's first screen need them
    assert {(c.config.task, tuple(c.config.eval), c.config.limit) for c in demo.cells + zero.cells} == {
        ("mnli", ("mnli-m",), 100)}


def test_demo_and_alpha_presets():
    demo = load_experiment(CONFIGS / "demo-small.yaml")  # the small offline pair (`make demo-small`)
    assert _by_method(demo) == {"icl-teacher": 2, "icl-student": 2, "pbft-teacher": 2, "pbft": 2, "distill": 2}
    distill = [c.config for c in demo.cells if c.method == "distill"]
    assert {c.teacher for c in distill} <= set(PACKAGED_MODELS) and {c.student for c in distill} <= set(PACKAGED_MODELS)
    assert {c.shots for c in distill} == {2, 8} and {c.seeds[0] for c in distill} == {0}
    sst2 = [c.config for c in load_experiment(CONFIGS / "demo-sst2.yaml").cells if c.method == "distill"]
    assert {c.ce_target for c in sst2} == {"gold", "teacher"}  # the SST-2 demo compares both label budgets
    trained = [c.config for c in demo.cells if c.method in ("pbft", "pbft-teacher", "distill")]
    assert all(c.limit == 60 and c.max_steps == 8 for c in trained)  # equal step budgets
    assert all(c.train_queries == 16 for c in distill + sst2)

    alpha = load_experiment(CONFIGS / "alpha.yaml")
    assert _by_method(alpha) == {"distill": 25}
    assert sorted({c.config.alpha for c in alpha.cells}) == [0.0, 0.25, 0.5, 0.75, 1.0]


# ---------------------------------------------------------------------------------------------- bad files


def _problems(tmp_path, spec) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    report = validate_file(path)
    assert not report.ok
    text = "\n".join(report.problems)
    with pytest.raises(ExperimentError) as info:
        load_experiment(path)
    assert str(path) in str(info.value)  # the error names the file
    return text


GOOD = {"task": "mnli", "grid": {"method": ["distill"], "shots": [2]}}


@pytest.mark.parametrize("change, expected", [
    ({"epoch": 3}, r"unknown key 'epoch'. Did you mean: epochs"),
    ({"grid": {"method": ["distill"], "alpah": [0.5]}}, r"unknown grid key 'alpah'. Did you mean: alpha"),
    ({"grid": {"method": ["distil"]}}, r"unknown method 'distil'. Did you mean: distill"),
    ({"grid": {"method": ["distill"], "shots": []}}, r"grid 'shots' is an empty list"),
    ({"grid": {"method": ["distill"], "alpha": [0.5, 2]}},
     r"'alpha' must lie in \[0, 1\], got 2\.0\. \(cell distill__.*alpha=2__seed=0\)"),
    ({"grid": {"method": ["distill"], "shots": ["two"]}},
     r"grid 'shots': option 'shots': cannot read 'two' as an integer"),
    ({"grid": {"method": ["distill"], "alpha": 0.5}}, r"grid 'alpha' must be a list of values"),
    ({"model": "x"}, r"'model' is not used in experiments: an experiment names 'teacher' and 'student'"),
    ({"shots": 4}, r"'shots' is given both at top level and in grid"),
    ({"grid": {"shots": [2]}}, r"no method"),
    ({"task": "mnlii"}, r"Unknown task 'mnlii'"),
    ({"eval": ["sst2"]}, r"Unknown evaluation set 'sst2' for task 'mnli'"),
])
def test_bad_experiment_files_explain_the_problem(tmp_path, change, expected):
    text = _problems(tmp_path, {**GOOD, **change})
    assert re.search(expected, text), text


def test_one_error_shared_by_many_cells_is_reported_once(tmp_path):
    text = _problems(tmp_path, {"epochs": 0, "grid": {"method": ["pbft", "distill"], "shots": [2, 4], "seed": [0, 1]}})
    assert text.count("'epochs' must be >= 1") == 1 and "and 7 more" in text


def test_validate_command(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  method: [distill]\n  alpah: [0.5]\n")
    assert cli.main(["validate", str(CONFIGS / "demo-small.yaml"), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "demo-small.yaml: OK: 10 cells (icl-teacher 2, icl-student 2, pbft-teacher 2, pbft 2, distill 2)" in out
    assert "bad.yaml: 1 problem" in out and "Did you mean: alpha" in out
    options = tmp_path / "options.yaml"
    options.write_text("shots: 4\nalpha: 0.5\n")
    assert cli.main(["validate", str(options)]) == 0
    assert "options file for icld distill" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- expansion


def test_grid_expansion_deduplicates_keys_a_method_does_not_use(tmp_path):
    spec = {"teacher": "facebook/opt-1.3b", "student": "smollm2-135m", "epochs": 2,
            "grid": {"method": ["icl-teacher", "icl-student", "pbft", "distill"], "alpha": [0, 0.5, 1],
                     "peft": ["lora", "bitfit"], "shots": [2, 8], "seed": [0, 1]}}
    experiment = expand(spec, output_dir=tmp_path / "sweep")
    assert _by_method(experiment) == {"icl-teacher": 4, "icl-student": 4, "pbft": 8, "distill": 24}
    ids = [c.id for c in experiment.cells]
    assert len(set(ids)) == len(ids)
    assert "distill__t=facebook--opt-1.3b__s=smollm2-135m__k=8__alpha=0.5__peft=lora__seed=1" in ids
    assert "icl-teacher__t=facebook--opt-1.3b__k=2__seed=0" in ids
    assert "pbft__s=smollm2-135m__k=2__peft=bitfit__seed=0" in ids
    for cell in experiment.cells:
        assert Path(cell.config.output_dir) == (tmp_path / "sweep" / "cells" / cell.id).resolve()
        assert len(cell.config.seeds) == 1
        assert getattr(cell.config, "resume", True)  # training cells resume from their checkpoint
    icl = next(c for c in experiment.cells if c.method == "icl-teacher")
    assert icl.config.model == "facebook/opt-1.3b" and not hasattr(icl.config, "alpha")
    # Stable: the same file gives the same cells; top-level `seeds` is the seed grid; 0.5 == "0.5".
    again = expand({**spec, "grid": {**spec["grid"], "alpha": ["0", "0.5", 1.0]}}, output_dir=tmp_path / "sweep")
    assert [c.id for c in again.cells] == ids
    seeds = expand({"seeds": [3, 4], "method": "icl-student"}, output_dir=tmp_path)
    assert [c.id for c in seeds.cells] == ["icl-student__s=smollm2-135m__k=16__seed=3",
                                           "icl-student__s=smollm2-135m__k=16__seed=4"]


def test_local_models_with_the_same_name_get_distinct_ids(tmp_path):
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    experiment = expand({"grid": {"method": ["icl-teacher"], "teacher": [str(a), str(b)]}}, output_dir=tmp_path)
    ids = [c.id for c in experiment.cells]
    assert len(set(ids)) == 2 and all(i.startswith("icl-teacher__t=model__k=16__seed=0__") for i in ids)
    seeds = expand({"grid": {"method": ["icl-teacher"], "teacher": [str(a), str(b)], "seed": [0, 1]}},
                   output_dir=tmp_path)
    assert len({c.id.replace("seed=0", "seed=1") for c in seeds.cells}) == 2  # one configuration, one hash


# ---------------------------------------------------------------------------------------------- a real sweep


def _tiny_spec(tiny_dirs, data_dir, cache, **grid):
    return {"task": "mnli", "cache_dir": str(cache), "eval": ["mnli-m", "hans-lo"],
            "teacher": str(tiny_dirs["teacher"]),
            "student": str(tiny_dirs["student"]), "data_dir": str(data_dir), "limit": 8, "epochs": 1,
            "train_queries": 4, "train_batch_size": 4, "batch_size": 8, "dtype": "fp32", "device": "cpu",
            "lr": 1e-2, "warmup_ratio": 0.0, "grid": {"method": ["icl-teacher", "pbft", "distill"], "shots": [2],
                                                      "seed": [0, 1], **grid}}


class Recorder:
    """Collects a sweep's events; ``started`` lists the cells this worker ran."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def started(self):
        return [e.cell for e in self.events if e.kind == "cell_start"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, tiny_dirs, data_dir):
    root = tmp_path_factory.mktemp("sweep")
    spec = _tiny_spec(tiny_dirs, data_dir, tmp_path_factory.mktemp("cache"))
    experiment = expand(spec, source="tiny.yaml", output_dir=root)
    recorder = Recorder()
    summary = run_sweep(experiment, on_event=recorder, progress=False)
    return experiment, summary, recorder, spec


def test_tiny_sweep_runs_every_cell_and_collects_one_table(tiny_sweep, tiny_dirs):
    experiment, summary, recorder, _ = tiny_sweep
    assert summary.finished and not summary.failed and len(summary.ran) == 6
    assert recorder.started == [c.id for c in experiment.cells]
    ends = [e for e in recorder.events if e.kind == "cell_end"]
    assert [e.done for e in ends] == [1, 2, 3, 4, 5, 6] and ends[-1].remaining_s == 0
    assert all(e.remaining_s is not None and e.elapsed_s > 0 for e in ends)
    sweep = json.loads((experiment.output_dir / "sweep.json").read_text())
    assert [c["id"] for c in sweep["cells"]] == [c.id for c in experiment.cells]

    df = collect(experiment.output_dir)
    assert list(df.columns) == COLUMNS
    assert len(df) == 12 and set(df["status"]) == {"complete"}
    assert Counter(df["method"]) == {"icl-teacher": 4, "pbft": 4, "distill": 4}
    teacher, student = str(tiny_dirs["teacher"]), str(tiny_dirs["student"])
    for method, model in (("icl-teacher", teacher), ("pbft", student), ("distill", student)):
        assert set(df.loc[df.method == method, "model"]) == {model}
    icl, trained = df[df.method == "icl-teacher"], df[df.method != "icl-teacher"]
    assert icl["alpha"].isna().all() and all(p is None for p in icl["peft"]) and icl["train_time_s"].isna().all()
    assert set(df.loc[df.method == "distill", "alpha"]) == {0.5} and df.loc[df.method == "pbft", "alpha"].isna().all()
    assert (trained["train_time_s"] > 0).all() and (trained["trainable_parameters"] > 0).all()
    assert (df.loc[df.method == "distill", "teacher_time_s"] > 0).all()
    assert df.loc[df.method != "distill", "teacher_time_s"].isna().all()
    assert (df["peak_memory_mb"] > 0).all() and (df["inference_latency_ms"] > 0).all() and (df["n"] == 8).all()
    assert df.loc[df["eval"] == "hans-lo", "ood_accuracy"].notna().all()
    assert df.loc[df["eval"] == "mnli-m", "ood_accuracy"].isna().all()

    # The table holds what results.json says.
    cell = experiment.cells[-1]
    record = json.loads((Path(cell.config.output_dir) / "results.json").read_text())
    row = df[(df.cell == cell.id) & (df["eval"] == "hans-lo")].iloc[0]
    metrics = record["seeds"][str(cell.seed)]["eval"]["hans-lo"]
    assert row.accuracy == metrics["accuracy"] and row.auc == pytest.approx(metrics["auc"] or math.nan, nan_ok=True)
    assert row.train_time_s == record["seeds"][str(cell.seed)]["resources"]["train_seconds"]

    subcases = collect_subcases(experiment.output_dir)
    assert list(subcases.columns) == SUBCASE_COLUMNS and set(subcases["eval"]) == {"hans-lo"}
    assert subcases.groupby("cell")["n"].sum().eq(8).all()

    confusions = collect_confusions(experiment.output_dir)
    assert set(confusions["eval"]) == {"mnli-m", "hans-lo"}
    assert set(confusions["gold"]) == {"entailment", "non-entailment"}
    assert confusions.groupby(["cell", "eval"])["count"].sum().eq(8).all()  # every scored query once
    assert (df["chance_rate"] == 0.5).all() and df["majority_rate"].between(0.5, 1.0).all()


def test_aggregate_over_seeds_matches_numpy(tiny_sweep):
    experiment, _, _, spec = tiny_sweep
    df = collect(experiment.output_dir)
    agg = aggregate(df)
    assert len(agg) == 6 and (agg["n_seeds"] == 2).all() and (agg["seeds"] == "0,1").all()
    assert "seed" not in agg.columns and set(agg["group"]) == {c.id.rsplit("__seed=", 1)[0] for c in experiment.cells}
    for _, row in agg.iterrows():
        part = df[(df.cell.str.rsplit("__seed=", n=1).str[0] == row.group) & (df["eval"] == row["eval"])]
        for col in ("accuracy", "inference_latency_ms", "peak_memory_mb"):
            values = part[col].to_numpy()
            assert row[f"{col}_mean"] == pytest.approx(np.mean(values))
            assert row[f"{col}_std"] == pytest.approx(np.std(values, ddof=1))
            assert row[f"{col}_ci95"] == pytest.approx(12.7062 * np.std(values, ddof=1) / np.sqrt(2))


def test_results_command_prints_the_table(tiny_sweep, tmp_path, capsys):
    experiment, _, _, spec = tiny_sweep
    assert cli.main(["results", str(experiment.output_dir), "--csv", str(tmp_path / "runs.csv")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "icl-teacher" in out and "distill" in out and "hans-lo" in out
    import pandas as pd

    assert list(pd.read_csv(tmp_path / "runs.csv").columns) == COLUMNS


def test_a_resumed_sweep_runs_only_the_missing_cells(tiny_sweep, tmp_path):
    experiment, _, _, spec = tiny_sweep
    root = tmp_path / "copy"
    shutil.copytree(experiment.output_dir, root)
    cells = {c.id: root / "cells" / c.id for c in experiment.cells}
    icl0, icl1, pbft0, pbft1, distill0, distill1 = cells
    shutil.rmtree(cells[icl1])  # killed before it started
    (cells[distill1] / "results.json").unlink()  # killed while running
    # ... by a worker whose process is gone: its lock is stale and is taken over.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (cells[distill1] / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": 0}))
    # A cell held by a live worker is left to it.
    (cells[pbft1] / "results.json").unlink()
    (cells[pbft1] / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": 0}))

    resumed = expand(spec, source="tiny.yaml", output_dir=root)
    recorder = Recorder()
    summary = run_sweep(resumed, on_event=recorder, progress=False)
    assert recorder.started == [icl1, distill1]
    assert summary.busy == [pbft1] and not summary.finished
    assert [e.cell for e in recorder.events if e.kind == "busy"] == [pbft1]
    assert collect(root).set_index("cell").loc[pbft1, "status"].tolist() == ["running", "running"]

    (cells[pbft1] / LOCK_FILE).unlink()
    recorder = Recorder()
    assert run_sweep(resumed, on_event=recorder, progress=False).finished
    assert recorder.started == [pbft1]
    recorder = Recorder()
    run_sweep(resumed, on_event=recorder, progress=False)
    assert recorder.started == []  # completed runs are never run again

    # Finished cells are never silently mixed with cells run under other options.
    changed = expand({**spec, "limit": 4}, source="tiny.yaml", output_dir=root)
    with pytest.raises(ConfigError, match=r"limit: 8 -> 4"):
        run_sweep(changed, progress=False)


def test_a_failing_cell_is_recorded_and_the_others_complete(tmp_path, tiny_dirs, data_dir):
    spec = {"eval": ["hans-lo"], "limit": 4, "shots": 2, "data_dir": str(data_dir), "dtype": "fp32", "device": "cpu",
            "cache_dir": str(tmp_path / "cache"),
            "grid": {"method": ["icl-teacher"],
                     "teacher": [str(tmp_path / "no-such-model"), str(tiny_dirs["teacher"])]}}
    experiment = expand(spec, output_dir=tmp_path / "sweep")
    bad, good = (c.id for c in experiment.cells)
    recorder = Recorder()
    summary = run_sweep(experiment, on_event=recorder, progress=False)
    assert summary.failed == [bad] and summary.ran == [bad, good] and not summary.finished
    error = json.loads((tmp_path / "sweep" / "cells" / bad / "error.json").read_text())
    assert error["type"] == "ModelError" and "no-such-model" in error["message"] and "Traceback" in error["traceback"]
    failed_event = next(e for e in recorder.events if e.kind == "cell_end" and e.cell == bad)
    assert failed_event.status == "failed" and "ModelError" in failed_event.detail

    df = collect(tmp_path / "sweep").set_index("cell")
    assert df.loc[bad, "status"] == "failed" and math.isnan(df.loc[bad, "accuracy"])
    assert df.loc[good, "status"] == "complete" and not math.isnan(df.loc[good, "accuracy"])
    agg = aggregate(df.reset_index()).set_index("teacher")
    assert agg.loc[str(tmp_path / "no-such-model"), ["n_seeds", "n_failed"]].tolist() == [0, 1]

    recorder = Recorder()
    run_sweep(experiment, on_event=recorder, progress=False)
    assert recorder.started == []  # failed cells wait for --retry-failed
    recorder = Recorder()
    summary = run_sweep(experiment, on_event=recorder, progress=False, retry_failed=True)
    assert recorder.started == [bad] and summary.failed == [bad]  # retried once, not in a loop


def test_sweep_command_reports_progress_and_failures(tmp_path, data_dir, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "eval": ["hans-lo"], "limit": 4, "shots": 2, "data_dir": str(data_dir), "device": "cpu",
        "output_dir": str(tmp_path / "sweep"),
        "grid": {"method": ["icl-teacher"], "teacher": [str(tmp_path / "missing")]}}))
    assert cli.main(["sweep", str(path), "--dry-run"]) == 0
    assert "icl-teacher__t=missing__k=2__seed=0" in capsys.readouterr().out
    assert cli.main(["-q", "sweep", str(path)]) == 1
    out = capsys.readouterr().out
    assert "[0/1] done before; 1 to run" in out
    assert re.search(r"\[1/1\] icl-teacher__t=missing__k=2__seed=0: failed \(\d+s, ~0s left\)\n    ModelError: ",
                     out), out
    assert "1 failed of 1 cells" in out and "--retry-failed" in out


WORKER = """
import json, os, sys, time
from pathlib import Path
from icldistill.config import to_dict
from icldistill.experiments.grid import expand
from icldistill.experiments.sweep import run_sweep

spec, root, log = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]

ready = Path(log).parent / f"ready-{os.getpid()}"
ready.touch()


def runner(cell, progress):  # what a run leaves behind, minus the model: the claims are what is tested
    deadline = time.monotonic() + 30
    while len(list(ready.parent.glob("ready-*"))) < 2 and time.monotonic() < deadline:  # both workers are up
        time.sleep(0.01)
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()} {cell.id}\\n")
    time.sleep(0.02)
    record = {"status": "complete", "config": to_dict(cell.config), "seeds": {}}
    Path(cell.config.output_dir, "results.json").write_text(json.dumps(record))
    return record

summary = run_sweep(expand(spec, output_dir=root), progress=False, runner=runner)
print(json.dumps({"ran": summary.ran, "busy": summary.busy}))
"""


def test_two_worker_processes_run_every_cell_exactly_once(tmp_path):
    """Workers are processes (as `icld sweep` started twice): model loading in transformers is not thread-safe."""
    import sys

    spec = {"grid": {"method": ["icl-teacher", "icl-student", "pbft", "distill"], "shots": [2, 8], "seed": [0, 1, 2]}}
    log = tmp_path / "runs.log"
    args = [sys.executable, "-c", WORKER, json.dumps(spec), str(tmp_path / "sweep"), str(log)]
    workers = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [json.loads(w.communicate(timeout=60)[0]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    runs = [line.split() for line in log.read_text().splitlines()]
    cells = [c.id for c in expand(spec, output_dir=tmp_path / "sweep").cells]
    assert sorted(cell for _, cell in runs) == sorted(cells)  # each once
    assert sorted(outputs[0]["ran"] + outputs[1]["ran"]) == sorted(cells)
    assert len({pid for pid, _ in runs}) == 2  # both took part
    assert not list((tmp_path / "sweep").rglob(LOCK_FILE))


def test_cell_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path):
    first, second = CellLock(tmp_path), CellLock(tmp_path)
    assert first.acquire() and not second.acquire()
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["time"] > 0
    first.release()
    assert second.acquire()
    second.release()
    # Another host's lock is never judged stale from here, however old.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0}))
    assert not CellLock(tmp_path).acquire()
