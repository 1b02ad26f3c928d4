"""Prompt patterns, verbalizers and seeded, balanced demonstration sampling.

A demonstration is the rendered pattern followed by its label word; demonstrations are joined by a
blank line and the query follows the last one (PROTOCOL.md). The prefix and the query are returned
as separate strings because they must be tokenized separately (see ``scoring``). No torch here.
"""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from icldistill.errors import PromptError
from icldistill.tasks.data import Example
from icldistill.tasks.registry import Family

logger = logging.getLogger(__name__)

SEPARATOR = "\n\n"
DEFAULT_SHOTS = 16  # config.py's default --shots, named in the message when it cannot be balanced


@dataclass(frozen=True)
class Pattern:
    """A resolved pattern: template, label words (one per class) and its name for the record."""

    name: str
    template: str
    label_words: tuple[str, ...]

    def render(self, fields: Mapping[str, str]) -> str:
        """The template with the row's fields filled in (the text itself is never re-parsed)."""
        return self.template.format_map(dict(fields))

    def demonstration(self, example: Example) -> str:
        """A solved example: the rendered pattern followed by the gold label word."""
        return self.render(example.fields) + self.label_words[example.label]


def resolve_pattern(family: Family, pattern: str, label_words: Sequence[str] | None = None) -> Pattern:
    """A pattern by name (from the task's family) or a user template with the family's fields.

    A user template must use every field of the family and no other placeholder.
    """
    if pattern in family.patterns:
        spec = family.patterns[pattern]
        name, template, words = pattern, spec.template, spec.label_words
    else:
        placeholders = _placeholders(pattern)
        if not placeholders:
            raise PromptError(
                f"Pattern {pattern!r} is neither a known pattern ({', '.join(family.patterns)}) nor a template; "
                f"a template must contain {', '.join('{' + f + '}' for f in family.fields)}."
            )
        missing = [f for f in family.fields if f not in placeholders]
        unknown = sorted(placeholders - set(family.fields))
        if missing or unknown:
            problems = []
            if missing:
                problems.append("it lacks " + ", ".join("{" + f + "}" for f in missing))
            if unknown:
                problems.append("it uses unknown " + ", ".join("{" + f + "}" for f in unknown))
            raise PromptError(f"Template {pattern!r}: {' and '.join(problems)}. Fields are {', '.join(family.fields)}.")
        name, template = "custom", pattern
        words = next(iter(family.patterns.values())).label_words
    if label_words is not None:
        words = tuple(label_words)
    if len(words) != len(family.classes):
        raise PromptError(
            f"Need one label word per class ({', '.join(family.classes)}), got {len(words)}: {list(words)}."
        )
    if len(set(words)) != len(words) or any(not w.strip() for w in words):
        raise PromptError(f"Label words must be distinct and non-empty, got {list(words)}.")
    _warn_if_glued(name, template, tuple(words))
    return Pattern(name, template, tuple(words))


@lru_cache(maxsize=64)
def _warn_if_glued(name: str, template: str, words: tuple[str, ...]) -> None:
    """Warn (once per pattern) when label words follow the prompt with no space: ``answer:Yes``.

    Tokenizers split ``:Yes`` unlike ``: Yes``, so such words are rarely what a model expects; most tasks
    write them with their leading space (``" Yes"``). Accepted, as a deliberate choice may need it.
    """
    if template and not template[-1].isspace():
        glued = [w for w in words if w and not w[0].isspace()]
        if glued:
            logger.warning("pattern '%s': the label words %s follow %r with no space (the prompt reads %r); "
                           "write them with their leading space (' %s') unless that is meant", name, glued,
                           template[-12:], template[-12:] + glued[0], glued[0])


