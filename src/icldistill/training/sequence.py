"""Logits at the answer tokens of (prompt, answer) pairs, for the student alone or the teacher after a context.

One layout serves both: after an optional shared prefix (the teacher's context, its KV cache computed
once by ``scoring.prefix_cache.PrefixCache``), each row is ``[pads] prompt answer [pads]``: prompts
left-padded to one width, so every answer starts in the same column, and answers right-padded. Pads are
masked and do not advance position ids, so each row computes what its unpadded prompt + answer would.
Only the logits that predict answer tokens are computed (``logits_to_keep``) and returned flattened,
``(tokens, vocab)``, with the index of the sequence each belongs to: prompt tokens can never enter a loss.

A training loss reads :func:`answer_scores` instead: the final hidden states at the answer tokens and the LM
head (:class:`AnswerHidden`), whose logits are computed a chunk of tokens at a time and recomputed in the
backward pass, so the (tokens, vocab) logits, their log-softmax and their gradient never exist whole.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch.utils.checkpoint import checkpoint

from icldistill.errors import ConfigError
from icldistill.scoring.generation import rows_after_prefix


@dataclass(frozen=True)
class AnswerBatch:
    """Token ids of ``n`` (prompt, answer) rows laid out for one forward pass, and where the answers are.

    input_ids, attention_mask (n, past + width); position_ids (n, width); keep (answer_width,) columns
    whose logits predict answer tokens; answer_mask (n, answer_width) which of those are real; targets
    (tokens,) the answer tokens in row order; sequence (tokens,) each token's row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    keep: torch.Tensor
    answer_mask: torch.Tensor
    targets: torch.Tensor
    sequence: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.targets.numel())


def answer_batch(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
                 past: int = 0) -> AnswerBatch:
    """Lay out (prompt, answer) token rows after ``past`` shared prefix tokens (see the module docstring)."""
    if len(prompts) != len(answers) or not prompts:
        raise ConfigError(f"need as many answers as prompts, at least one (got {len(prompts)} and {len(answers)}).")
    if any(not p for p in prompts) or any(not a for a in answers):
        raise ConfigError("every prompt needs a token of its own and every answer at least one token.")
    n, wp, wa = len(prompts), max(map(len, prompts)), max(map(len, answers))
    rows = [list(p) + list(a) for p, a in zip(prompts, answers)]
    ids, mask, positions = rows_after_prefix(rows, [wp - len(p) for p in prompts], wp + wa, pad_id, past)
    answer_mask = mask[:, past + wp:].bool()
    targets = ids[:, wp:][answer_mask]
    sequence = torch.arange(n)[:, None].expand(n, wa)[answer_mask]
    keep = torch.arange(wp - 1, wp + wa - 1)  # the column before each answer token predicts it
    return AnswerBatch(ids, mask, positions, keep, answer_mask, targets, sequence)


def answer_logits(model: Any, batch: AnswerBatch, cache: Any = None) -> torch.Tensor:
    """(tokens, vocab) logits predicting each answer token, in row order; differentiable.

    ``cache``: the shared prefix's cache for ``batch.n`` rows (its length is the ``past`` the batch was
    laid out with), or None when there is no prefix.
    """
    device = model.device
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device), cache=cache, use_cache=cache is not None,
                logits_to_keep=batch.keep.to(device))
    return out.logits[batch.answer_mask.to(device)]


CHUNK_TOKENS = 256  # answer tokens whose logits exist at once in a training loss (AnswerHidden)


