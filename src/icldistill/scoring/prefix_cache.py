"""Label-word scoring of many queries after one shared demonstration prefix, with its KV cache reused.

The demonstrations are the same for every query of a seed, so the prefix goes through the model once;
its key/value cache is copied to each batch of queries and never recomputed. Only the logits at each
query's last token are computed (``logits_to_keep``), never the full (batch, seq, vocab) tensor.

Two details keep the cached and the naive path bit-compatible:

* The prefix and each query are tokenized separately and their ids concatenated, in both paths:
  a BPE tokenizer merges across the blank line between them if the whole string is tokenized at once.
* Queries are right-padded. Under causal attention a real token never sees the padding after it, so no
  attention mask and no position-id arithmetic is needed, positions are simply ``prefix_len + arange``,
  and sliding-window layers (Gemma3) see exactly the same keys as in the full prompt. Left padding
  would put pads between prefix and query and shift the window.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icldistill.runtime import distributed
from icldistill.errors import PromptError

logger = logging.getLogger(__name__)


def label_token_ids(tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str], model_name: str = "the model") -> list[int]:
    """The single token id of each label word; a word that is several tokens is an error.

    Scoring reads one next-token distribution, so a label word must be exactly one token.
    """
    ids = []
    for word in label_words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise PromptError(
                f"Label word {word!r} is {len(tokens)} tokens for {model_name} ({pieces}); label words must be "
                "single tokens. Choose other words with --label-words (e.g. ' Yes, No') or another pattern."
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise PromptError(f"Label words {list(label_words)} map to the same token for {model_name}; choose distinct words.")
    return ids


def encode_prefix(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of the demonstration prefix, with the tokenizer's special start tokens (e.g. BOS)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_queries(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each query alone, without special tokens (they follow the prefix)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def last_token_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    cache=None,
    past_length: int = 0,
) -> torch.Tensor:
    """Next-token logits after the last real token of each right-padded row.

    input_ids (batch, seq) right-padded; lengths (batch,) real lengths; an optional cache of
    ``past_length`` tokens shared by all rows. Returns (batch, vocab) in the model's dtype.
    Differentiable: the training loop uses it for the student's forward pass.
    """
    seq = input_ids.shape[1]
    position_ids = torch.arange(past_length, past_length + seq, device=input_ids.device).expand(input_ids.shape[0], -1)
    keep = (lengths.to(input_ids.device) - 1).long()[:, None]  # (batch, 1): one position per row
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        cache=cache,
        use_cache=cache is not None,
        logits_to_keep=keep,
    )
    return out.logits[:, 0, :]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, max_len) right-padded ids and (batch,) lengths."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), lengths


class PrefixCache:
    """The key/value cache of a demonstration prefix, computed once and copied for each batch.

    The model extends a cache in place as it reads a batch, so each batch gets its own shallow copy
    whose tensors are the prefix's, expanded (not copied) along the batch dimension; the prefix
    itself is never run again.
    """

    def __init__(self, model: PreTrainedModel, prefix_ids: Sequence[int]):
        self.length = len(prefix_ids)
        self._cache = None
        if self.length:
            ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=model.device)
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self._cache = out.cache

    def for_batch(self, batch: int):
        """A fresh cache holding the prefix ``batch`` times, or None for an empty prefix."""
        if self._cache is None:
            return None
        cache = copy.copy(self._cache)
        cache.layers = [copy.copy(layer) for layer in self._cache.layers]
        for layer in cache.layers:
            # Views, not copies: the model's first update concatenates them with the batch's own keys,
            # which materialises each row's prefix once (a repeat_interleave would copy it twice).
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys = layer.keys.expand(batch, -1, -1, -1)
                layer.values = layer.values.expand(batch, -1, -1, -1)
        return cache


@dataclass
class Scores:
    """What one scoring pass returns, in query order.

    label_logprobs (n, C) float32: log-softmax over the full vocabulary, at the label tokens.
    top_token (n,) long: the full-vocabulary argmax token.
    topk_logprobs, topk_ids (n, k): the k most likely tokens (only when asked, for vocabulary KL).
    prompt_tokens: prefix + query tokens summed over queries (what the naive path would read).
    """

    label_logprobs: torch.Tensor
    top_token: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    prompt_tokens: int = 0


def score_queries(
    model: PreTrainedModel,
    prefix_ids: Sequence[int],
    query_ids: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    *,
    batch_size: int = 16,
    use_prefix_cache: bool = True,
    topk: int = 0,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
    prefix_cache: PrefixCache | None = None,
) -> Scores:
    """Score every query after the same prefix; returns label log-probs and the full-vocabulary argmax.

    Queries are sorted by length before batching so that a batch carries little padding; results are
    returned in the original order. ``use_prefix_cache=False`` runs each full prompt (the naive path,
    kept for verification and benchmarks). ``on_batch(n)`` is called after each batch of n queries.
    A ``prefix_cache`` built earlier for the same prefix is reused (the online teacher keeps one).
    """
    n = len(query_ids)
    device = model.device
    label_index = torch.tensor(list(label_ids), dtype=torch.long)
    label_logprobs = torch.empty((n, len(label_ids)), dtype=torch.float32)
    top_token = torch.empty((n,), dtype=torch.long)
    topk_lp = torch.empty((n, topk), dtype=torch.float32) if topk else None
    topk_ids = torch.empty((n, topk), dtype=torch.long) if topk else None
    order = sorted(range(n), key=lambda i: -len(query_ids[i]))
    prefix = list(prefix_ids)
    cache = None
    if use_prefix_cache:
        cache = prefix_cache if prefix_cache is not None else PrefixCache(model, prefix)
        if cache.length != len(prefix):
            raise ValueError(f"prefix cache holds {cache.length} tokens, the prefix has {len(prefix)}")
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if cache is not None:
                ids, lengths = pad_right([query_ids[i] for i in idx], pad_id, device)
                logits = last_token_logits(model, ids, lengths, cache.for_batch(len(idx)), cache.length)
            else:
                ids, lengths = pad_right([prefix + list(query_ids[i]) for i in idx], pad_id, device)
                logits = last_token_logits(model, ids, lengths)
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            rows = torch.tensor(idx, dtype=torch.long)
            label_logprobs[rows] = logprobs[:, label_index]
            top_token[rows] = logprobs.argmax(dim=-1)
            if topk:
                values, indices = logprobs.topk(topk, dim=-1)
                topk_lp[rows] = values
                topk_ids[rows] = indices
            if on_batch is not None:
                on_batch(len(idx))
    prompt_tokens = sum(len(prefix) + len(q) for q in query_ids)
    return Scores(label_logprobs, top_token, topk_lp, topk_ids, prompt_tokens)


def score_queries_sharded(
    model: PreTrainedModel,
    prefix_ids: Sequence[int],
    query_ids: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    **kwargs,
) -> Scores:
    """``score_queries`` with the queries split across the ranks of a distributed run, gathered back in order.

    Each rank scores its ``distributed.shard`` with its own prefix cache, and every rank gets all rows
    (metrics are computed from the gathered arrays, identical on every rank). A query's scores do not
    depend on which others share its batch (up to float rounding), so N processes give the numbers of
    one. In one process this is ``score_queries`` itself. ``on_batch`` counts this rank's queries.
    """
    if distributed.num_processes() == 1:
        return score_queries(model, prefix_ids, query_ids, label_ids, **kwargs)
    mine = distributed.shard(len(query_ids))
    local = score_queries(model, prefix_ids, [query_ids[i] for i in mine], label_ids, **kwargs)
    label_logprobs, top_token, topk_lp, topk_ids = distributed.gather_rows(
        [local.label_logprobs, local.top_token, local.topk_logprobs, local.topk_ids], mine, len(query_ids))
    prompt_tokens = sum(len(prefix_ids) + len(q) for q in query_ids)
    return Scores(label_logprobs, top_token, topk_lp, topk_ids, prompt_tokens)
