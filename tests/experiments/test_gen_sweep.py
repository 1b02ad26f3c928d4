"""Sweeps and reports of generation runs (issue 22, item 4): grids over generate and gen-distill, a tiny sweep that
runs, resumes and refuses changed cells, and the generation table's numbers checked against answers built here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from icldistill import cli
from icldistill.config import GenDistillOptions
from icldistill.errors import ConfigError
from icldistill.experiments.gen_results import collect_generation, is_generation_sweep
from icldistill.experiments.grid import CELLS_DIR, ExperimentError, expand, validate_file
from icldistill.experiments.results import collect
from icldistill.experiments.sweep import CELL_FILE, run_sweep
from icldistill.report.generation import generation_table, teacher_agreement
from icldistill.runtime.rundir import RunDir
from icldistill.tasks.generation import GENERATION_DIR

GRID = {"method": ["generate-teacher", "generate-student", "gen-distill"],
        "signal": ["sequence", "token", "on-policy", "reference"], "seed": [0, 1, 2]}


def test_a_generation_grid_expands_into_its_cells():
    experiment = expand({"task": "gsm8k", "grid": GRID}, output_dir="/tmp/unused")
    by_method: dict[str, list] = {}
    for cell in experiment.cells:
        by_method.setdefault(cell.method, []).append(cell)
    # signal applies to gen-distill only: the ICL cells are not repeated per signal.
    assert {m: len(c) for m, c in by_method.items()} == {"generate-teacher": 3, "generate-student": 3,
                                                         "gen-distill": 12}
    teacher = by_method["generate-teacher"][0].config
    assert teacher.model == GenDistillOptions.teacher and teacher.task == "gsm8k"  # generation defaults
    assert by_method["generate-student"][0].config.model == GenDistillOptions.student
    distill = by_method["gen-distill"]
    assert {c.config.signal for c in distill} == {"sequence", "token", "on-policy", "reference"}
    assert all(c.config.resume and "signal=" in c.id for c in distill)
    assert len({c.id for c in experiment.cells}) == len(experiment.cells)


@pytest.mark.parametrize("spec, problem", [
    ({"grid": {"method": ["icl-student", "gen-distill"]}}, "mixes classification methods (icl-student) with "
                                                           "generation methods (gen-distill)"),
    ({"task": "gsm8k", "eval": ["mnli-m"], "grid": {"method": ["gen-distill"]}},
     "'mnli-m' is not an evaluation set of generation task 'gsm8k'"),
    ({"task": "mnli", "grid": {"method": ["generate-student"]}}, "'mnli' is a classification task"),
    ({"task": "gsm8k", "grid": {"method": ["gen-distill"], "signal": ["sequences"]}}, "signal"),
])
def test_generation_experiments_name_their_problems(spec, problem):
    with pytest.raises(ExperimentError) as caught:
        expand(spec, output_dir="/tmp/unused")
    assert problem in str(caught.value)


def test_validate_reads_a_generation_experiment(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text("task: gsm8k\nlimit: 8\ngrid:\n  method: [generate-student, gen-distill]\n"
                    "  signal: [sequence, reference]\n  context: [true, false]\n  seed: [0, 1]\n")
    report = validate_file(path)
    assert report.ok, report.problems
    assert report.summary.startswith("8 cells (generate-student 4, gen-distill 4)")  # context: generate only


def _spec(tiny_dirs, data_dir, tmp_path, **changes):
    task = yaml.safe_load((GENERATION_DIR / "gsm8k.yaml").read_text())
    test = str(data_dir / "gsm8k/test.jsonl.gz")
    task.update(train=str(data_dir / "gsm8k/train.jsonl.gz"), eval={"gsm8k": test, "later": test})
    (tmp_path / "maths.yaml").write_text(yaml.safe_dump(task))
    spec = {"name": "gen", "task": str(tmp_path / "maths.yaml"), "eval": ["gsm8k"],
            "teacher": str(tiny_dirs["teacher"]), "student": str(tiny_dirs["student"]),
            "shots": 2, "limit": 3, "batch_size": 4, "max_new_tokens": 5, "data_dir": str(data_dir), "dtype": "fp32",
            "device": "cpu", "chat_template": "no", "train_queries": 4, "dev_queries": 0, "epochs": 1,
            "train_batch_size": 4, "lr": 3e-2, "cache_dir": str(tmp_path / "cache"),
            "grid": {"method": ["generate-teacher", "generate-student", "gen-distill"],
                     "signal": ["sequence", "reference"], "seed": [0, 1]}}
    spec.update(changes)
    return expand(spec, output_dir=tmp_path / "sweep")


def test_a_generation_sweep_runs_resumes_refuses_changes_and_reports(tiny_dirs, data_dir, tmp_path, capsys):
    experiment = _spec(tiny_dirs, data_dir, tmp_path)
    summary = run_sweep(experiment, progress=False)
    assert len(summary.ran) == 8 and not summary.failed
    assert run_sweep(experiment, progress=False).ran == []  # finished cells are never run again
    with pytest.raises(ConfigError, match="were run by another experiment"):
        run_sweep(_spec(tiny_dirs, data_dir, tmp_path, lr=1e-2), progress=False)
    assert is_generation_sweep(tmp_path / "sweep") and collect(tmp_path / "sweep").empty
    answers, runs = collect_generation(tmp_path / "sweep")
    assert len(runs) == 8 and set(runs["status"]) == {"complete"} and len(answers) == 8 * 3
    assert cli.main(["report", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    for variant in ("ICL teacher", "ICL student", "gen-distill (sequence)", "SFT (reference)"):
        assert f"| {variant} " in out
    report = (tmp_path / "sweep" / "report" / "report.md").read_text()
    assert "Δ EM vs ICL student" in report and "8 generation runs: 8 complete" in report
    assert (tmp_path / "sweep" / "report" / "report.html").is_file()
    # A set added later to the trained cells (icld eval SWEEP --eval SET) joins their rows.
    assert cli.main(["--quiet", "eval", "--model", str(tmp_path / "sweep"), "--eval", "later", "--limit", "3",
                     "--device", "cpu", "--dtype", "fp32", "--batch-size", "4"]) == 0
    later = collect_generation(tmp_path / "sweep")[0]
    later = later[later["eval"] == "later"]
    assert set(later["method"]) == {"gen-distill"} and len(later) == 4 * 3
    assert cli.main(["results", str(tmp_path / "sweep"), "--csv", str(tmp_path / "answers.csv")]) == 0
    out = capsys.readouterr().out
    assert "| gen-distill (sequence) " in out and "per-answer table (36 rows)" in out and "| later " in out
    assert len((tmp_path / "answers.csv").read_text().splitlines()) == 1 + 36


# ------------------------------------------------------------------------------- the table, on answers built here


def _cell(root: Path, cell_id: str, method: str, config: dict, seed: int, rows: list[dict]) -> None:
    directory = root / CELLS_DIR / cell_id
    directory.mkdir(parents=True)
    config = {"task": "gsm8k", "eval": None, "seeds": [seed], **config}
    (directory / CELL_FILE).write_text(json.dumps({"id": cell_id, "method": method, "config": config}))
    run = RunDir(directory)
    run.write_predictions([{"seed": seed, "eval": "gsm8k", **r} for r in rows])
    run.write({"method": "generate" if method != "gen-distill" else method, "status": "complete", "identity": None,
               "planned_seeds": [seed], "config": config, "kind": "generation",
               "seeds": {str(seed): {"eval": {"gsm8k": {"n": len(rows)}}, "status": "complete"}}})


_answer = st.sampled_from([None, "1", "2", "3"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), queries=st.integers(2, 6), seeds=st.integers(1, 2))
def test_the_generation_table_counts_what_the_answers_say(tmp_path_factory, data, queries, seeds):
    root = tmp_path_factory.mktemp("table")
    gold = [data.draw(st.sampled_from(["1", "2", "3"])) for _ in range(queries)]
    drawn: dict[str, dict[int, list]] = {}
    kinds = {"t": ("generate-teacher", {"model": "T", "context": True}),
             "s": ("generate-student", {"model": "S", "context": True}),
             "d": ("gen-distill", {"teacher": "T", "student": "S", "signal": "sequence"})}
    for key, (method, config) in kinds.items():
        for seed in range(seeds):
            answers = [data.draw(_answer) for _ in range(queries)]
            drawn.setdefault(key, {})[seed] = answers
            rows = [{"id": f"q{i}", "answer": a, "exact_match": float(a == g), "token_f1": float(a == g),
                     "tokens": 3 + i} for i, (a, g) in enumerate(zip(answers, gold))]
            _cell(root, f"{method}__seed={seed}", method, config, seed, rows)
    # The zero-shot student runs one seed: its answers stand for every seed (its prompts do not depend on it).
    zero = [data.draw(_answer) for _ in range(queries)]
    _cell(root, "generate-student__context=false__seed=0", "generate-student", {"model": "S", "context": False}, 0,
          [{"id": f"q{i}", "answer": a, "exact_match": float(a == g), "token_f1": float(a == g), "tokens": 2}
           for i, (a, g) in enumerate(zip(zero, gold))])
    answers, _ = collect_generation(root)
    table = generation_table(answers, root, resamples=200).set_index("variant")
    pairs = [(s, i) for s in range(seeds) for i in range(queries)]
    def em(key: str) -> float:
        return sum(drawn[key][s][i] == gold[i] for s, i in pairs) / len(pairs)
    row = table.loc["gen-distill (sequence)"]
    assert row["exact_match"] == pytest.approx(em("d"))
    assert row["exact_match_low"] <= row["exact_match"] + 1e-9 <= row["exact_match_high"] + 2e-9
    agree = sum(drawn["d"][s][i] is not None and drawn["d"][s][i] == drawn["t"][s][i] for s, i in pairs) / len(pairs)
    assert row["teacher_agreement"] == pytest.approx(agree) and row["agreement_queries"] == len(pairs)
    assert row["vs_icl_student"] == pytest.approx(em("d") - em("s"))  # icld compare's pairing, same queries
    assert row["vs_icl_student_low"] <= row["vs_icl_student"] + 1e-9 <= row["vs_icl_student_high"] + 2e-9
    assert math.isnan(row["vs_sft"])  # no SFT run in this sweep
    em_zero = sum(zero[i] == gold[i] for _, i in pairs) / len(pairs)
    assert row["vs_zero_shot"] == pytest.approx(em("d") - em_zero)  # paired with every seed of the distilled run
    assert row["vs_zero_shot_low"] <= row["vs_zero_shot"] + 1e-9 <= row["vs_zero_shot_high"] + 2e-9
    assert math.isnan(table.loc["student zero-shot"]["vs_zero_shot"])  # not compared with itself
    em_student = em("s")
    assert table.loc["student zero-shot"]["vs_icl_student"] == pytest.approx(em_zero - em_student)  # every seed
    assert row["answer_tokens"] == pytest.approx(3 + (queries - 1) / 2)
    assert math.isnan(table.loc["ICL teacher"]["teacher_agreement"])  # the teacher is not compared with itself


def test_agreement_needs_the_teachers_answer_on_the_same_seed():
    import pandas as pd

    answers = pd.DataFrame([
        {"variant": "ICL teacher", "model": "T", "teacher": "T", "seed": 0, "eval": "e", "id": "a", "answer": "1"},
        {"variant": "gen-distill (token)", "model": "S", "teacher": "T", "seed": 1, "eval": "e", "id": "a",
         "answer": "1"}])
    assert teacher_agreement(answers[answers["variant"] != "ICL teacher"], answers) == (pytest.approx(math.nan,
                                                                                                     nan_ok=True), 0)
