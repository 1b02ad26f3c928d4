"""Scoring evaluation sets under a prompt context: tokenization, length checks, predictions, metrics.

Shared by ICL evaluation, by the evaluation inside training, and by the teacher pass of distillation:
one place decides how a prompt is tokenized (whole, as the user would write it: ``encoding``) and
which queries do not fit the model. The demonstrations' prefix cache is computed once per context and
shared by every evaluation set (``evaluate_sets``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from icldistill.errors import IcldError
from icldistill.models.loading import LoadedModel
from icldistill.runtime import distributed
from icldistill.scoring.encoding import encode_text, fits_in_context, matching_length, tokenize_prompts
from icldistill.scoring.metrics import compute_metrics
from icldistill.scoring.prefix_cache import PrefixCache, Scores, score_queries_sharded
from icldistill.tasks.data import Example
from icldistill.tasks.prompts import Pattern, demonstration_prefix
from icldistill.tasks.registry import Family

logger = logging.getLogger(__name__)


class ContextTooLong(IcldError):
    """The demonstrations alone exceed the model's maximum length: the run cannot be done."""


@dataclass
class EncodedPrompts:
    """The prompts of one context, tokenized whole, in the order of ``examples``, with the queries that fit.

    ``prefix_ids + query_ids[i]`` is prompt i; ``continuations[i][c]`` the tokens of class c's label word
    after it. ``extra_*`` hold extra query texts (e.g. the content-free input), which share the prefix.
    """

    prefix_ids: list[int]
    query_ids: list[list[int]]
    examples: list[Example]
    dropped: int
    continuations: list[list[list[int]]] = field(default_factory=list)
    extra_ids: list[list[int]] = field(default_factory=list)
    extra_continuations: list[list[list[int]]] = field(default_factory=list)


def encode_prompts(
    model: LoadedModel, pattern: Pattern, demonstrations: Sequence[Example], examples: Sequence[Example],
    *, extra_queries: Sequence[str] = (),
) -> EncodedPrompts:
    """Tokenize every prompt whole (demonstrations + query); drop (and count) queries that do not fit.

    A prompt fits when it and its longest label word fit ``model.max_length``.
    """
    prefix_text = demonstration_prefix(pattern, demonstrations)
    context_tokens = len(encode_text(model.tokenizer, prefix_text)) if demonstrations else 0
    if context_tokens >= model.max_length:
        raise ContextTooLong(
            f"The {len(demonstrations)} demonstrations alone take {context_tokens} tokens, more than {model.name}'s "
            f"maximum of {model.max_length}; lower --shots or use a model with a longer context."
        )
    texts = [pattern.render(ex.fields) for ex in examples] + list(extra_queries)
    tokens = tokenize_prompts(model.tokenizer, prefix_text, texts, pattern.label_words, model.name)
    n = len(examples)
    prefix = tokens.prefix_ids
    kept_ids, kept_conts, kept = [], [], []
    for ex, ids, conts in zip(examples, tokens.query_ids[:n], tokens.continuations[:n]):
        if fits_in_context(len(prefix), ids, conts, model.max_length):
            kept_ids.append(ids)
            kept_conts.append(conts)
            kept.append(ex)
    dropped = n - len(kept)
    if dropped:
        logger.warning("%d of %d queries do not fit %s's %d tokens after the demonstrations and are dropped",
                       dropped, n, model.name, model.max_length)
    return EncodedPrompts(prefix, kept_ids, kept, dropped, kept_conts, tokens.query_ids[n:], tokens.continuations[n:])


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
    label_score: str = "sum",
    prefix_cache: PrefixCache | None = None,
    encoded: EncodedPrompts | None = None,
) -> tuple[EncodedPrompts, Scores, Scores | None]:
    """Score ``examples`` (and optional extra query texts, e.g. content-free inputs) after the demonstrations.

    The extra queries share the prefix cache; their scores come back separately. ``encoded`` (from
    ``encode_prompts`` with the same extra queries) skips the tokenization; ``prefix_cache`` reuses a cache.
    """
    if encoded is None:
        encoded = encode_prompts(model, pattern, demonstrations, examples, extra_queries=extra_queries)
    all_ids = encoded.query_ids + encoded.extra_ids
    all_conts = encoded.continuations + encoded.extra_continuations
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    # Under N processes each rank scores its shard (the bar counts rank 0's) and all rows come back in order.
    with tqdm(total=distributed.shard_size(len(all_ids)), desc=desc, unit="q",
              disable=desc is None or not distributed.is_main(), leave=False) as bar:
        scores = score_queries_sharded(model.model, encoded.prefix_ids, all_ids, all_conts, batch_size=batch_size,
                                       use_prefix_cache=use_prefix_cache, topk=topk, pad_id=pad_id, on_batch=bar.update,
                                       prefix_cache=prefix_cache, label_score=label_score)
    n = len(encoded.query_ids)

    def part(rows: slice) -> Scores:
        return Scores(scores.label_logprobs[rows], scores.top_token[rows],
                      None if scores.topk_logprobs is None else scores.topk_logprobs[rows],
                      None if scores.topk_ids is None else scores.topk_ids[rows],
                      first_label_ids=scores.first_label_ids[rows], multi_token=scores.multi_token)

    main = part(slice(0, n))
    main.prompt_tokens = sum(len(encoded.prefix_ids) + len(q) for q in encoded.query_ids)
    extra = part(slice(n, None)) if encoded.extra_ids else None
    return encoded, main, extra


