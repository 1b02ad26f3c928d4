"""Label-word scoring of many prompts that share a token prefix, with the prefix's KV cache computed once.

Prompts are tokenized whole (``encoding``); the prompts of a context share a long token prefix (the
demonstrations), whose key/value cache is computed once and never copied per row. A pass packs a batch of
queries into *one* row after the prefix (issue 13): each query's tokens, and each multi-token label
word's tokens after it, form segments of that row with their own position ids; a segment sees the
prefix, its parent query and its own earlier tokens, nothing else (a tree, as in speculative decoding).
The attention itself is ``shared_attention``'s: every packed token against the prefix in one product,
each query's block against its own tokens, merged exactly by log-sum-exp, so that no query is scored
against another's tokens. The cost then approaches that of scoring the queries alone. Only the logits at
the scored positions are computed (``logits_to_keep``), never the full (seq, vocab) tensor.

The traps, and how they are met:

* OPT computes positions from the attention mask unless ``position_ids`` are given: they always are.
* Gemma3's sliding-window layers: the prefix cache is a plain ``DynamicCache`` (every layer keeps all
  prefix keys, a sliding layer's default cache would keep only the last window), and the shared
  attention limits a sliding layer's keys by position distance as transformers' own mask does.
* Families not verified here and cache layers that are not plain key/value tensors (linear attention,
  recurrent or hybrid state updated in place) fall back to the naive path (each whole prompt,
  right-padded) with one warning.

The naive path (``use_prefix_cache=False``) is also the reference of the equality tests.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer

from icldistill.errors import ConfigError
from icldistill.runtime import distributed
from icldistill.scoring import shared_attention

# Re-exported: callers import the tokenization helpers from here as they always did.
from icldistill.scoring.encoding import label_token_ids, label_word_tokens, matching_length  # noqa: F401

logger = logging.getLogger(__name__)

LABEL_SCORES = ("sum", "mean")
"""How a label word's token log-probabilities make its class score: their sum, or their mean."""

PACKED_FAMILIES = frozenset({"llama", "opt", "gemma3_text", "gemma", "gemma2", "qwen2", "qwen3", "phi3"})
"""Model types whose packed shared-prefix scoring is tested equal to naive scoring (tests/scoring).

Not Mistral: it applies a sliding window that its config does not list per layer (no ``layer_types``),
and a packed row would see keys outside it."""

_MASKED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
_warned: set[str] = set()

LabelIds = Sequence[int] | Sequence[Sequence[Sequence[int]]]
"""Either one token id per class (single-token words, the same after every query), or for each query the
tokens of each class's label word after it (``encoding.PromptTokens.continuations``)."""


def last_token_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    cache=None,
    past_length: int = 0,
) -> torch.Tensor:
    """Next-token logits after the last real token of each right-padded row.

    input_ids (batch, seq) right-padded; lengths (batch,) real lengths; an optional cache of
    ``past_length`` tokens shared by all rows. Returns (batch, vocab) in the model's dtype. Differentiable.
    """
    seq = input_ids.shape[1]
    position_ids = torch.arange(past_length, past_length + seq, device=input_ids.device).expand(input_ids.shape[0], -1)
    keep = (lengths.to(input_ids.device) - 1).long()[:, None]  # (batch, 1): one position per row
    out = model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=cache is not None,
                logits_to_keep=keep)
    return out.logits[:, 0, :]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, max_len) right-padded ids and (batch,) lengths."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), lengths


# --------------------------------------------------------------------------------------------------
# What the packed path supports


def packing_unsupported(model: torch.nn.Module) -> str | None:
    """Why packed shared-prefix scoring cannot be used for ``model`` (None when it can)."""
    config = model.config
    kind = getattr(config, "model_type", type(model).__name__)
    if kind not in PACKED_FAMILIES:
        return (f"the {kind} family is not among those verified for packed shared-prefix scoring "
                f"({', '.join(sorted(PACKED_FAMILIES))})")
    listed = getattr(config, "layer_types", None)
    layer_types = set(listed or ["full_attention"])
    if not layer_types <= _MASKED_LAYER_TYPES:
        return f"its layer types {sorted(layer_types - _MASKED_LAYER_TYPES)} are not attention over a KV cache"
    if getattr(config, "sliding_window", None) and not listed:
        return "it has a sliding window but no per-layer types to say where it applies"
    return None


