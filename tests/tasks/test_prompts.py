"""Tests for icldistill.tasks.prompts: pattern resolution and its errors, balanced seeded demonstration
sampling, the context generator and the demonstration prefix."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from icldistill.errors import PromptError
from icldistill.tasks.data import Example
from icldistill.tasks.prompts import (
    SEPARATOR,
    Pattern,
    context_rng,
    demonstration_prefix,
    resolve_pattern,
    sample_demonstrations,
)
from icldistill.tasks.registry import family_of, get_task

FEW = settings(max_examples=40, deadline=None, derandomize=True)
NLI = family_of(get_task("mnli"))
SENTIMENT = family_of(get_task("sst2"))


def _pool(per_class: int, n_classes: int = 2) -> list[Example]:
    """Examples interleaved by class, each with a distinct text."""
    return [
        Example(f"id{i}", {"premise": f"premise {i}", "hypothesis": f"hypothesis {i}"}, i % n_classes)
        for i in range(per_class * n_classes)
    ]


# ---------------------------------------------------------------------------------------------
# resolve_pattern


@pytest.mark.parametrize("family", [NLI, SENTIMENT], ids=lambda f: f.name)
def test_every_named_pattern_resolves_to_its_spec(family) -> None:
    for name, spec in family.patterns.items():
        pattern = resolve_pattern(family, name)
        assert pattern == Pattern(name, spec.template, spec.label_words)


def test_custom_template_uses_the_family_default_label_words() -> None:
    pattern = resolve_pattern(NLI, "{premise} Q: {hypothesis}?")
    assert pattern == Pattern("custom", "{premise} Q: {hypothesis}?", (" Yes", " No"))
    assert pattern.render({"premise": "P", "hypothesis": "H"}) == "P Q: H?"


def test_custom_template_with_literal_braces() -> None:
    pattern = resolve_pattern(NLI, "{{note}} {premise} / {hypothesis}")
    assert pattern.render({"premise": "P", "hypothesis": "H"}) == "{note} P / H"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{premise} ?", "lacks {hypothesis}"),
        ("{sentence}", "lacks {premise}, {hypothesis}"),
        ("{premise} {hypothesis} {label}", "unknown {label}"),
        ("{premise} {hypothesis} {0}", "unknown {0}"),
        ("{premise} {hypothesis} {}", "unknown {}"),
        ("{premise.upper} {hypothesis}", "unknown {premise.upper}"),
        ("gpt4", "neither a known pattern"),
        ("{premise} {hypothesis", "malformed"),
        ("{premise} } {hypothesis}", "malformed"),
        # these parse, but would fail (or quote the text) only when rendered
        ("{premise!x} {hypothesis}", "no conversion or format spec"),
        ("{premise:d} {hypothesis}", "no conversion or format spec"),
        ("{premise!r} {hypothesis}", "no conversion or format spec"),
    ],
)
def test_bad_templates_raise_prompt_error(template: str, expected: str) -> None:
    with pytest.raises(PromptError) as info:
        resolve_pattern(NLI, template)
    assert expected in str(info.value)


def test_unknown_name_lists_known_patterns() -> None:
    with pytest.raises(PromptError) as info:
        resolve_pattern(NLI, "gpt4")
    assert all(name in str(info.value) for name in NLI.patterns)


def test_sentiment_family_takes_its_own_fields() -> None:
    assert resolve_pattern(SENTIMENT, "{sentence} Overall:").render({"sentence": "fine"}) == "fine Overall:"
    with pytest.raises(PromptError, match="unknown {premise}"):
        resolve_pattern(SENTIMENT, "{sentence} {premise}")


def test_label_word_override() -> None:
    pattern = resolve_pattern(NLI, "gpt3", [" True", " False"])
    assert pattern.label_words == (" True", " False")
    assert pattern.template == NLI.patterns["gpt3"].template


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ([" Yes"], "one label word per class"),
        ([" Yes", " No", " Maybe"], "one label word per class"),
        ([], "one label word per class"),
        ([" Yes", " Yes"], "distinct"),
        ([" Yes", "  "], "non-empty"),
        (["", " No"], "non-empty"),
    ],
)
def test_bad_label_words_raise_prompt_error(words: list[str], expected: str) -> None:
    with pytest.raises(PromptError) as info:
        resolve_pattern(NLI, "gpt3", words)
    assert expected in str(info.value)


# ---------------------------------------------------------------------------------------------
# Rendering inserts the text verbatim (property)

_tricky = st.sampled_from(["{x}", "{premise}", "{hypothesis}", "{}", "{0}", "}{", "{{", "}}", "{premise!r}", "%s",
                          "\\n"])
_texts = st.lists(st.one_of(st.text(max_size=8), _tricky), max_size=5).map("".join)


@FEW
@given(_texts, _texts, st.integers(0, 1))
def test_rendering_inserts_field_text_verbatim(premise: str, hypothesis: str, label: int) -> None:
    fields = {"premise": premise, "hypothesis": hypothesis}
    gpt3 = resolve_pattern(NLI, "gpt3")
    assert gpt3.render(fields) == premise + " question: " + hypothesis + " Yes or No? answer:"
    harness = resolve_pattern(NLI, "eval-harness")
    example = Example("x", fields, label)
    assert harness.demonstration(example) == (
        premise + "\nQuestion: " + hypothesis + " True or False?\nAnswer:" + (" True", " False")[label])
    custom = resolve_pattern(NLI, "{hypothesis}|{{premise}}|{premise}")
    assert custom.render(fields) == hypothesis + "|{premise}|" + premise


# ---------------------------------------------------------------------------------------------
# sample_demonstrations


@pytest.mark.parametrize("k", [2, 4, 8, 16, 32])
def test_demonstrations_are_balanced(k: int) -> None:
    demos = sample_demonstrations(_pool(20), k, 2, random.Random(0))
    assert len(demos) == k
    assert Counter(d.label for d in demos) == {0: k // 2, 1: k // 2}
    assert len({d.id for d in demos}) == k


def test_three_classes_are_balanced() -> None:
    demos = sample_demonstrations(_pool(5, 3), 6, 3, random.Random(3))
    assert Counter(d.label for d in demos) == {0: 2, 1: 2, 2: 2}


def test_demonstrations_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    pool = _pool(50)
    draws = {seed: [d.id for d in sample_demonstrations(pool, 8, 2, random.Random(seed))] for seed in range(5)}
    assert draws == {seed: [d.id for d in sample_demonstrations(pool, 8, 2, random.Random(seed))] for seed in range(5)}
    assert len({tuple(v) for v in draws.values()}) == 5


def test_demonstrations_are_shuffled_not_grouped_by_class() -> None:
    orders = [[d.label for d in sample_demonstrations(_pool(20), 8, 2, random.Random(seed))] for seed in range(10)]
    assert any(order != sorted(order) for order in orders)


def test_zero_shots_draw_nothing() -> None:
    assert sample_demonstrations(_pool(3), 0, 2, random.Random(0)) == []


def test_odd_shots_cannot_be_balanced() -> None:
    with pytest.raises(PromptError, match="multiple of 2"):
        sample_demonstrations(_pool(10), 3, 2, random.Random(0))


def test_too_few_examples_in_a_class() -> None:
    pool = [ex for ex in _pool(10) if ex.label == 0] + [ex for ex in _pool(10) if ex.label == 1][:3]  # 10 and 3
    with pytest.raises(PromptError) as info:
        sample_demonstrations(pool, 8, 2, random.Random(0))
    assert "Class 1 has only 3" in str(info.value) and "lower --shots" in str(info.value)


def test_excluded_texts_make_a_class_too_small() -> None:
    pool = _pool(4)
    exclude = {ex.text_key() for ex in pool if ex.label == 0}
    with pytest.raises(PromptError, match="Class 0 has only 0"):
        sample_demonstrations(pool, 2, 2, random.Random(0), exclude)


@FEW
@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 4, 8]), st.sets(st.integers(0, 39), max_size=24))
def test_excluded_texts_are_never_drawn(seed: int, k: int, excluded: set[int]) -> None:
    pool = _pool(20)
    exclude = {pool[i].text_key() for i in excluded}
    remaining = [ex for ex in pool if ex.text_key() not in exclude]
    if min(Counter(ex.label for ex in remaining)[c] for c in (0, 1)) < k // 2:
        with pytest.raises(PromptError):
            sample_demonstrations(pool, k, 2, random.Random(seed), exclude)
        return
    demos = sample_demonstrations(pool, k, 2, random.Random(seed), exclude)
    assert not {d.text_key() for d in demos} & exclude
    # excluding is the same as removing those rows from the pool: the draw depends only on the seed
    assert demos == sample_demonstrations(remaining, k, 2, random.Random(seed))


# ---------------------------------------------------------------------------------------------
# context_rng and demonstration_prefix


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_context_zero_is_the_plain_seeded_generator(seed: int) -> None:
    expected = random.Random(seed)
    rng = context_rng(seed, 0)
    assert [rng.random() for _ in range(5)] == [expected.random() for _ in range(5)]
    assert context_rng(seed).random() == random.Random(seed).random()


def test_further_contexts_are_distinct_and_reproducible() -> None:
    firsts = {c: context_rng(7, c).random() for c in range(4)}
    assert len(set(firsts.values())) == 4
    assert firsts == {c: context_rng(7, c).random() for c in range(4)}
    assert context_rng(7, 1).random() != context_rng(8, 1).random()


def test_demonstration_prefix_joins_and_ends_with_a_blank_line() -> None:
    pattern = resolve_pattern(NLI, "gpt3")
    demos = [
        Example("a", {"premise": "P1", "hypothesis": "H1"}, 0),
        Example("b", {"premise": "P2", "hypothesis": "H2"}, 1),
    ]
    assert demonstration_prefix(pattern, demos) == (
        "P1 question: H1 Yes or No? answer: Yes\n\nP2 question: H2 Yes or No? answer: No\n\n")
    assert SEPARATOR == "\n\n"


def test_demonstration_prefix_renders_overridden_label_words() -> None:
    pattern = resolve_pattern(NLI, "minimal", [" right", " wrong"])
    demos = [Example("a", {"premise": "P", "hypothesis": "H"}, 1)]
    assert demonstration_prefix(pattern, demos) == "P H ? wrong\n\n"


def test_no_demonstrations_give_an_empty_prefix() -> None:
    assert demonstration_prefix(resolve_pattern(NLI, "gpt3"), []) == ""


@FEW
@given(st.integers(0, 1000), st.sampled_from([2, 4, 8]))
def test_prefix_holds_each_demonstration_in_order(seed: int, k: int) -> None:
    pattern = resolve_pattern(NLI, "eval-harness")
    demos = sample_demonstrations(_pool(10), k, 2, context_rng(seed))
    prefix = demonstration_prefix(pattern, demos)
    assert prefix.endswith(SEPARATOR)
    assert prefix.split(SEPARATOR)[:-1] == [pattern.demonstration(d) for d in demos]
    assert prefix.split(SEPARATOR)[-1] == ""


# ---------------------------------------------------------------------------------------------
# Issue 23 items 11-12: what was silently accepted, and classes named by their names


def test_the_default_shots_that_cannot_be_balanced_say_what_to_do() -> None:
    with pytest.raises(PromptError) as info:
        sample_demonstrations(_pool(20, 3), 16, 3, random.Random(0))
    message = str(info.value)
    assert "--shots 16 (--shots is 16 by default) cannot be balanced over 3 classes" in message
    assert "here --shots 15 or 18" in message and "--demo-sampling random" in message
    with pytest.raises(PromptError, match="--shots 12 or 18"):
        sample_demonstrations(_pool(20, 6), 16, 6, random.Random(0))


def test_a_short_class_is_named_by_its_name() -> None:
    pool = [ex for ex in _pool(10) if ex.label == 0] + [ex for ex in _pool(10) if ex.label == 1][:1]
    with pytest.raises(PromptError) as info:
        sample_demonstrations(pool, 8, 2, random.Random(0), classes=("entailment", "non-entailment"))
    assert "Class 'non-entailment' has only 1 usable training example," in str(info.value)


def test_label_words_without_a_leading_space_are_warned_about(caplog) -> None:
    family = family_of(get_task("mnli"))
    template = "{premise} question: {hypothesis} answer:"
    with caplog.at_level("WARNING", logger="icldistill.tasks.prompts"):
        resolve_pattern(family, template, ["Yes", "No"])
    assert "follow" in caplog.text and "with no space" in caplog.text and "' Yes'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="icldistill.tasks.prompts"):
        resolve_pattern(family, template, [" Yes", " No"])
        resolve_pattern(family, template + "\n", ["Yes", "No"])  # a line break before the word is a space
    assert caplog.text == ""


def test_fixed_demonstrations_missing_a_class_are_warned_about(caplog) -> None:
    from icldistill.tasks.prompts import check_demonstrations_cover_classes

    demos = [ex for ex in _pool(3, 3) if ex.label != 1]
    with caplog.at_level("WARNING", logger="icldistill.tasks.prompts"):
        assert check_demonstrations_cover_classes(demos, ("a", "b", "c"), "--demonstrations d.jsonl") == ["b"]
    assert "no demonstration of class 'b'" in caplog.text
    assert check_demonstrations_cover_classes(_pool(1, 3), ("a", "b", "c"), "x") == []
