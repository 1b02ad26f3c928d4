"""Tests for icldistill.tasks.registry: the built-in task files are consistent, their lookups fail helpfully,
and their patterns, label words and label maps are the protocol's (PROTOCOL.md)."""

from __future__ import annotations

import string
from collections import Counter
from pathlib import Path

import pytest

from icldistill.errors import ConfigError
from icldistill.tasks import data
from icldistill.tasks.prompts import resolve_pattern
from icldistill.tasks.registry import BUILTIN_DIR, EVAL_SETS, TASKS, family_of, get_eval_set, get_task

ALL_SPECS = [(t.name, t.train) for t in TASKS.values()] + [
    (t.name, s) for t in TASKS.values() for s in t.eval_sets.values()]


def test_every_builtin_task_is_a_file_shipped_in_the_package() -> None:
    assert sorted(TASKS) == sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
    assert {"mnli", "mnli-nonent", "rte", "cb", "wnli", "sst2", "trec", "agnews", "mnli3"} <= set(TASKS)
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert "tasks/builtin/*.yaml" in pyproject


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_is_consistent(name: str) -> None:
    task = get_task(name)
    assert task is TASKS[name] and task.name == name
    family = family_of(task)
    assert task.train.family == task.family
    assert task.default_pattern in family.patterns
    assert task.default_eval
    for eval_name in task.default_eval:
        spec = get_eval_set(eval_name, task)
        assert spec.family == task.family and spec.fields == family.fields


@pytest.mark.parametrize(("task", "spec"), ALL_SPECS, ids=[f"{t}:{s.name}" for t, s in ALL_SPECS])
def test_every_spec_maps_onto_every_class(task: str, spec: data.DataSpec) -> None:
    classes = family_of(TASKS[task]).classes
    mapped = {v for v in spec.label_map.values() if v is not None}
    assert mapped == set(range(len(classes)))  # every class reachable, nothing out of range


@pytest.mark.parametrize(("task", "spec"), ALL_SPECS, ids=[f"{t}:{s.name}" for t, s in ALL_SPECS])
def test_every_spec_loads_the_real_data_with_every_class(data_dir: Path, task: str, spec: data.DataSpec) -> None:
    loaded = data.load(spec, data_dir, "local")
    family = family_of(TASKS[task])
    counts = Counter(ex.label for ex in loaded.examples)
    assert set(counts) == set(range(len(family.classes)))
    assert all(set(ex.fields) == set(family.fields) for ex in loaded.examples)


def test_eval_set_of_another_task_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        get_eval_set("sst2", get_task("mnli"))
    message = str(info.value)
    assert "'sst2'" in message and "'mnli'" in message and "mnli-m" in message
    with pytest.raises(ConfigError, match="for task 'sst2'"):
        get_eval_set("hans-lo", get_task("sst2"))


def test_unknown_task_lists_known_tasks() -> None:
    with pytest.raises(ConfigError) as info:
        get_task("mnli-x")
    assert "'mnli-x'" in str(info.value)
    assert all(name in str(info.value) for name in TASKS)


@pytest.mark.parametrize(("typo", "meant"), [("mnlii", "mnli"), ("sst", "sst2"), ("agnew", "agnews"), ("tre", "trec")])
def test_unknown_task_suggests_the_closest_name(typo: str, meant: str) -> None:
    """Issue 23 item 12: a task name gets a "did you mean" as a model name does."""
    with pytest.raises(ConfigError, match=rf"Unknown task '{typo}'\. Did you mean: [^?]*\b{meant}\b"):
        get_task(typo)


def test_unknown_eval_set_lists_the_tasks_sets() -> None:
    task = get_task("mnli")
    with pytest.raises(ConfigError) as info:
        get_eval_set("hans-xx", task)
    assert "'hans-xx'" in str(info.value)
    assert all(name in str(info.value) for name in task.eval_sets)


