"""Tests for task files (icldistill.tasks.taskfile): a user's CSV task, variants, $ICLDISTILL_TASKS, data
files of every format, carved splits, and one clear error per mistake, naming the file and the key."""

from __future__ import annotations

import csv
import gzip
import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from icldistill.config import DistillOptions, IclOptions, build_config
from icldistill.errors import ConfigError, DataError, PromptError
from icldistill.methods.common import prepare
from icldistill.methods.distill import training_queries
from icldistill.tasks import data
from icldistill.tasks.prompts import check_label_words_tokenize_apart, resolve_pattern, sample_demonstrations
from icldistill.tasks.registry import Carve, family_of, get_eval_set, get_task, task_files
from icldistill.tasks.taskfile import TaskFileError, load_task_file

FEW = settings(max_examples=25, deadline=None, derandomize=True)
CLASSES = ("billing", "outage", "feature")
TEXTS = {"billing": "I was charged twice for invoice {i}",
         "outage": "The service {i} is down since this morning",
         "feature": "Please add export {i} to the dashboard"}

TASK = """\
inputs: [ticket]
label_column: queue
classes:
  billing: [billing, invoice]
  outage: [outage]
  feature: [feature]
drop: [spam]
patterns:
  ticket:
    template: "Ticket: {ticket}\\nQueue:"
    label_words: {billing: " billing question", outage: " service outage", feature: " feature request"}
train: {path: tickets.csv}
eval:
  test: {path: tickets-test.csv}
"""


def _write_csv(path: Path, n: int, start: int = 0, extra: list[dict] | None = None, delimiter: str = ",") -> None:
    rows = [{"ticket": TEXTS[c].format(i=i), "queue": c} for i in range(start, start + n) for c in CLASSES]
    rows += extra or []
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["ticket", "queue"], delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def user_task(tmp_path: Path) -> Path:
    (tmp_path / "my_task.yaml").write_text(TASK, encoding="utf-8")
    _write_csv(tmp_path / "tickets.csv", 6, extra=[{"ticket": "buy now", "queue": "spam"},
                                                    {"ticket": "my invoice is wrong", "queue": "invoice"}])
    _write_csv(tmp_path / "tickets-test.csv", 3, start=100)
    return tmp_path / "my_task.yaml"


# ---------------------------------------------------------------------------------------------- a user's task


def test_user_csv_task_resolves_paths_against_its_own_directory(user_task: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path.parent)  # not the task file's directory
    task = get_task(str(user_task))
    family = family_of(task)
    assert task.name == "my_task" and family.classes == CLASSES and family.fields == ("ticket",)
    assert family.content_free == {"ticket": "N/A"}
    assert family.patterns["ticket"].label_words == (" billing question", " service outage", " feature request")
    train = data.load(task.train, None, "local")
    # spam dropped; 'invoice' is a raw value of billing; no id column: the CSV line number is the id
    assert len(train.examples) == 19 and train.examples[-1].label == 0
    assert [ex.id for ex in train.examples[:2]] == ["2", "3"]
    test = data.load(get_eval_set("test", task), None, "local")
    assert [ex.label for ex in test.examples] == [0, 1, 2] * 3


def test_user_task_runs_through_prepare_with_balanced_three_class_demonstrations(user_task: Path) -> None:
    setup = prepare(build_config(IclOptions, {"task": str(user_task), "shots": 6}))
    assert list(setup.eval_examples) == ["test"]  # --eval defaults to the task's sets
    demos = setup.demonstrations(0, 6)
    assert sorted(d.label for d in demos) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(PromptError, match=r"multiple of 3 \(3, 6, 9, 12"):
        setup.demonstrations(0, 4)


@pytest.mark.parametrize("suffix", [".tsv", ".parquet", ".jsonl", ".jsonl.gz"])
def test_every_data_format_reads_the_same_rows(tmp_path: Path, suffix: str) -> None:
    _write_csv(tmp_path / "rows.csv", 2)
    rows = list(csv.DictReader((tmp_path / "rows.csv").open(encoding="utf-8")))
    path = tmp_path / f"rows{suffix}"
    if suffix == ".tsv":
        _write_csv(path, 2, delimiter="\t")
    elif suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(text, mtime=0) if suffix.endswith(".gz") else text)
    task_text = TASK.replace("tickets.csv", path.name).replace("tickets-test.csv", "rows.csv")
    (tmp_path / "t.yaml").write_text(task_text, encoding="utf-8")
    task = load_task_file(tmp_path / "t.yaml")
    got = [(dict(ex.fields), ex.label) for ex in data.load(task.train, None, "local").examples]
    want = [(dict(ex.fields), ex.label) for ex in data.load(task.eval_sets["test"], None, "local").examples]
    assert got == want and len(got) == 6


