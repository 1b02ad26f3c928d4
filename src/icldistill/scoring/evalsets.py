"""Scoring evaluation sets under a prompt context: tokenization, length checks, predictions, metrics.

Shared by ICL evaluation, by the evaluation inside training, and by the teacher pass of distillation:
one place decides how a prompt is tokenized and which queries do not fit the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from icldistill.runtime import distributed
from icldistill.tasks.data import Example
from icldistill.errors import IcldError
from icldistill.scoring.metrics import compute_metrics
from icldistill.models.loading import LoadedModel
from icldistill.tasks.prompts import Pattern, demonstration_prefix
from icldistill.scoring.prefix_cache import Scores, encode_prefix, encode_queries, label_token_ids, score_queries_sharded
from icldistill.tasks.registry import Family

logger = logging.getLogger(__name__)


class ContextTooLong(IcldError):
    """The demonstrations alone exceed the model's maximum length: the run cannot be done."""


@dataclass
class EncodedPrompts:
    """A prefix and the queries that fit after it, in the order of ``examples``."""

    prefix_ids: list[int]
    query_ids: list[list[int]]
    examples: list[Example]
    dropped: int


def encode_prompts(
    model: LoadedModel, pattern: Pattern, demonstrations: Sequence[Example], examples: Sequence[Example]
) -> EncodedPrompts:
    """Tokenize the prefix and each query separately; drop (and count) queries that do not fit."""
    prefix_ids = encode_prefix(model.tokenizer, demonstration_prefix(pattern, demonstrations))
    if len(prefix_ids) >= model.max_length:
        raise ContextTooLong(
            f"The {len(demonstrations)} demonstrations alone take {len(prefix_ids)} tokens, more than {model.name}'s "
            f"maximum of {model.max_length}; lower --shots or use a model with a longer context."
        )
    texts = [pattern.render(ex.fields) for ex in examples]
    kept_ids, kept = [], []
    for ex, ids in zip(examples, encode_queries(model.tokenizer, texts)):
        if len(prefix_ids) + len(ids) <= model.max_length:
            kept_ids.append(ids)
            kept.append(ex)
    dropped = len(examples) - len(kept)
    if dropped:
        logger.warning("%d of %d queries do not fit %s's %d tokens after the prefix and are dropped",
                       dropped, len(examples), model.name, model.max_length)
    return EncodedPrompts(prefix_ids, kept_ids, kept, dropped)


def score_prompts(
    model: LoadedModel,
    pattern: Pattern,
    demonstrations: Sequence[Example],
    examples: Sequence[Example],
    *,
    batch_size: int,
    use_prefix_cache: bool = True,
    topk: int = 0,
    extra_queries: Sequence[str] = (),
    desc: str | None = None,
) -> tuple[EncodedPrompts, Scores, Scores | None]:
    """Score ``examples`` (and optional extra query texts, e.g. content-free inputs) after the demonstrations.

    The extra queries share the prefix cache; their scores come back separately.
    """
    label_ids = label_token_ids(model.tokenizer, pattern.label_words, model.name)
    encoded = encode_prompts(model, pattern, demonstrations, examples)
    extra_ids = encode_queries(model.tokenizer, list(extra_queries))
    all_ids = encoded.query_ids + extra_ids
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    # Under N processes each rank scores its shard (the bar counts rank 0's) and all rows come back in order.
    with tqdm(total=distributed.shard_size(len(all_ids)), desc=desc, unit="q",
              disable=desc is None or not distributed.is_main(), leave=False) as bar:
        scores = score_queries_sharded(model.model, encoded.prefix_ids, all_ids, label_ids, batch_size=batch_size,
                                       use_prefix_cache=use_prefix_cache, topk=topk, pad_id=pad_id, on_batch=bar.update)
    n = len(encoded.query_ids)
    main = Scores(scores.label_logprobs[:n], scores.top_token[:n],
                  None if scores.topk_logprobs is None else scores.topk_logprobs[:n],
                  None if scores.topk_ids is None else scores.topk_ids[:n],
                  prompt_tokens=sum(len(encoded.prefix_ids) + len(q) for q in encoded.query_ids))
    extra = Scores(scores.label_logprobs[n:], scores.top_token[n:]) if extra_ids else None
    return encoded, main, extra


def evaluate_examples(
    model: LoadedModel,
    family: Family,
    pattern: Pattern,
    demonstrations: Sequence[Example],
    examples: Sequence[Example],
    *,
    batch_size: int,
    use_prefix_cache: bool = True,
    meta_fields: Sequence[str] = (),
    desc: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Metrics, per-query predictions and prompt-token count of one evaluation set under one context."""
    content_free = pattern.render(family.content_free)
    encoded, scores, cf = score_prompts(model, pattern, demonstrations, examples, batch_size=batch_size,
                                        use_prefix_cache=use_prefix_cache, extra_queries=[content_free], desc=desc)
    label_ids = label_token_ids(model.tokenizer, pattern.label_words, model.name)
    lookup = {tok: c for c, tok in enumerate(label_ids)}
    top_is_label = np.array([lookup.get(int(t), -1) for t in scores.top_token], dtype=np.int64)
    gold = np.array([ex.label for ex in encoded.examples], dtype=np.int64)
    logprobs = scores.label_logprobs.numpy().astype(np.float64)
    groups = {k: [ex.meta.get(k, "") for ex in encoded.examples] for k in meta_fields} or None
    metrics = compute_metrics(
        logprobs, gold, top_is_label, class_names=family.classes,
        content_free_logprobs=cf.label_logprobs.numpy().astype(np.float64) if cf is not None else None,
        groups=groups, dropped=encoded.dropped,
    )
    predictions = [
        {"id": ex.id, "gold": int(ex.label), "pred": int(np.argmax(lp)), "label_logprobs": [round(float(v), 6) for v in lp],
         "top_token_is_label": int(t), **{k: ex.meta.get(k) for k in meta_fields}}
        for ex, lp, t in zip(encoded.examples, logprobs, top_is_label)
    ]
    return metrics, predictions, scores.prompt_tokens
