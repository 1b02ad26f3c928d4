"""Greedy generation of many prompts that share a token prefix, the prefix's KV cache computed once.

The prompts of one context (demonstrations, or an instruction, then a query) are tokenized whole; their
longest common token prefix is run through the model once (``prefix_cache.PrefixCache``) and every batch
of queries continues from it: the batch's cache starts as views of the prefix's keys and values, the
queries are left-padded *after* the prefix (the pads masked, position ids counted without them), and
decoding appends one token per row per step. So the context costs one forward pass per context, not one
per query, and decoding runs in batches of ``batch_size`` rows.

``use_prefix_cache=False`` runs the same loop on each whole prompt (the naive path, also the reference of
the equality tests). Models with a sliding attention window count pads inside the window, so for them a
batch holds queries of one length only (no pads, the same numbers); families the prefix cache does not
support fall back to the naive path (``prefix_cache`` warns once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icldistill.errors import ConfigError
from icldistill.scoring.encoding import common_prefix_length
from icldistill.scoring.prefix_cache import PrefixCache

if TYPE_CHECKING:
    from icldistill.scoring.answer_journal import AnswerJournal

logger = logging.getLogger(__name__)
LOG_EVERY_S = 60.0  # a longer decode logs how far it is (a GSM8K set takes minutes on CPU; sweeps run quiet)


@dataclass(frozen=True)
class DecodeSettings:
    """How answers are decoded: greedily, up to ``max_new_tokens``, ending at EOS or a stop sequence."""

    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    batch_size: int = 8
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks compare paths at equal lengths)
    temperature: float = 0.0  # 0: greedy; above 0: sampled (on-policy distillation), seeded by generate's seed

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens}).")
        if self.batch_size < 1:
            raise ConfigError(f"the generation batch size must be at least 1 (got {self.batch_size}).")
        if not self.temperature >= 0.0:
            raise ConfigError(f"the sampling temperature must be >= 0 (got {self.temperature}; 0 is greedy).")
        if any(not s for s in self.stop):
            raise ConfigError("a stop sequence is empty: remove it (EOS always ends an answer).")


@dataclass(frozen=True)
class Generated:
    """One answer: its new token ids (up to, not including, EOS), its text cut at the first stop sequence,
    and why it ended (``eos``, ``stop`` or ``length``)."""

    tokens: tuple[int, ...]
    text: str
    finish: str


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id that ends an answer: the generation config's EOS ids (instruct models list several, e.g.
    Qwen's ``<|im_end|>`` and ``<|endoftext|>``) and the tokenizer's EOS."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def has_sliding_window(model: PreTrainedModel) -> bool:
    """Whether some attention layer sees only a window of positions (then pads would take window slots)."""
    config = model.config
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return True
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False


def _batches(queries: Sequence[Sequence[int]], size: int, equal_lengths: bool) -> list[list[int]]:
    """Query indices in batches, longest first (less padding); with ``equal_lengths`` one length a batch."""
    order = sorted(range(len(queries)), key=lambda i: (-len(queries[i]), i))
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        fits = last is not None and len(last) < size
        if fits and equal_lengths:
            fits = len(queries[last[0]]) == len(queries[i])
        if fits:
            last.append(i)
        else:
            batches.append([i])
    return batches


def prefix_for_rows(prefix: PrefixCache, rows: int) -> Any:
    """The prefix's cache for a batch of ``rows``: views expanded along the batch, never copied here."""
    cache = prefix.for_pass()  # its layers are fresh objects over the prefix's tensors
    if cache is not None and rows != 1:
        for layer in cache.layers:
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
    return cache


class _Rows:
    """The decoding state of one batch: tokens so far, which rows are done, and why."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, n: int, settings: DecodeSettings, eos: frozenset[int]):
        self.tokenizer, self.settings, self.eos = tokenizer, settings, eos
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n

    def add(self, next_ids: Mapping[int, int]) -> None:
        """The next token of each row still decoding (row index -> token id)."""
        for i, token in next_ids.items():
            if self.finish[i] is not None:
                continue
            if token in self.eos:
                self.finish[i] = "eos"
                continue
            self.tokens[i].append(token)
            if self.settings.stop and self._stopped(i):
                self.finish[i] = "stop"
            elif len(self.tokens[i]) >= self.settings.max_new_tokens:
                self.finish[i] = "length"

    def _stopped(self, i: int) -> bool:
        # Only the tail can hold a stop sequence that the previous step did not: decode a few tokens more
        # than the longest stop sequence could need (a token holds at least one character).
        tail = self.tokens[i][-(max(map(len, self.settings.stop)) + 8):]
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s in text for s in self.settings.stop)

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def results(self) -> list[Generated]:
        out = []
        for tokens, finish in zip(self.tokens, self.finish):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for s in self.settings.stop:
                text = text.split(s, 1)[0]
            out.append(Generated(tuple(tokens), text, finish or "length"))
        return out


def _next_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """(rows,) next token ids from (rows, vocab) logits: the argmax, or a sample at ``temperature``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