def test_nli_patterns_are_the_protocols() -> None:
    patterns = family_of(TASKS["mnli"]).patterns
    assert patterns["gpt3"].template == "{premise} question: {hypothesis} Yes or No? answer:"
    assert patterns["minimal"].template == "{premise} {hypothesis} ?"
    assert patterns["eval-harness"].template == "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:"
    assert patterns["gpt3"].label_words == (" Yes", " No")
    assert patterns["minimal"].label_words == (" Yes", " No")
    assert patterns["eval-harness"].label_words == (" True", " False")
    assert family_of(TASKS["mnli"]).classes == ("entailment", "non-entailment")
    assert TASKS["mnli"].default_pattern == "gpt3"


@pytest.mark.parametrize("name", list(TASKS))
def test_every_pattern_uses_exactly_the_task_columns(name: str) -> None:
    family = family_of(TASKS[name])
    for spec in family.patterns.values():
        names = {n for _, n, _, _ in string.Formatter().parse(spec.template) if n is not None}
        assert names == set(family.fields)
        assert len(spec.label_words) == len(family.classes) == len(set(spec.label_words))
        assert resolve_pattern(family, spec.template, spec.label_words).template == spec.template
    assert set(family.content_free) == set(family.fields)


def test_label_maps() -> None:
    hans = {"entailment": 0, "non-entailment": 1}
    for name in ("hans", "hans-lo", "hans-sub", "hans-const"):
        assert dict(EVAL_SETS[name].label_map) == hans
        assert EVAL_SETS[name].meta_fields == ("heuristic", "subcase")
    assert dict(EVAL_SETS["hans-lo"].filter) == {"heuristic": "lexical_overlap"}
    assert dict(EVAL_SETS["hans-sub"].filter) == {"heuristic": "subsequence"}
    assert dict(EVAL_SETS["hans-const"].filter) == {"heuristic": "constituent"}
    assert not EVAL_SETS["hans"].filter
    # binarised MNLI: entailment -> ' Yes' (0), contradiction -> ' No' (1), neutral dropped
    assert dict(EVAL_SETS["mnli-m"].label_map) == {"entailment": 0, "contradiction": 1, "neutral": None}
    assert dict(TASKS["mnli"].train.label_map) == {"entailment": 0, "contradiction": 1, "neutral": None}
    assert dict(EVAL_SETS["mnli-m-nonent"].label_map) == {"entailment": 0, "contradiction": 1, "neutral": 1}
    assert dict(TASKS["mnli-nonent"].train.label_map) == {"entailment": 0, "contradiction": 1, "neutral": 1}
    assert dict(EVAL_SETS["rte"].label_map) == {"entailment": 0, "not_entailment": 1}
    assert TASKS["mnli"].default_eval == ("mnli-m", "hans-lo")
    # a variant keeps the base's sets with their own mappings
    assert dict(TASKS["mnli-nonent"].eval_sets["mnli-m"].label_map) == dict(EVAL_SETS["mnli-m"].label_map)
    assert dict(TASKS["mnli3"].eval_sets["mnli-m"].label_map) == {"entailment": 0, "neutral": 1, "contradiction": 2}


def test_new_multiclass_tasks(data_dir: Path) -> None:
    assert family_of(TASKS["trec"]).classes == ("abbreviation", "description", "entity", "human", "location", "number")
    assert len(family_of(TASKS["agnews"]).classes) == 4
    assert family_of(TASKS["mnli3"]).classes == ("entailment", "neutral", "contradiction")
    # AG News: train and evaluation are carved out of one 7,600-row file, disjoint and complete
    agnews = TASKS["agnews"]
    train = data.load(agnews.train, data_dir, "local").examples
    test = data.load(agnews.eval_sets["agnews"], data_dir, "local").examples
    assert len(test) == 1600 and len(train) == 6000
    assert not {ex.id for ex in train} & {ex.id for ex in test}
    assert len({ex.id for ex in train} | {ex.id for ex in test}) == 7600
    # TREC: SOURCES.md counts
    trec = data.load(TASKS["trec"].eval_sets["trec"], data_dir, "local").examples
    assert sorted(Counter(ex.label for ex in trec).values()) == sorted([9, 138, 94, 65, 81, 113])