def unsupported_cache_layers(cache, n_layers: int | None = None) -> str | None:
    """Why a computed prefix cache cannot be shared (None when every layer holds plain 4-D keys/values).

    Sharing works by reading the prefix's keys and values and concatenating each pass's own after them;
    a layer that keeps recurrent or convolutional state, or updates it in place, would be corrupted.
    """
    if not isinstance(cache, DynamicCache):
        return f"its cache is a {type(cache).__name__}, not a DynamicCache of key/value tensors"
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            return f"its cache layer {i} is a {type(layer).__name__}, not a plain key/value layer"
        if getattr(layer, "keys", None) is None or layer.keys.dim() != 4:
            return f"its cache layer {i} holds no 4-D key tensor"
    if n_layers is not None and len(cache.layers) != n_layers:
        return f"its cache has {len(cache.layers)} layers for {n_layers} decoder layers"
    return None


def _warn_once(model: torch.nn.Module, reason: str) -> None:
    key = f"{type(model).__name__}: {reason}"
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s: shared-prefix scoring is not available because %s; scoring every whole prompt "
                       "instead (same numbers, slower).", type(model).__name__, reason)


# --------------------------------------------------------------------------------------------------
# The prefix cache


class PrefixCache:
    """The key/value cache of a shared token prefix, computed once; each pass reads it, never copies it per row.

    ``unsupported`` says why the model cannot use it (then nothing was computed and scoring is naive).
    The cache can be shortened (``shrink``): under causal attention the keys of the first n tokens do
    not depend on later tokens, so a prefix's cache serves any shorter prefix exactly.
    """

    def __init__(self, model: PreTrainedModel, prefix_ids: Sequence[int]):
        self.tokens = list(prefix_ids)
        self._cache: DynamicCache | None = None
        self.unsupported = packing_unsupported(model)
        if self.unsupported is None and self.tokens:
            cache = DynamicCache()  # every layer a full DynamicLayer, sliding ones included
            ids = torch.tensor([self.tokens], dtype=torch.long, device=model.device)
            with torch.no_grad():
                model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            self.unsupported = unsupported_cache_layers(cache, getattr(model.config, "num_hidden_layers", None))
            self._cache = None if self.unsupported else cache

    @property
    def length(self) -> int:
        return len(self.tokens)

    def shrink(self, n: int) -> None:
        """Keep the first ``n`` tokens only."""
        if n >= self.length:
            return
        self.tokens = self.tokens[:n]
        if self._cache is None:
            return
        if n == 0:
            self._cache = None
            return
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]

    def for_pass(self) -> DynamicCache | None:
        """A cache to hand to one forward pass: its layers start at the prefix's tensors (not copies).

        The model's update concatenates the pass's own keys after them into new tensors, so the
        prefix itself is never modified.
        """
        if self._cache is None:
            return None
        cache = copy.copy(self._cache)
        cache.layers = [copy.copy(layer) for layer in self._cache.layers]
        return cache


# --------------------------------------------------------------------------------------------------
# Scoring prompts + continuations: the packed pass and the naive pass


@dataclass
class _Targets:
    """Which logits score which token: ``rows[j]`` predicts ``tokens[j]``, a token of class slot ``slots[j]``."""

    rows: list[int]
    tokens: list[int]
    slots: list[int]
    answer_rows: list[int]  # per prompt: the row of its answer position (the first label token's logits)


