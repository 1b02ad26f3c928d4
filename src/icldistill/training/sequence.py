"""Logits at the answer tokens of (prompt, answer) pairs, for the student alone or the teacher after a context.

One layout serves both: after an optional shared prefix (the teacher's context, its KV cache computed
once by ``scoring.prefix_cache.PrefixCache``), each row is ``[pads] prompt answer [pads]``: prompts
left-padded to one width, so every answer starts in the same column, and answers right-padded. Pads are
masked and do not advance position ids, so each row computes what its unpadded prompt + answer would.
Only the logits that predict answer tokens are computed (``logits_to_keep``) and returned flattened,
``(tokens, vocab)``, with the index of the sequence each belongs to: prompt tokens can never enter a loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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
