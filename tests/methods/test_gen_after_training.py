"""The commands after training, for a generation student (issue 22, item 4): export carries the task and a
context summary, predict writes answers, eval re-scores through the one decoding path; tiny models, real rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from icldistill.cli import main
from icldistill.config import EvalOptions, GenDistillOptions, PredictOptions, build_config
from icldistill.errors import ConfigError, DataError
from icldistill.experiments.compare import compare_runs
from icldistill.methods.evaluate import run_eval
from icldistill.methods.export import export_run
from icldistill.methods.gen_distill import run_gen_distill
from icldistill.methods.gen_export import INSTRUCTION_LINES, instruction_summary
from icldistill.methods.gen_setup import encode_prompts
from icldistill.methods.gen_source import portable_generation_task, task_from_definition
from icldistill.methods.predict import run_predict
from icldistill.models.loading import load_model
from icldistill.scoring.generation import DecodeSettings, generate
from icldistill.scoring.generation_metrics import Extractor
from icldistill.tasks.generation import (
    GENERATION_DIR,
    GenerationRow,
    GenerationTask,
    draw_demonstrations,
    get_generation_task,
    load_rows,
)

INSTRUCTION = "Solve the problem step by step.\n\nEnd with the line #### N.\nNo units.\nBe brief."


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, tiny_dirs) -> dict[str, Path]:
    """A gen-distill run (sequence signal) on a task file with an instruction and 2 demonstrations, and its export."""
    root = tmp_path_factory.mktemp("gen-after")
    task = yaml.safe_load((GENERATION_DIR / "gsm8k.yaml").read_text())
    task.update(instruction=INSTRUCTION, train=str(data_dir / "gsm8k/train.jsonl.gz"),
                eval={"gsm8k": str(data_dir / "gsm8k/test.jsonl.gz")})
    task_file = root / "mathtask.yaml"
    task_file.write_text(yaml.safe_dump(task))
    config = build_config(GenDistillOptions, dict(
        teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["student"]), task=str(task_file), shots=2, seeds=[0],
        limit=3, batch_size=4, max_new_tokens=6, output_dir=str(root / "run"), dtype="fp32", device="cpu",
        chat_template="no", train_queries=4, dev_queries=0, epochs=1, train_batch_size=4, lr=3e-2,
        cache_dir=str(root / "cache"), signal="sequence"))
    run_gen_distill(config, progress=False)
    export_run(str(root / "run" / "seed-0"), root / "export")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in
                            enumerate(["What is 2 + 3?", "Tom has 4 apples and eats 1. How many are left?", "Why?"])))
    return {"root": root, "run": root / "run", "export": root / "export", "task": task_file, "rows": rows}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _predict(model: Path | str, rows: Path, output: Path, **kw) -> list[dict]:
    run_predict(build_config(PredictOptions, dict(model=str(model), input=str(rows), output=str(output),
                                                  device="cpu", dtype="fp32", **kw)), progress=False)
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_export_carries_the_task_as_it_ran_and_what_the_teacher_saw(trained, tiny_dirs):
    meta = json.loads((trained["export"] / "icldistill.json").read_text())
    seed = json.loads((trained["run"] / "seed-0" / "seed_result.json").read_text())
    assert meta["kind"] == "generation" and meta["format"] == 2 and meta["method"] == "gen-distill"
    definition = meta["task_definition"]
    # The run's override (--max-new-tokens 6), not the task file's 256; the instruction the teacher saw.
    assert definition["type"] == "generation" and definition["max_new_tokens"] == 6
    assert definition["instruction"] == INSTRUCTION and definition["template"] == "Question: {question}\nAnswer:"
    context = meta["context"]
    assert context["teacher"] == str(tiny_dirs["teacher"]) and context["signal"] == "sequence"
    assert context["shots"] == 2 and context["demonstrations"] == seed["demonstrations"]
    assert context["steps"] == seed["resources"]["steps"] and context["labelled_examples"] == 2
    digest = hashlib.sha256(INSTRUCTION.encode()).hexdigest()[:12]
    assert context["instruction"]["sha256"] == digest
    assert context["instruction"]["first_lines"] == ["Solve the problem step by step.", "End with the line #### N.",
                                                     "No units."]
    card = (trained["export"] / "README.md").read_text()
    assert str(tiny_dirs["teacher"]) in card and digest in card and "2 demonstrations" in card
    assert "> Solve the problem step by step." in card and "signal `sequence`" in card
    assert (trained["export"] / "model.safetensors").is_file()


def test_predict_writes_answers_and_the_export_answers_as_the_run(trained, tmp_path):
    from_run = _predict(trained["run"] / "seed-0", trained["rows"], tmp_path / "run.jsonl")
    from_export = _predict(trained["export"], trained["rows"], tmp_path / "export.jsonl")
    assert [r["id"] for r in from_export] == ["q0", "q1", "q2"]  # input order, ids kept
    assert [r["text"] for r in from_export] == [r["text"] for r in from_run]  # the merged weights answer alike
    extract = Extractor("gsm8k")
    assert all(r["answer"] == extract(r["text"]) and 0 < r["tokens"] <= 6 for r in from_export)
    assert from_export[1]["question"].startswith("Tom has 4 apples")
    summary = json.loads((tmp_path / "export.jsonl.summary.json").read_text())
    assert summary["kind"] == "generation" and summary["rows"] == 3 and not summary["context"]


def test_an_export_answers_where_its_task_file_is_gone(trained, tmp_path):
    moved = tmp_path / "export"
    shutil.copytree(trained["export"], moved)
    meta = json.loads((moved / "icldistill.json").read_text())
    meta["task_ref"] = str(tmp_path / "gone.yaml")
    (moved / "icldistill.json").write_text(json.dumps(meta))
    before = _predict(trained["export"], trained["rows"], tmp_path / "a.jsonl")
    after = _predict(moved, trained["rows"], tmp_path / "b.jsonl")
    assert [r["text"] for r in after] == [r["text"] for r in before]
    with pytest.raises(ConfigError, match="--task"):  # evaluation sets need the task's data
        run_eval(build_config(EvalOptions, dict(model=str(moved), device="cpu", dtype="fp32")), progress=False)


def test_a_plain_model_with_a_generation_task_answers_as_the_icl_teacher(trained, tiny_dirs, data_dir, tmp_path):
    out = _predict(tiny_dirs["teacher"], trained["rows"], tmp_path / "t.jsonl", task=str(trained["task"]), shots=2,
                   seed=3, data_dir=str(data_dir), batch_size=3)
    summary = json.loads((tmp_path / "t.jsonl.summary.json").read_text())
    assert summary["context"] and summary["shots"] == 2 and summary["source"] == "model"
    # The reference: the instruction and the seed's demonstrations rendered whole, decoded without the prefix cache.
    task = get_generation_task(str(trained["task"]))
    rows = [GenerationRow(r["id"], {"question": r["question"]}) for r in _lines(trained["rows"])]
    demos = draw_demonstrations(dataclasses.replace(task, shots=2), load_rows(task, task.train), 3,
                                exclude=frozenset(task.query_text(r) for r in rows))
    model = load_model(str(tiny_dirs["teacher"]), dtype="fp32", device="cpu")
    prompts = encode_prompts(model, task, rows, demos, with_instruction=True)
    assert all(INSTRUCTION in model.tokenizer.decode(p) for p in prompts)
    settings = DecodeSettings(max_new_tokens=task.max_new_tokens, stop=task.stop, batch_size=1)
    expected = generate(model.model, model.tokenizer, prompts, settings, use_prefix_cache=False)
    assert [r["text"] for r in out] == [g.text for g in expected]


def test_bad_input_names_the_file_and_row_and_writes_nothing(trained, tmp_path):
    rows = tmp_path / "bad.jsonl"
    rows.write_text('{"id": "a", "question": "fine"}\n{"id": "b", "text": "no question"}\n')
    with pytest.raises(DataError, match=rf"{rows}:2: missing field 'question'"):
        _predict(trained["export"], rows, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_eval_rescores_through_the_runs_own_decoding(trained, data_dir):
    record = run_eval(build_config(EvalOptions, dict(model=str(trained["run"]), limit=3, device="cpu", dtype="fp32",
                                                     batch_size=2)), progress=False)
    run = json.loads((trained["run"] / "results.json").read_text())
    out = Path(record["output_dir"])
    assert out == trained["run"] / "eval-gsm8k" and record["kind"] == "generation"
    mine, theirs = record["seeds"]["0"]["eval"]["gsm8k"], run["seeds"]["0"]["eval"]["gsm8k"]
    for key in ("n", "exact_match", "token_f1", "answer_tokens", "exact_match_ci95"):
        assert mine[key] == theirs[key]
    texts = {r["id"]: r["text"] for r in _lines(trained["run"] / "predictions.jsonl")}
    again = {r["id"]: r["text"] for r in _lines(out / "predictions.jsonl")}
    assert again == texts  # batch size 2 here, 4 in the run: the same greedy answers
    paired = compare_runs(trained["run"], out)
    assert [p.metric for p in paired] == ["accuracy", "token_f1"]
    assert all(p.difference == 0.0 and p.queries == 3 for p in paired)


def test_eval_refuses_a_set_the_task_lacks(trained):
    with pytest.raises(ConfigError, match="--eval nope: generation task 'mathtask' has the evaluation sets gsm8k"):
        run_eval(build_config(EvalOptions, dict(model=str(trained["run"]), eval=["nope"], device="cpu")),
                 progress=False)


def test_cli_export_and_predict(trained, tmp_path, capsys):
    assert main(["--quiet", "export", str(trained["run"] / "seed-0"), "--output", str(tmp_path / "e")]) == 0
    assert "signal sequence" in capsys.readouterr().out
    assert main(["--quiet", "predict", "--model", str(tmp_path / "e"), "--input", str(trained["rows"]), "--output",
                 str(tmp_path / "a.csv"), "--device", "cpu", "--dtype", "fp32"]) == 0
    assert "3 rows answered" in capsys.readouterr().out
    header = (tmp_path / "a.csv").read_text().splitlines()[0]
    assert header == "id,question,text,answer,tokens,finish"


_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(name=st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), inputs=st.lists(
    st.from_regex(r"[a-z]{1,8}", fullmatch=True), min_size=1, max_size=3, unique=True), instruction=_texts,
    shots=st.integers(0, 8), stop=st.lists(_texts.filter(bool), max_size=3), max_new=st.integers(1, 512),
    chat=st.sampled_from(["auto", "yes", "no"]), extractor=st.sampled_from(["gsm8k", "last-number", "none"]))
def test_a_portable_generation_task_round_trips(name, inputs, instruction, shots, stop, max_new, chat, extractor):
    task = GenerationTask(name, tuple(inputs), " ".join(f"{{{i}}}" for i in inputs), answer_column="answer",
                          instruction=instruction, shots=shots, stop=tuple(stop), max_new_tokens=max_new,
                          chat_template=chat, extractor=extractor)
    carried = json.loads(json.dumps(portable_generation_task(task)))  # as icldistill.json stores it
    assert task_from_definition(carried, "x") == dataclasses.replace(task, train=None, eval={})


def test_a_definition_of_another_kind_is_refused():
    with pytest.raises(ConfigError, match="x: task_definition is not a generation task's"):
        task_from_definition({"name": "mnli", "fields": ["premise"], "template": "{premise}"}, "x")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e"
                                      "\x85\u2028\u2029"), max_size=200), max_size=8))
def test_the_instruction_summary_shows_its_first_lines_and_digest(lines):
    text = "\n".join(lines)
    summary = instruction_summary(text)
    if not text:
        assert summary is None
        return
    shown = [line for line in lines if line.strip()]
    assert summary["first_lines"] == [line[:160] for line in shown[:INSTRUCTION_LINES]]
    assert summary["lines"] == len(shown) and summary["chars"] == len(text)
    assert summary["sha256"] == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert instruction_summary(text + "!")["sha256"] != summary["sha256"]