def _class_scores(logits: torch.Tensor, targets: _Targets, n: int, n_classes: int, label_score: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) answer logits and (n, C) float32 class scores from the kept logits (K, V)."""
    device = logits.device
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    rows = torch.tensor(targets.rows, dtype=torch.long, device=device)
    tokens = torch.tensor(targets.tokens, dtype=torch.long, device=device)
    slots = torch.tensor(targets.slots, dtype=torch.long, device=device)
    token_lp = logprobs[rows, tokens]
    scores = torch.zeros(n * n_classes, dtype=torch.float32, device=device).index_add(0, slots, token_lp)
    if label_score == "mean":
        counts = torch.zeros(n * n_classes, dtype=torch.float32, device=device).index_add(
            0, slots, torch.ones_like(token_lp))
        scores = scores / counts
    answers = logits[torch.tensor(targets.answer_rows, dtype=torch.long, device=device)]
    return answers, scores.view(n, n_classes)


def _packed_forward(model: torch.nn.Module, cache: PrefixCache | None, queries: Sequence[Sequence[int]],
                    continuations: Sequence[Sequence[Sequence[int]]], label_score: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every query (and each class's label word after it) in one row after the cached prefix."""
    device = model.device
    prefix_length = cache.length if cache is not None else 0
    n, n_classes = len(queries), len(continuations[0])
    ids: list[int] = []
    positions: list[int] = []
    segment: list[int] = []
    parent: list[int] = []
    targets = _Targets([], [], [], [])
    n_segments = 0
    starts: list[int] = []  # where each query's block (the query, then its branches) starts in the row
    for i, (query, conts) in enumerate(zip(queries, continuations)):
        q_seg, n_segments = n_segments, n_segments + 1
        starts.append(len(ids))
        ids += query
        positions += range(prefix_length, prefix_length + len(query))
        segment += [q_seg] * len(query)
        parent += [-1] * len(query)
        answer = len(ids) - 1
        targets.answer_rows.append(answer)
        for c, cont in enumerate(conts):
            slot = i * n_classes + c
            targets.rows.append(answer), targets.tokens.append(cont[0]), targets.slots.append(slot)
            if len(cont) > 1:
                b_seg, n_segments = n_segments, n_segments + 1
                start = len(ids)
                ids += cont[:-1]
                first = prefix_length + len(query)
                positions += range(first, first + len(cont) - 1)
                segment += [b_seg] * (len(cont) - 1)
                parent += [q_seg] * (len(cont) - 1)
                for j in range(1, len(cont)):
                    targets.rows.append(start + j - 1), targets.tokens.append(cont[j]), targets.slots.append(slot)
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    seg = torch.tensor(segment, dtype=torch.long, device=device)
    par = torch.tensor(parent, dtype=torch.long, device=device)
    # Within the row: a token sees its own segment's earlier tokens and its parent query's tokens, so each
    # query with its branches is a block that sees nothing of the others (shared_attention never scores them).
    within = ((seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])) | (par[:, None] == seg[None, :])
    layout = shared_attention.Layout.build(prefix_length, starts,
                                           [b - a for a, b in zip(starts, starts[1:] + [len(ids)])],
                                           pos, within)
    keep = sorted(set(targets.rows))
    where = {row: k for k, row in enumerate(keep)}
    past = cache.for_pass() if cache is not None else None
    with shared_attention.use_layout(model, layout):
        out = model(input_ids=torch.tensor([ids], dtype=torch.long, device=device), position_ids=pos[None],
                    cache=past, use_cache=past is not None,
                    logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device))
    kept = _Targets([where[r] for r in targets.rows], targets.tokens, targets.slots,
                    [where[r] for r in targets.answer_rows])
    return _class_scores(out.logits[0], kept, n, n_classes, label_score)