def test_jsonl_is_found_gzipped_and_the_other_way_round(tmp_path: Path) -> None:
    rows = [{"ticket": TEXTS[c].format(i=0), "queue": c} for c in CLASSES]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "t.yaml").write_text(TASK.replace("tickets.csv", "a.jsonl").replace("tickets-test.csv", "b.jsonl.gz"))
    task = load_task_file(tmp_path / "t.yaml")
    assert len(data.load(task.train, None, "local").examples) == 3
    assert len(data.load(task.eval_sets["test"], None, "local").examples) == 3


def test_bare_data_file_as_eval_set_follows_the_task_columns(user_task: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.csv"
    _write_csv(other, 2, start=500)
    setup = prepare(build_config(IclOptions, {"task": str(user_task), "eval": [str(other), "test"]}))
    assert list(setup.eval_examples) == [str(other), "test"]  # results are keyed by what --eval said
    assert setup.eval_specs[str(other)].name == "elsewhere"
    assert len(setup.eval_examples[str(other)]) == 6


def test_tasks_directory_from_environment(user_task: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICLDISTILL_TASKS", str(user_task.parent))
    assert task_files()["my_task"] == user_task
    assert "mnli" in task_files()  # built-ins stay
    assert family_of(get_task("my_task")).classes == CLASSES


# ---------------------------------------------------------------------------------------------- variants


def test_variant_overrides_keys_and_merges_sets_and_patterns(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "mine.yaml").write_text(textwrap.dedent("""\
        base: mnli
        patterns:
          mine: {template: "{premise} => {hypothesis}?", label_words: [" yes", " no"]}
          minimal: null
        eval:
          hans-sub: null
        default_pattern: mine
        default_eval: [mnli-m]
        """))
    task = get_task(str(tmp_path / "mine.yaml"))
    base = get_task("mnli")
    assert task.name == "mine" and family_of(task).classes == family_of(base).classes
    assert set(family_of(task).patterns) == {"gpt3", "eval-harness", "mine"}
    assert "hans-sub" not in task.eval_sets and "hans-lo" in task.eval_sets
    # the base's relative paths still resolve against the data directory
    assert data.load(task.eval_sets["rte"], data_dir, "local").examples


def test_mnli3_is_three_way_and_refuses_binary_hans() -> None:
    with pytest.raises(ConfigError, match="Unknown evaluation set 'hans-lo' for task 'mnli3'"):
        get_eval_set("hans-lo", get_task("mnli3"))


# ---------------------------------------------------------------------------------------------- bad task files

BAD_TASKS = [
    ("unknown-column", {"patterns": {"p": {"template": "{ticket} {body}", "label_words": ["a", "b", "c"]}}},
     "patterns.p.template", "unknown column {body}"),
    ("class-without-word",
     {"patterns": {"p": {"template": "{ticket}", "label_words": {"billing": " b", "outage": " o"}}}},
     "patterns.p.label_words", "class 'feature' has no label word"),
    ("duplicate-words", {"patterns": {"p": {"template": "{ticket}", "label_words": [" a", " b", " a"]}}},
     "patterns.p.label_words", "same label word"),
    ("empty-word", {"patterns": {"p": {"template": "{ticket}", "label_words": [" a", "  ", " c"]}}},
     "patterns.p.label_words", "is empty"),
    ("too-few-words", {"patterns": {"p": {"template": "{ticket}", "label_words": [" a", " b"]}}},
     "patterns.p.label_words", "2 label words for 3 classes"),
    ("word-for-unknown-class",
     {"patterns": {"p": {"template": "{ticket}", "label_words": {"billing": "a", "outage": "b", "feature": "c",
                                                                "x": "d"}}}},
     "patterns.p.label_words", "'x' is not a class"),
    ("raw-value-twice", {"classes": {"billing": ["billing"], "outage": ["billing"], "feature": ["feature"]}},
     "classes.outage", "already given to class 'billing'"),
    ("dropped-and-mapped", {"drop": ["outage"]}, "drop", "both dropped and a value of class 'outage'"),
    ("missing-base", {"base": "mnli-typo"}, "base", "task 'mnli-typo' does not exist"),
    ("eval-classes-differ", {"eval": {"test": {"path": "tickets-test.csv", "classes": ["billing", "outage"]}}},
     "eval.test", "differ from the train set's"),
    ("unknown-key", {"label_colum": "queue"}, "unknown key 'label_colum'", "Did you mean: label_column"),
    ("unknown-source-key", {"train": {"file": "tickets.csv"}}, "train", "unknown key 'file'"),
    ("no-inputs", {"inputs": []}, "inputs", "list the input columns"),
    ("bad-default-eval", {"default_eval": ["nope"]}, "default_eval", "'nope' is not an evaluation set"),
    ("bad-carve", {"train": {"path": "tickets.csv", "carve": {"part": "middle", "eval_rows": 3}}}, "train", "carve"),
    ("bad-suffix", {"train": {"path": "tickets.xlsx"}}, "train", "is not a .jsonl"),
]


@pytest.mark.parametrize(("case", "change", "key", "hint"), BAD_TASKS, ids=[c[0] for c in BAD_TASKS])
def test_bad_task_file_names_file_and_key(user_task: Path, case: str, change: dict, key: str, hint: str) -> None:
    import yaml

    definition = {**yaml.safe_load(TASK), **change}
    user_task.write_text(yaml.safe_dump(definition), encoding="utf-8")
    with pytest.raises(TaskFileError) as info:
        get_task(str(user_task))
    message = str(info.value)
    assert str(user_task) in message and key in message and hint in message


def test_base_cycle_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(TaskFileError, match="cycle"):
        load_task_file(tmp_path / "a.yaml")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("inputs: [text]\nclasses: [a, b\n")
    with pytest.raises(TaskFileError, match=r"t\.yaml:\d+: not valid YAML"):
        load_task_file(tmp_path / "t.yaml")


def test_data_file_without_the_named_columns(user_task: Path) -> None:
    (user_task.parent / "tickets.csv").write_text("text,queue\nhello,billing\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        data.load(get_task(str(user_task)).train, None, "local")
    message = str(info.value)
    assert "tickets.csv:2" in message and "missing field 'ticket'" in message and "my_task.yaml: train" in message


def test_label_value_with_no_class_names_file_and_row(user_task: Path) -> None:
    _write_csv(user_task.parent / "tickets.csv", 1, extra=[{"ticket": "?", "queue": "refund"}])
    with pytest.raises(DataError) as info:
        data.load(get_task(str(user_task)).train, None, "local")
    assert "tickets.csv:5: unknown label 'refund'" in str(info.value)


def test_malformed_csv_row_names_the_file(user_task: Path) -> None:
    (user_task.parent / "tickets.csv").write_text('ticket,queue\n"unclosed,billing\nx,y,z,w\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        data.load(get_task(str(user_task)).train, None, "local")
    assert "tickets.csv" in str(info.value)


def test_classes_whose_words_tokenize_identically(tmp_path: Path) -> None:
    from tiny import make_tokenizer
    from tokenizers import normalizers

    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()  # ' Yes' and ' yes' become one sequence
    family = family_of(get_task("mnli"))
    pattern = resolve_pattern(family, "gpt3", [" Yes", " yes"])
    with pytest.raises(PromptError) as info:
        check_label_words_tokenize_apart(tokenizer, pattern, family.classes, "tiny")
    assert "' Yes' (class 'entailment')" in str(info.value) and "tokenize identically" in str(info.value)
    check_label_words_tokenize_apart(tokenizer, resolve_pattern(family, "gpt3"), family.classes, "tiny")


# ---------------------------------------------------------------------------------------------- carving


@FEW
@given(st.integers(2, 60), st.integers(1, 59), st.integers(0, 5))
def test_carved_parts_partition_the_rows(n: int, n_eval: int, seed: int) -> None:
    if n_eval >= n:
        with pytest.raises(DataError):
            data.carve_indices(n, Carve("eval", n_eval, seed))
        return
    ev = data.carve_indices(n, Carve("eval", n_eval, seed))
    tr = data.carve_indices(n, Carve("train", n_eval, seed))
    assert len(ev) == n_eval and sorted(ev + tr) == list(range(n)) and ev == sorted(ev)
    assert ev == data.carve_indices(n, Carve("eval", n_eval, seed))


def test_fractional_carve(tmp_path: Path) -> None:
    assert len(data.carve_indices(200, Carve("eval", 0.25, 1))) == 50


# ---------------------------------------------------------------------------------------------- demonstrations


def test_demonstrations_file_is_used_in_order_recorded_and_kept_out(user_task: Path, tmp_path: Path) -> None:
    demos = tmp_path / "demos.csv"
    # the second row is also an evaluation query: it must leave the evaluation set
    demos.write_text("ticket,queue\nPlease add export 7 to the dashboard,feature\n"
                     "The service 100 is down since this morning,outage\n", encoding="utf-8")
    config = build_config(DistillOptions, {"task": str(user_task), "demonstrations": str(demos), "shots": 2})
    setup = prepare(config)
    fixed = setup.demonstrations(0, 2)
    assert [d.fields["ticket"] for d in fixed] == ["Please add export 7 to the dashboard",
                                                   "The service 100 is down since this morning"]
    assert setup.demonstrations(5, 2) == fixed  # every seed
    assert all(ex.fields["ticket"] != "The service 100 is down since this "
                                      "morning" for ex in setup.eval_examples["test"])
    assert len(setup.eval_examples["test"]) == 8
    queries = training_queries(setup, 0, 10, [fixed])
    assert not {q.text_key() for q in queries} & {d.text_key() for d in fixed}
    record = setup.data_record()["demonstrations"]
    assert [r["ticket"] for r in record["rows"]] == [d.fields["ticket"] for d in fixed]
    assert [r["label"] for r in record["rows"]] == [2, 1]
    with pytest.raises(ConfigError, match="one context"):
        setup.demonstrations(0, 2, context=1)


def test_random_sampling_ignores_classes_and_balanced_does_not(user_task: Path) -> None:
    import random

    pool = data.load(get_task(str(user_task)).train, None, "local").examples
    draws = [sample_demonstrations(pool, 4, 3, random.Random(s), mode="random") for s in range(20)]
    assert all(len(d) == 4 and len({x.id for x in d}) == 4 for d in draws)
    assert any(len({x.label for x in d}) < 3 for d in draws)  # some draw misses a class
    with pytest.raises(PromptError, match="demo-sampling"):
        sample_demonstrations(pool, 3, 3, random.Random(0), mode="stratified")


# ---------------------------------------------------------------------------------------------- icld tasks


def test_icld_tasks_lists_builtin_and_environment_tasks(user_task: Path, monkeypatch, capsys) -> None:
    from icldistill.cli import main

    monkeypatch.setenv("ICLDISTILL_TASKS", str(user_task.parent))
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("mnli", "trec", "agnews", "mnli3", "my_task"):
        assert name in out
    assert "6: abbreviation/description" in out and str(user_task) in out


def test_icld_tasks_reads_each_task_file_once(user_task: Path, monkeypatch, capsys) -> None:
    """The listing asked each file whether it is a generation task, then loaded it (and each variant its base):
    every file was read two or more times."""
    import functools
    from collections import Counter

    from icldistill.cli import main
    from icldistill.tasks import taskfile

    (user_task.parent / "my_variant.yaml").write_text("base: my_task.yaml\ndescription: a variant\n")
    (user_task.parent / "my_gen.yaml").write_text("type: generation\ninputs: [q]\ntemplate: '{q}'\n")
    monkeypatch.setenv("ICLDISTILL_TASKS", str(user_task.parent))
    reads: Counter[str] = Counter()
    read_text = Path.read_text

    def counted(self: Path, *args, **kwargs) -> str:
        if self.suffix in (".yaml", ".yml"):
            reads[self.name] += 1
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    for name in ("_parse_task_yaml", "_load_cached"):  # empty caches, as in a fresh process (the others' kept)
        monkeypatch.setattr(taskfile, name, functools.lru_cache(maxsize=256)(getattr(taskfile, name).__wrapped__))
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "my_variant" in out and "my_gen" in out and "mnli3" in out
    listed = set(task_files()) | {"my_gen"}
    assert {Path(name).stem for name in reads} == listed  # every task file was read ...
    assert set(reads.values()) == {1}, reads  # ... once (mnli.yaml too, the base of mnli3 and others)


def test_icld_tasks_show_prints_the_resolved_definition_and_a_prompt(user_task: Path, capsys) -> None:
    import yaml

    from icldistill.cli import main

    assert main(["tasks", "show", str(user_task)]) == 0
    out = capsys.readouterr().out
    definition, prompt = out.split("# one rendered prompt")
    resolved = yaml.safe_load(definition)
    assert resolved["label_column"] == "queue" and resolved["name"] == "my_task"
    assert prompt.count("Ticket:") == 4  # one demonstration per class, then the query
    assert prompt.rstrip().endswith("Queue:")
    assert " billing question" in prompt and " service outage" in prompt and " feature request" in prompt


def test_icld_tasks_show_fails_when_the_data_cannot_be_read(user_task: Path, capsys) -> None:
    """Issue 23 item 10: the README's check of a task file exits non-zero when its data is unreadable."""
    from icldistill.cli import main

    (user_task.parent / "tickets.csv").unlink()
    assert main(["tasks", "show", str(user_task)]) == 1
    captured = capsys.readouterr()
    assert "content-free input" in captured.out  # the definition and a prompt are still shown
    assert "error: the task's data cannot be read" in captured.err and "tickets.csv" in captured.err


def test_hub_source_with_config_split_revision_and_renamed_label(tmp_path: Path, monkeypatch) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"text": ["What is a bar ?", "Who wrote it ?"], "coarse_label": [1, 3]},
        features=datasets.Features({"text": datasets.Value("string"),
                                    "coarse_label": datasets.ClassLabel(names=["ABBR", "ENTY", "DESC", "HUM"])}))
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or ds)
    (tmp_path / "hubtask.yaml").write_text(textwrap.dedent("""\
        inputs: [text]
        classes: {entity: [ENTY], human: [HUM]}
        patterns: {q: {template: "{text}", label_words: [" thing", " person"]}}
        train: {hub: {path: CogComp/trec, name: default, split: train, revision: abc123, rename: {coarse_label: label}}}
        eval: {test: {hub: {path: CogComp/trec, split: test, rename: {coarse_label: label}}}}
        """))
    task = load_task_file(tmp_path / "hubtask.yaml")
    loaded = data.load(task.train, None, "auto")
    assert calls[0] == (("CogComp/trec", "default"), {"split": "train", "revision": "abc123"})
    assert [ex.label for ex in loaded.examples] == [0, 1]
    with pytest.raises(DataError, match="only a hub source"):
        data.load(task.train, None, "local")


def test_example_sweep_and_task_are_valid(monkeypatch) -> None:
    from icldistill.experiments.grid import validate_file

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the README runs it from the repository root
    report = validate_file(root / "examples" / "tickets" / "sweep.yaml")
    assert report.ok, report.problems
    task = get_task("examples/tickets/tickets.yaml")
    assert family_of(task).classes == ("billing", "technical", "account")
    assert len((root / "examples" / "tickets" / "tickets.yaml").read_text().splitlines()) <= 22
    rows = data.load(task.train, None, "local").examples
    assert len(rows) == 180 and len(data.load(task.eval_sets["test"], None, "local").examples) == 60


def test_a_task_records_a_reference_that_finds_it_again(user_task: Path, tmp_path: Path, monkeypatch) -> None:
    assert get_task("mnli").ref == "mnli"
    task = get_task(str(user_task))
    assert task.ref == str(user_task.resolve())
    monkeypatch.chdir(tmp_path.parent)
    assert family_of(get_task(task.ref)) == family_of(task)  # icld eval / predict re-resolve it from the record


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_text_is_kept_as_the_data_has_it_unless_the_task_strips(tmp_path: Path, suffix: str) -> None:
    """Outer whitespace stays (issue 13: the lineage and lm-eval see it); ``strip_fields: true`` removes it."""
    rows = [{"ticket": f"  The service {i} is down  ", "queue": c} for i, c in enumerate(CLASSES * 2)]
    path = tmp_path / f"rows{suffix}"
    if suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["ticket", "queue"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    base = TASK.replace("tickets.csv", path.name).replace("tickets-test.csv", path.name)
    for strip, expected in ((None, "  The service 0 is down  "), (True, "The service 0 is down")):
        text = base + ("strip_fields: true\n" if strip else "")
        (tmp_path / "t.yaml").write_text(text, encoding="utf-8")
        task = load_task_file(tmp_path / "t.yaml")
        loaded = data.load(task.train, None, "local").examples
        assert loaded[0].fields["ticket"] == expected
    (tmp_path / "t.yaml").write_text(base + "strip_fields: yes please\n", encoding="utf-8")
    with pytest.raises(TaskFileError, match="strip_fields: true or false"):
        load_task_file(tmp_path / "t.yaml")