def rows_after_prefix(rows: Sequence[Sequence[int]], starts: Sequence[int], width: int, pad_id: int, past: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows laid out after ``past`` shared prefix tokens, row i starting at column ``starts[i]``.

    Returns (n, width) ids padded with ``pad_id``, the (n, past + width) attention mask (pads masked) and
    (n, width) position ids that count only real tokens, so each row computes what it would alone. Used by
    decoding (queries left-padded) and by training on answers (prompts left-padded, answers right-padded).
    """
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    own = torch.zeros((n, width), dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, start:start + len(row)] = torch.tensor(list(row), dtype=torch.long)
        own[i, start:start + len(row)] = 1
    mask = torch.cat([torch.ones((n, past), dtype=torch.long), own], dim=1)
    positions = (past + own.cumsum(dim=1) - 1).clamp(min=past)  # pads do not advance a position
    return ids, mask, positions


def _decode_batch(model: PreTrainedModel, prefix: PrefixCache | None, queries: Sequence[Sequence[int]],
                  rows: _Rows, pad_id: int, generator: torch.Generator | None = None) -> None:
    """Decoding of one batch of queries (left-padded after the prefix) until every row has ended.

    A row that has ended leaves the batch (its cache rows, mask and positions dropped): a batch costs the
    sum of its answers' lengths, not its size times the longest answer. The rows still running compute
    exactly what they would alone (each row's attention reads only its own cache row).
    """
    device = model.device
    n, width = len(queries), max(len(q) for q in queries)
    past = prefix.length if prefix is not None else 0
    ids, mask, positions = rows_after_prefix(queries, [width - len(q) for q in queries], width, pad_id, past)
    mask, positions = mask.to(device), positions.to(device)
    cache = prefix_for_rows(prefix, n) if prefix is not None else None
    step_ids = ids.to(device)
    active = list(range(n))  # batch row j decodes the batch's query active[j]
    with torch.no_grad():
        while True:
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1)
            cache = out.cache
            next_ids = _next_tokens(out.logits[:, -1, :], rows.settings.temperature, generator)
            rows.add(dict(zip(active, next_ids.tolist())))
            if rows.done:
                return
            keep = [j for j, i in enumerate(active) if rows.finish[i] is None]
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(index)
                next_ids, mask, positions = next_ids[index], mask[index], positions[index]
                active = [active[j] for j in keep]
            step_ids = next_ids[:, None]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1


def _journalled(journal: AnswerJournal | None, settings: DecodeSettings) -> dict[int, Generated]:
    """The answers ``journal`` already holds (none without one), the journal opened for the new batches."""
    if journal is None:
        return {}
    if settings.temperature > 0:
        raise ValueError("sampled decoding cannot be journalled: its batches share one generator.")
    return {i: Generated(tuple(a["tokens"]), a["text"], a["finish"]) for i, a in journal.open().items()}


class _Progress:
    """Finished prompts, told to the caller's ``progress`` callable at every batch and to the log at most
    once every ``LOG_EVERY_S`` (so a long decode in a quiet sweep still shows that it moves)."""

    def __init__(self, total: int, callback: Any):
        self.total, self.callback, self.finished = total, callback, 0
        self.start = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.finished += n
        if self.callback is not None:
            self.callback(n)
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            self.last = now
            logger.info("decoded %d of %d answers in %.0f s", self.finished, self.total, now - self.start)


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
                    settings: DecodeSettings = DecodeSettings(), *, use_prefix_cache: bool = True,
                    progress: Any = None, seed: int = 0, journal: AnswerJournal | None = None) -> list[Generated]:
    """Answers to token-id ``prompts`` (each whole: context + query), in the order given: greedy, or
    sampled at ``settings.temperature`` from a generator seeded with ``seed`` (the same seed, prompts and
    batch size give the same samples).

    With ``use_prefix_cache`` the prompts' common token prefix is computed once and shared; without, each
    prompt is decoded whole (the naive reference). ``progress`` is an optional callable taking the number
    of prompts finished since its last call (a tqdm's ``update``). With a ``journal`` (greedy only) each
    finished batch is recorded there and a batch already recorded is not decoded again (a killed run resumes
    at its next batch; ``scoring.answer_journal``).
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("a prompt is empty: every prompt needs at least one token to continue from.")
    done = _journalled(journal, settings)
    prefix: PrefixCache | None = None
    split = 0
    if use_prefix_cache:
        prefix = PrefixCache(model, list(prompts[0][:common_prefix_length(prompts)]))
        if prefix.unsupported is not None or prefix.length == 0:
            prefix = None  # the family cannot share a cache (PrefixCache says why), or nothing is shared
        else:
            split = prefix.length
    queries = [list(p[split:]) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = frozenset() if settings.ignore_eos else eos_token_ids(model, tokenizer)
    results: list[Generated | None] = [None] * len(prompts)
    generator = torch.Generator().manual_seed(seed) if settings.temperature > 0 else None
    told = _Progress(len(prompts), progress)
    for batch in _batches(queries, settings.batch_size, has_sliding_window(model)):
        if all(i in done for i in batch):
            answers = [done[i] for i in batch]
        else:
            rows = _Rows(tokenizer, len(batch), settings, eos)
            _decode_batch(model, prefix, [queries[i] for i in batch], rows, pad_id, generator)
            answers = rows.results()
            if journal is not None:
                journal.append(batch, answers)
        for i, generated in zip(batch, answers):
            results[i] = generated
        told.add(len(batch))
    return [r for r in results if r is not None]