def rows_forward(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                 continuations: Sequence[Sequence[Sequence[int]]], *, pad_id: int = 0, label_score: str = "sum"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain pass: each whole prompt (plus a multi-token word's tokens) as its own right-padded row.

    Returns (n, V) logits at each prompt's answer position and (n, C) float32 class scores; differentiable
    (the student trains through it). Single-token words take one row and one position per prompt; a prompt
    with a longer word takes one row per class. Right padding needs no mask under causal attention.
    """
    n, n_classes = len(prompts), len(continuations[0])
    rows: list[list[int]] = []
    need: list[list[int]] = []
    targets = _Targets([], [], [], [])
    for i, (prompt, conts) in enumerate(zip(prompts, continuations)):
        answer = len(prompt) - 1
        if all(len(c) == 1 for c in conts):
            r = len(rows)
            rows.append(list(prompt))
            need.append([answer])
            targets.answer_rows.append((r, 0))
            for c, cont in enumerate(conts):
                targets.rows.append((r, 0)), targets.tokens.append(cont[0]), targets.slots.append(i * n_classes + c)
            continue
        for c, cont in enumerate(conts):
            r = len(rows)
            rows.append(list(prompt) + list(cont[:-1]))
            need.append(list(range(answer, answer + len(cont))))
            if c == 0:
                targets.answer_rows.append((r, 0))
            for j, token in enumerate(cont):
                targets.rows.append((r, j)), targets.tokens.append(token), targets.slots.append(i * n_classes + c)
    width = max(len(p) for p in need)
    keep = torch.tensor([p + [p[-1]] * (width - len(p)) for p in need], dtype=torch.long, device=model.device)
    ids, _ = pad_right(rows, pad_id, model.device)
    logits = model(input_ids=ids, logits_to_keep=keep).logits  # (rows, width, V)
    flat = _Targets([r * width + j for r, j in targets.rows], targets.tokens, targets.slots,
                    [r * width + j for r, j in targets.answer_rows])
    return _class_scores(logits.reshape(-1, logits.shape[-1]), flat, n, n_classes, label_score)


# --------------------------------------------------------------------------------------------------
# Scoring many queries


@dataclass
class Scores:
    """What one scoring pass returns, in query order.

    label_logprobs (n, C) float32: each class's label-word score, the sum (or mean) of the log-probabilities
    of its tokens after the prompt, over the full vocabulary (one token: log p(word)).
    top_token (n,) long: the full-vocabulary argmax at the answer position (after the prompt).
    topk_logprobs, topk_ids (n, k): the k most likely next tokens there (only when asked, for vocabulary KL).
    first_label_ids (n, C): the first token of each class's word after each prompt.
    multi_token: some label word took more than one token.
    prompt_tokens: prefix + query tokens summed over queries (what the naive path would read).
    """

    label_logprobs: torch.Tensor
    top_token: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    prompt_tokens: int = 0
    first_label_ids: torch.Tensor | None = None
    multi_token: bool = False


def _per_query(label_ids: LabelIds, n: int) -> list[list[list[int]]]:
    ids = list(label_ids)
    if ids and isinstance(ids[0], int):
        return [[[int(t)] for t in ids]] * n
    if len(ids) != n:
        raise ValueError(f"label tokens for {len(ids)} queries, {n} queries given")
    return [[list(c) for c in conts] for conts in ids]


def score_queries(
    model: PreTrainedModel,
    prefix_ids: Sequence[int],
    query_ids: Sequence[Sequence[int]],
    label_ids: LabelIds,
    *,
    batch_size: int = 16,
    use_prefix_cache: bool = True,
    topk: int = 0,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
    prefix_cache: PrefixCache | None = None,
    label_score: str = "sum",
) -> Scores:
    """Score every prompt ``prefix_ids + query_ids[i]``: class scores of its label words, full-vocabulary argmax.

    ``label_ids`` is one token id per class, or per query the tokens of each class's word after it.
    The cached path packs ``batch_size`` queries into one row after the prefix's cache; a
    ``prefix_cache`` built earlier is reused if its tokens start the prefix (else it is shortened to the
    part they share, which is exact), and the rest of the prefix is scored with each query.
    ``use_prefix_cache=False`` runs each whole prompt (the naive path). Queries are sorted by length
    and results come back in the original order. ``on_batch(n)`` is called after each batch of n queries.
    """
    if label_score not in LABEL_SCORES:
        raise ConfigError(f"label_score must be one of {', '.join(LABEL_SCORES)}, got {label_score!r}.")
    n = len(query_ids)
    prefix = list(prefix_ids)
    conts = _per_query(label_ids, n)
    n_classes = len(conts[0]) if n else len(list(label_ids))
    label_logprobs = torch.empty((n, n_classes), dtype=torch.float32)
    top_token = torch.empty((n,), dtype=torch.long)
    topk_lp = torch.empty((n, topk), dtype=torch.float32) if topk else None
    topk_ids = torch.empty((n, topk), dtype=torch.long) if topk else None
    first_ids = torch.tensor([[c[0] for c in row] for row in conts], dtype=torch.long).view(n, n_classes)
    cache = None
    if use_prefix_cache and n:
        cache = prefix_cache if prefix_cache is not None else PrefixCache(model, prefix)
        if cache.unsupported:
            _warn_once(model, cache.unsupported)
            cache = None
        else:
            cache.shrink(matching_length(cache.tokens, prefix))
    head = prefix[cache.length:] if cache is not None else prefix
    order = sorted(range(n), key=lambda i: -(len(query_ids[i]) + sum(len(c) for c in conts[i])))
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch_conts = [conts[i] for i in idx]
            if cache is not None:
                logits, scores = _packed_forward(model, cache, [head + list(query_ids[i]) for i in idx], batch_conts,
                                                 label_score)
            else:
                logits, scores = rows_forward(model, [prefix + list(query_ids[i]) for i in idx], batch_conts,
                                              pad_id=pad_id, label_score=label_score)
            rows = torch.tensor(idx, dtype=torch.long)
            label_logprobs[rows] = scores.cpu()
            top_token[rows] = logits.argmax(dim=-1).cpu()
            if topk:
                values, indices = torch.log_softmax(logits.float(), dim=-1).topk(topk, dim=-1)
                topk_lp[rows] = values.cpu()
                topk_ids[rows] = indices.cpu()
            if on_batch is not None:
                on_batch(len(idx))
    prompt_tokens = sum(len(prefix) + len(q) for q in query_ids)
    multi = any(len(c) > 1 for row in conts for c in row)
    return Scores(label_logprobs, top_token, topk_lp, topk_ids, prompt_tokens, first_ids, multi)


def score_queries_sharded(
    model: PreTrainedModel,
    prefix_ids: Sequence[int],
    query_ids: Sequence[Sequence[int]],
    label_ids: LabelIds,
    **kwargs,
) -> Scores:
    """``score_queries`` with the queries split across the ranks of a distributed run, gathered back in order.

    Each rank scores its ``distributed.shard`` with its own prefix cache, and every rank gets all rows
    (metrics are computed from the gathered arrays, identical on every rank). A query's scores do not
    depend on which others share its pass (up to float rounding), so N processes give the numbers of
    one. In one process this is ``score_queries`` itself. ``on_batch`` counts this rank's queries.
    """
    if distributed.num_processes() == 1:
        return score_queries(model, prefix_ids, query_ids, label_ids, **kwargs)
    mine = distributed.shard(len(query_ids))
    conts = _per_query(label_ids, len(query_ids))
    local = score_queries(model, prefix_ids, [query_ids[i] for i in mine], [conts[i] for i in mine], **kwargs)
    label_logprobs, top_token, topk_lp, topk_ids = distributed.gather_rows(
        [local.label_logprobs, local.top_token, local.topk_logprobs, local.topk_ids], mine, len(query_ids))
    prompt_tokens = sum(len(prefix_ids) + len(q) for q in query_ids)
    first_ids = torch.tensor([[c[0] for c in row] for row in conts], dtype=torch.long).view(len(query_ids), -1)
    multi = any(len(c) > 1 for row in conts for c in row)
    return Scores(label_logprobs, top_token, topk_lp, topk_ids, prompt_tokens, first_ids, multi)
