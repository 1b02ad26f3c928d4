"""Tests for icldistill.tasks.registry: the registry is consistent, its lookups fail helpfully, and its patterns,
label words and label maps are the protocol's (PROTOCOL.md)."""

from __future__ import annotations

import string
from collections import Counter
from pathlib import Path

import pytest

from icldistill.tasks import data
from icldistill.errors import ConfigError
from icldistill.tasks.prompts import resolve_pattern
from icldistill.tasks.registry import EVAL_SETS, FAMILIES, TASKS, family_of, get_eval_set, get_task


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_is_consistent(name: str) -> None:
    task = get_task(name)
    assert task is TASKS[name] and task.name == name
    family = family_of(task)
    assert task.train.family == task.family
    assert task.default_pattern in family.patterns
    assert task.default_eval
    for eval_name in task.default_eval:
        assert get_eval_set(eval_name, task).family == task.family


@pytest.mark.parametrize("name", list(EVAL_SETS))
def test_every_eval_set_is_consistent(name: str) -> None:
    spec = get_eval_set(name)
    assert spec is EVAL_SETS[name] and spec.name == name
    classes = FAMILIES[spec.family].classes
    mapped = {v for v in spec.label_map.values() if v is not None}
    assert mapped == set(range(len(classes)))  # every class reachable, nothing out of range


@pytest.mark.parametrize(
    "spec", [t.train for t in TASKS.values()] + list(EVAL_SETS.values()), ids=lambda s: s.name
)
def test_every_spec_loads_the_real_data_with_both_classes(data_dir: Path, spec: data.DataSpec) -> None:
    loaded = data.load(spec, data_dir, "local")
    counts = Counter(ex.label for ex in loaded.examples)
    assert set(counts) == set(range(len(FAMILIES[spec.family].classes)))
    assert all(set(ex.fields) == set(FAMILIES[spec.family].fields) for ex in loaded.examples)


def test_eval_set_of_another_family_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        get_eval_set("sst2", get_task("mnli"))
    message = str(info.value)
    assert "'sst2'" in message and "'mnli'" in message and "mnli-m" in message
    with pytest.raises(ConfigError, match="does not fit task 'sst2'"):
        get_eval_set("hans-lo", get_task("sst2"))


def test_unknown_task_lists_known_tasks() -> None:
    with pytest.raises(ConfigError) as info:
        get_task("mnli-x")
    assert "'mnli-x'" in str(info.value)
    assert all(name in str(info.value) for name in TASKS)


def test_unknown_eval_set_lists_known_sets() -> None:
    with pytest.raises(ConfigError) as info:
        get_eval_set("hans-xx", get_task("mnli"))
    assert "'hans-xx'" in str(info.value)
    assert all(name in str(info.value) for name in EVAL_SETS)


def test_nli_patterns_are_the_protocols() -> None:
    patterns = FAMILIES["nli"].patterns
    assert patterns["gpt3"].template == "{premise} question: {hypothesis} Yes or No? answer:"
    assert patterns["minimal"].template == "{premise} {hypothesis} ?"
    assert patterns["eval-harness"].template == "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:"
    assert patterns["gpt3"].label_words == (" Yes", " No")
    assert patterns["minimal"].label_words == (" Yes", " No")
    assert patterns["eval-harness"].label_words == (" True", " False")
    assert FAMILIES["nli"].classes == ("entailment", "non-entailment")
    assert TASKS["mnli"].default_pattern == "gpt3"


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=lambda f: f.name)
def test_every_pattern_uses_exactly_the_family_fields(family) -> None:
    for spec in family.patterns.values():
        names = {n for _, n, _, _ in string.Formatter().parse(spec.template) if n is not None}
        assert names == set(family.fields)
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
