"""Generation task files: checked key by key, and prompts rendered plain or through a chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import make_tokenizer

from icldistill.errors import ConfigError
from icldistill.tasks.generation import (
    GenerationRow,
    draw_demonstrations,
    parse_generation_task,
    render_prompt,
    rows_from_records,
)

GSM8K = {"type": "generation", "name": "gsm8k", "inputs": ["question"], "template": "Question: {question}\nAnswer:",
         "answer_column": "answer", "shots": 2, "stop": ["\n\nQuestion:"], "max_new_tokens": 64,
         "train": "gsm8k/train.jsonl.gz", "eval": {"gsm8k": "gsm8k/test.jsonl.gz"}}


def task(**changes):
    return parse_generation_task({**GSM8K, **changes}, Path("/tasks/gsm8k.yaml"))


def test_a_task_file_is_read():
    t = task()
    assert (t.inputs, t.shots, t.stop, t.max_new_tokens, t.chat_template) == (("question",), 2, ("\n\nQuestion:",), 64,
                                                                             "auto")


@pytest.mark.parametrize("changes, message", [
    ({"template": "Q: {query}"}, "{query} is not among the inputs"),
    ({"answer_column": None}, "demonstrations need answers"),
    ({"chat_template": "maybe"}, "chat_template"),
    ({"shots": -1}, "shots must be"),
    ({"inputs": []}, "inputs"),
    ({"labels": ["a"]}, "unknown key 'labels'"),
])
def test_mistakes_name_the_file_and_key(changes, message):
    with pytest.raises(ConfigError, match="gsm8k.yaml") as err:
        task(**changes)
    assert message in str(err.value)


def test_instruction_file_is_read_relative_to_the_task(tmp_path):
    (tmp_path / "style.txt").write_text("Answer like a pirate.\n", encoding="utf-8")
    t = parse_generation_task({**GSM8K, "shots": 0, "instruction_file": "style.txt"}, tmp_path / "t.yaml")
    assert t.instruction == "Answer like a pirate."
    with pytest.raises(ConfigError, match="cannot read"):
        parse_generation_task({**GSM8K, "instruction_file": "absent.txt"}, tmp_path / "t.yaml")


def test_rows_name_a_missing_column():
    t = task()
    records = [{"id": "a", "question": "2+2?", "answer": "#### 4"}, {"id": "b", "question": "x"}]
    rows = rows_from_records(t, records, "f")
    assert rows[0] == GenerationRow("a", {"question": "2+2?"}, "#### 4") and rows[1].reference is None
    with pytest.raises(ConfigError, match="f: row 2: column 'question'"):
        rows_from_records(t, [{"question": "q"}, {"question": ""}], "f")


def rows(n):
    return [GenerationRow(str(i), {"question": f"q{i}?"}, f"#### {i}") for i in range(n)]


def test_teacher_and_student_prompts():
    t = task(instruction="Think step by step.")
    demos = draw_demonstrations(t, rows(10), seed=0, exclude=frozenset({"Question: q3?\nAnswer:"}))
    assert len(demos) == 2 and all(d.id != "3" for d in demos)
    assert demos == draw_demonstrations(t, rows(10), seed=0, exclude=frozenset({"Question: q3?\nAnswer:"}))
    query = rows(10)[3]
    teacher = render_prompt(t, query, demos)
    student = render_prompt(t, query, (), with_instruction=False)
    assert teacher.startswith("Think step by step.\n\nQuestion: q")
    assert teacher.endswith("\n\n" + student) and student == "Question: q3?\nAnswer:"
    assert f"Answer: {demos[0].reference}" in teacher


def test_chat_template_renders_turns():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    t = task(instruction="Be brief.")
    demos = rows(2)
    text = render_prompt(t, rows(3)[2], demos, tok)
    assert text == ("<system>Be brief.</system><user>Question: q0?\nAnswer:</user><assistant>#### 0</assistant>"
                    "<user>Question: q1?\nAnswer:</user><assistant>#### 1</assistant>"
                    "<user>Question: q2?\nAnswer:</user><assistant>")
    plain = task(chat_template="no")
    assert "<user>" not in render_prompt(plain, rows(3)[2], demos, tok)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        render_prompt(task(chat_template="yes"), rows(3)[2], demos, tok)


def test_the_builtin_gsm8k_task_reads_the_real_data():
    import os

    from icldistill.tasks.generation import get_generation_task, load_rows

    data = os.environ.get("ICLDISTILL_DATA")
    if not data or not (Path(data) / "gsm8k").is_dir():
        pytest.skip("the shared data is not here")
    t = get_generation_task("gsm8k")
    test = load_rows(t, t.eval["gsm8k"], data)
    assert len(test) == 1319 and test[0].id == "gsm8k-test-00000" and test[0].reference.endswith("#### 18")
    assert t.train is not None and len(load_rows(t, t.train, data)) == 7473


def test_user_task_with_a_carve_and_lookup(tmp_path, monkeypatch):
    from icldistill.tasks.generation import get_generation_task, is_generation_file, load_rows

    rows = "".join(f'{{"id": "r{i}", "q": "question {i}", "a": "#### {i}"}}\n' for i in range(20))
    (tmp_path / "rows.jsonl").write_text(rows, encoding="utf-8")
    (tmp_path / "mine.yaml").write_text(
        "type: generation\ninputs: [q]\ntemplate: 'Q: {q}\\nA:'\nanswer_column: a\n"
        "train: {path: rows.jsonl, carve: {part: train, eval_rows: 5}}\n"
        "eval: {held: {path: rows.jsonl, carve: {part: eval, eval_rows: 5}}}\n", encoding="utf-8")
    monkeypatch.setenv("ICLDISTILL_TASKS", str(tmp_path))
    assert is_generation_file(tmp_path / "mine.yaml")
    t = get_generation_task("mine")
    train, held = load_rows(t, t.train), load_rows(t, t.eval["held"])
    assert len(train) == 15 and len(held) == 5 and not {r.id for r in train} & {r.id for r in held}
    with pytest.raises(ConfigError, match="Did you mean: mine"):
        get_generation_task("mien")


def test_classification_commands_refuse_a_generation_task(tmp_path):
    from icldistill.tasks.registry import get_task

    path = tmp_path / "gen.yaml"
    path.write_text("type: generation\ninputs: [q]\ntemplate: '{q}'\neval: {a: x.jsonl}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is a generation task"):
        get_task(str(path))