def full_vocab_basis(scores: Scores) -> str:
    """What the full-vocabulary metrics measure: the label word itself, its first token, or nothing.

    With words of several tokens the full-vocabulary argmax is compared with each word's first token;
    when two words start with the same token that comparison says nothing, and the metrics are omitted.
    """
    if not scores.multi_token:
        return "label_word"
    first = scores.first_label_ids
    if first is None or any(len(set(row.tolist())) < len(row) for row in first):
        return "not_applicable"
    return "first_token"


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
    label_score: str = "sum",
    prefix_cache: PrefixCache | None = None,
    encoded: EncodedPrompts | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Metrics, per-query predictions and prompt-token count of one evaluation set under one context.

    ``encoded`` must come from ``encode_prompts(..., extra_queries=[content-free input])``.
    """
    content_free = pattern.render(family.content_free)
    encoded, scores, cf = score_prompts(model, pattern, demonstrations, examples, batch_size=batch_size,
                                        use_prefix_cache=use_prefix_cache, extra_queries=[content_free], desc=desc,
                                        label_score=label_score, prefix_cache=prefix_cache, encoded=encoded)
    basis = full_vocab_basis(scores)
    top_is_label = np.array([next((c for c, tok in enumerate(row.tolist()) if tok == int(t)), -1)
                             for t, row in zip(scores.top_token, scores.first_label_ids)], dtype=np.int64)
    gold = np.array([ex.label for ex in encoded.examples], dtype=np.int64)
    logprobs = scores.label_logprobs.numpy().astype(np.float64)
    groups = {k: [ex.meta.get(k, "") for ex in encoded.examples] for k in meta_fields} or None
    metrics = compute_metrics(
        logprobs, gold, top_is_label, class_names=family.classes,
        content_free_logprobs=cf.label_logprobs.numpy().astype(np.float64) if cf is not None else None,
        groups=groups, dropped=encoded.dropped,
    )
    metrics["full_vocab_basis"] = basis
    metrics["label_score"] = label_score
    if basis == "not_applicable":
        metrics["accuracy_full_vocab"] = metrics["non_label_rate"] = None
    predictions = [
        {"id": ex.id, "gold": int(ex.label), "pred": int(np.argmax(lp)),
         "label_logprobs": [round(float(v), 6) for v in lp],
         # whether the full-vocabulary argmax is a label word's first token, and whose (None: no label's)
         "top_token_is_label": bool(t >= 0), "top_token_label": int(t) if t >= 0 else None,
         **{k: ex.meta.get(k) for k in meta_fields}}
        for ex, lp, t in zip(encoded.examples, logprobs, top_is_label)
    ]
    return metrics, predictions, scores.prompt_tokens


def evaluate_sets(
    model: LoadedModel,
    family: Family,
    pattern: Pattern,
    demonstrations: Sequence[Example],
    sets: dict[str, tuple[Sequence[Example], Sequence[str]]],
    *,
    batch_size: int,
    use_prefix_cache: bool = True,
    label_score: str = "sum",
    desc: str | None = None,
) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]], int]]:
    """``evaluate_examples`` on several sets (name -> (examples, meta fields)) under one context.

    The demonstrations' prefix cache is computed once and serves every set (issue 12: once per seed,
    not once per evaluation set): its tokens are the prefix every set's prompts share.
    """
    content_free = pattern.render(family.content_free)
    encoded = {name: encode_prompts(model, pattern, demonstrations, examples, extra_queries=[content_free])
               for name, (examples, _) in sets.items()}
    cache = None
    if use_prefix_cache and encoded:
        prefixes = [e.prefix_ids for e in encoded.values()]
        shared = min(matching_length(prefixes[0], p) for p in prefixes)
        cache = PrefixCache(model.model, prefixes[0][:shared])
    return {name: evaluate_examples(model, family, pattern, demonstrations, examples, batch_size=batch_size,
                                    use_prefix_cache=use_prefix_cache, meta_fields=meta, label_score=label_score,
                                    prefix_cache=cache, encoded=encoded[name],
                                    desc=f"{desc}{name}" if desc is not None else None)
            for name, (examples, meta) in sets.items()}