def _placeholders(template: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise PromptError(f"Template {template!r} is malformed ({exc}); "
                          "write literal braces as '{{' and '}}'.") from None
    # '{premise!x}' or '{premise:d}' parse but fail in render, and '{premise!r}' quotes the text: allow neither
    odd = [name for _, name, spec, conversion in parsed if name is not None and (spec or conversion)]
    if odd:
        raise PromptError(
            f"Template {template!r}: a placeholder takes no conversion or format spec ({', '.join(odd)}); "
            "write plain {field}, and literal braces as '{{' and '}}'."
        )
    return {name for _, name, _, _ in parsed if name is not None}


DEMO_SAMPLING = ("balanced", "random")


def sample_demonstrations(
    pool: Sequence[Example],
    k: int,
    n_classes: int,
    rng: random.Random,
    exclude: set[tuple[str, ...]] | frozenset[tuple[str, ...]] = frozenset(),
    mode: str = "balanced",
    classes: Sequence[str] | None = None,
) -> list[Example]:
    """Draw k demonstrations: ``balanced`` takes k / n_classes per class, then shuffles them; ``random``
    takes k rows regardless of class (lm-evaluation-harness's draw, which may miss a class).

    ``exclude`` holds text keys (``Example.text_key``) that must not be drawn, so that demonstrations
    never repeat a query. Candidates are taken in pool order, so the draw depends only on the seed.
    ``classes`` (the class names) name a class in messages; without them it is named by its index.
    """
    if mode not in DEMO_SAMPLING:
        raise PromptError(f"Unknown --demo-sampling {mode!r}; use {' or '.join(DEMO_SAMPLING)}.")
    if k == 0:
        return []
    if mode == "random":
        candidates = [ex for ex in pool if ex.text_key() not in exclude]
        if len(candidates) < k:
            raise PromptError(f"Only {len(candidates)} usable training examples for --shots {k}; lower --shots.")
        return rng.sample(candidates, k)
    if k % n_classes:
        below, above = (k // n_classes) * n_classes, (k // n_classes + 1) * n_classes
        nearest = " or ".join(str(n) for n in (below, above) if n > 0)
        default = f" (--shots is {DEFAULT_SHOTS} by default)" if k == DEFAULT_SHOTS else ""
        works = ", ".join(str(n_classes * i) for i in range(1, 5))
        raise PromptError(
            f"--shots {k}{default} cannot be balanced over {n_classes} classes; use a multiple of {n_classes} "
            f"({works}, ...), here --shots {nearest} (also in a sweep's grid), or --demo-sampling random for an "
            "unbalanced draw."
        )
    per_class = k // n_classes
    by_class: list[list[Example]] = [[] for _ in range(n_classes)]
    for ex in pool:
        if ex.text_key() not in exclude:
            by_class[ex.label].append(ex)
    chosen: list[Example] = []
    for cls, candidates in enumerate(by_class):
        if len(candidates) < per_class:
            named = f"'{classes[cls]}'" if classes is not None and cls < len(classes) else str(cls)
            raise PromptError(
                f"Class {named} has only {len(candidates)} usable training {_plural(len(candidates), 'example')}, "
                f"fewer than the {per_class} needed for --shots {k}; lower --shots or add rows of that class."
            )
        chosen.extend(rng.sample(candidates, per_class))
    rng.shuffle(chosen)
    return chosen


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def check_demonstrations_cover_classes(demonstrations: Sequence[Example], classes: Sequence[str],
                                       where: str) -> list[str]:
    """The classes no fixed demonstration shows; warned about, since ICL without an example of a class
    is rarely meant (a balanced draw always shows each). Returns the missing class names."""
    shown = {ex.label for ex in demonstrations}
    missing = [name for c, name in enumerate(classes) if c not in shown]
    if missing:
        logger.warning("%s: no demonstration of class %s (of %s); the model sees no example of it",
                       where, ", ".join(repr(m) for m in missing), ", ".join(classes))
    return missing


def check_label_words_tokenize_apart(tokenizer: Any, pattern: Pattern, classes: Sequence[str], model_name: str) -> None:
    """Two classes whose label words are the same token sequence for this tokenizer cannot be told apart.

    Checked where a model's tokenizer is first available (``tokenizer`` is any callable returning
    ``{"input_ids": [...]}``, as transformers tokenizers do).
    """
    seen: dict[tuple[int, ...], int] = {}
    for c, word in enumerate(pattern.label_words):
        ids = tuple(tokenizer(word, add_special_tokens=False)["input_ids"])
        if ids in seen:
            other = seen[ids]
            raise PromptError(
                f"Pattern '{pattern.name}': the label words {pattern.label_words[other]!r} "
                f"(class '{classes[other]}') and "
                f"{word!r} (class '{classes[c]}') tokenize identically for {model_name} ({list(ids)}); choose words "
                "that differ in tokens (in the task file's label_words or with --label-words)."
            )
        seen[ids] = c


def context_rng(seed: int, context: int = 0) -> random.Random:
    """The generator for demonstration set ``context`` of data seed ``seed``.

    Context 0 is the ICL context of that seed, so the distillation teacher sees exactly the
    demonstrations that ICL evaluation reports on; further contexts are independent draws.
    """
    return random.Random(seed if context == 0 else f"icldistill-context-{seed}-{context}")


def demonstration_prefix(pattern: Pattern, demonstrations: Sequence[Example]) -> str:
    """The text before the query: solved demonstrations joined by blank lines, ending in a separator."""
    if not demonstrations:
        return ""
    return SEPARATOR.join(pattern.demonstration(d) for d in demonstrations) + SEPARATOR


def example_prompt(task: Any, data_dir: Any = None) -> tuple[str, str]:
    """One rendered prompt of ``task``'s default pattern and a note on what it shows (for ``icld tasks show``).

    With the data at hand: one demonstration per class (seed 0) and a query from the first evaluation set;
    without it, the content-free input alone.
    """
    from icldistill.errors import IcldError
    from icldistill.tasks import data

    family = task.columns
    pattern = resolve_pattern(family, task.default_pattern)
    try:
        train = data.load(task.train, data_dir)
        first = task.eval_sets[task.default_eval[0]]
        query = data.load(first, data_dir).examples[0]
        demos = sample_demonstrations(train.examples, len(family.classes), len(family.classes), context_rng(0),
                                      exclude={query.text_key()})
    except IcldError as exc:
        note = f"pattern '{pattern.name}', content-free input; data not read: {exc}"
        return pattern.render(family.content_free), note
    note = (f"pattern '{pattern.name}', {len(demos)} demonstrations of seed 0, a query from "
            f"'{task.default_eval[0]}' whose answer is {pattern.label_words[query.label]!r}")
    return demonstration_prefix(pattern, demos) + pattern.render(query.fields), note
