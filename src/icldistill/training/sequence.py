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

import weakref
from collections.abc import Callable, Sequence
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

    def _chunk(self, fn: Callable[..., torch.Tensor], hidden: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        device_type, dtype, enabled = self.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            logits = self.head(hidden)
        return fn(logits.float(), *rows)


# Heads whose output is not the model's logits (a soft-cap or a scale after them, as in Gemma 2 or Cohere),
# found on a first batch: their models are scored through the whole logits from then on.
_NOT_THE_LOGITS: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def answer_scores(model: Any, batch: AnswerBatch, cache: Any = None) -> torch.Tensor | AnswerHidden:
    """What a loss reads at the answer tokens: an :class:`AnswerHidden`, or the (tokens, vocab) logits of
    :func:`answer_logits` where the head's output is not the model's logits or its weights are sharded.

    One forward keeps a single column of logits; a hook on the head checks, on every batch, that the last
    hidden state is the head's input and the head's output the model's logits (both exactly), so a model
    that transforms its logits after the head is never scored through the head alone.
    """
    head = _output_head(model)
    if head is None or head in _NOT_THE_LOGITS:
        return answer_logits(model, batch, cache)
    device = model.device
    seen: dict[str, Any] = {}

    def record(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        t = output.device.type
        seen.update(input=args[0], output=output,
                    autocast=(t, torch.get_autocast_dtype(t), torch.is_autocast_enabled(t)))

    handle = head.register_forward_hook(record)
    try:
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    position_ids=batch.position_ids.to(device), cache=cache, use_cache=cache is not None,
                    logits_to_keep=1, output_hidden_states=True)
    finally:
        handle.remove()
    last = out.hidden_states[-1]
    same = seen and torch.equal(seen["input"], last[:, -1:]) and torch.equal(seen["output"].float(), out.logits.float())
    if not same:
        _NOT_THE_LOGITS.add(head)
        return answer_logits(model, batch, cache)
    hidden = last[:, batch.keep.to(device)][batch.answer_mask.to(device)]
    return AnswerHidden(hidden, head, seen["autocast"])


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