@dataclass(frozen=True)
class AnswerHidden:
    """The final hidden states at the answer tokens and the LM head: logits computed a chunk at a time.

    With Qwen's 151,936-token vocabulary, 8 answers of 256 tokens make 1.2 GB of fp32 logits, and a loss
    keeps their log-softmax and their gradient beside them. :meth:`per_token` runs the head on ``chunk``
    tokens, reduces their logits to one value a token, and lets autograd recompute them in the backward
    pass (``torch.utils.checkpoint``): one chunk's logits exist at a time, with the numbers of the whole.
    ``autocast`` is (device type, dtype, enabled) as the head ran inside the model's forward (accelerate's
    mixed precision wraps the forward only), so each chunk computes what the forward would have.
    """

    hidden: torch.Tensor  # (tokens, hidden)
    head: torch.nn.Module
    autocast: tuple[str, torch.dtype, bool]
    chunk: int = CHUNK_TOKENS

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def per_token(self, fn: Callable[..., torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
        """``(tokens,)``: ``fn(logits (c, vocab), *row_chunks) -> (c,)`` over chunks of c tokens, in order."""
        out = []
        for start in range(0, self.hidden.shape[0], self.chunk):
            part = slice(start, start + self.chunk)
            args = (self.hidden[part], *(r[part] for r in rows))
            if torch.is_grad_enabled() and self.hidden.requires_grad:
                out.append(checkpoint(self._chunk, fn, *args, use_reentrant=False))
            else:
                out.append(self._chunk(fn, *args))
        return torch.cat(out)

    def logit_chunks(self) -> Iterator[torch.Tensor]:
        """The fp32 logits of ``chunk`` tokens at a time, in order, for reading them (a teacher's top-k)."""
        for hidden in self.hidden.split(self.chunk):
            yield self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of some of :attr:`hidden`'s rows, as the model's forward computes them."""
        device_type, dtype, enabled = self.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return self.head(hidden).float()

    def _chunk(self, fn: Callable[..., torch.Tensor], hidden: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        return fn(self.logits(hidden), *rows)


# Whether a head's output is its model's logits (no soft-cap or scale after it, as Gemma 2 and Cohere have):
# found once per head, on the first batch's first row (:func:`_head_is_logits`).
_HEAD_IS_LOGITS: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def answer_scores(model: Any, batch: AnswerBatch, cache: Any = None) -> torch.Tensor | AnswerHidden:
    """What a loss reads at the answer tokens: an :class:`AnswerHidden`, or the (tokens, vocab) logits of
    :func:`answer_logits` where the head's output is not the model's logits or its weights are sharded.

    One forward keeps a single column of logits and every layer's hidden states; the last, at the answer
    columns, is what the head would have read (checked, with the head's output, once per head).
    """
    head = _output_head(model)
    if head is None or not _head_is_logits(model, head, batch):
        return answer_logits(model, batch, cache)
    device = model.device
    with _watching(head) as seen:
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    position_ids=batch.position_ids.to(device), cache=cache, use_cache=cache is not None,
                    logits_to_keep=1, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, batch.keep.to(device)][batch.answer_mask.to(device)]
    return AnswerHidden(hidden, head, seen["autocast"])


def _head_is_logits(model: Any, head: torch.nn.Module, batch: AnswerBatch) -> bool:
    """Whether the head reads the last hidden state and its output is the model's logits, both exactly at every
    position of the batch's first row: one forward without gradients, once per head."""
    if head not in _HEAD_IS_LOGITS:
        with torch.no_grad(), _watching(head) as seen:
            out = model(input_ids=_first_row(batch).to(model.device), logits_to_keep=0, output_hidden_states=True)
        last = out.hidden_states[-1] if getattr(out, "hidden_states", None) else None
        _HEAD_IS_LOGITS[head] = (bool(seen) and last is not None and torch.equal(seen["input"], last)
                                 and torch.equal(seen["output"].float(), out.logits.float()))
    return _HEAD_IS_LOGITS[head]


def _first_row(batch: AnswerBatch) -> torch.Tensor:
    """(1, n) the first row's prompt and answer tokens, without its pads (and without the shared prefix)."""
    width = batch.input_ids.shape[1]
    return batch.input_ids[0][batch.attention_mask[0, -width:].bool()][None]


@contextlib.contextmanager
def _watching(head: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """What ``head`` read and returned in a forward, and the autocast it ran under (device type, dtype, on)."""
    seen: dict[str, Any] = {}

    def record(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        t = output.device.type
        seen.update(input=args[0], output=output,
                    autocast=(t, torch.get_autocast_dtype(t), torch.is_autocast_enabled(t)))

    handle = head.register_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def _output_head(model: Any) -> torch.nn.Module | None:
    """The LM head of a model called directly or under DDP; None where its weights are sharded (FSDP,
    DeepSpeed ZeRO-3: only the model's own forward gathers them)."""
    inner = extract_model_from_parallel(model)
    if type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine"):
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or any(hasattr(p, "device_mesh") or hasattr(p, "ds_id") for p in head.parameters()):
        return None
    return head
