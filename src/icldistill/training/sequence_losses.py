"""Token-level losses of generated answers: CE on answer tokens, top-k KL, and generalised JSD (GKD / OPCD).

Pure functions of tensors (torch only), like ``training.losses``. An answer's tokens arrive flattened:
``(tokens, vocab)`` logits with a ``(tokens,)`` index of the sequence each token belongs to, so that the
prompt's tokens never enter a loss (only answer positions are ever gathered) and padding needs no mask.
A sequence's loss is the mean over its answer tokens, and a batch's the mean (or sum) over its
sequences: a long answer weighs as much as a short one, as in TRL's GKD and SFT trainers.

The student's side is the (tokens, vocab) logits, or anything with ``per_token(fn, *rows)`` that applies a
per-token loss of logits chunk by chunk (``training.sequence.AnswerHidden``): every loss here is one value
per token before the per-sequence mean, so both give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from icldistill.training.losses import _check_temperature, _reduce, topk_vocab_kl


def per_sequence_mean(per_token: Tensor, sequence: Tensor, n_sequences: int) -> Tensor:
    """``(n_sequences,)`` mean of ``per_token`` (tokens,) over the tokens of each sequence (0 for none)."""
    sums = torch.zeros(n_sequences, dtype=per_token.dtype, device=per_token.device)
    sums = sums.index_add(0, sequence, per_token)
    counts = torch.bincount(sequence, minlength=n_sequences).clamp(min=1).to(per_token.dtype)
    return sums / counts


class ChunkedLogits(Protocol):
    """Logits computed chunk by chunk from hidden states (``training.sequence.AnswerHidden``)."""

    hidden: Tensor

    def per_token(self, fn: Callable[..., Tensor], *rows: Tensor) -> Tensor: ...

    def logits(self, hidden: Tensor) -> Tensor: ...


Student = Tensor | ChunkedLogits  # (tokens, V) logits, or ChunkedLogits of them


def per_token(student: Student, fn: Callable[..., Tensor], *rows: Tensor) -> Tensor:
    """``(tokens,)``: ``fn(logits, *rows)`` on the student's logits, or chunk by chunk where it computes them so."""
    return fn(student, *rows) if isinstance(student, Tensor) else student.per_token(fn, *rows)


def _ce(logits: Tensor, target_ids: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), target_ids.long(), reduction="none")


def answer_ce(student_logits: Student, target_ids: Tensor, sequence: Tensor, n_sequences: int,
              reduction: str = "mean") -> Tensor:
    """Cross-entropy of the answer tokens: SFT on references or on the teacher's answers (``sequence``).

    student_logits (tokens, V) at the positions that predict ``target_ids`` (tokens,).
    """
    per_tok = per_token(student_logits, _ce, target_ids)
    return _reduce(per_sequence_mean(per_tok, sequence, n_sequences), reduction)


def answer_topk_kl(teacher_topk_logprobs: Tensor, teacher_topk_ids: Tensor, student_logits: Student, sequence: Tensor,
                   n_sequences: int, temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Forward KL from the teacher's cached top-k log-probabilities at every answer token (``token`` signal).

    (tokens, k) teacher entries, (tokens, V) student logits; each token's KL is ``losses.topk_vocab_kl``'s
    (top-k support, both sides renormalised, scaled by T^2).
    """
    def kl(logits: Tensor, lp: Tensor, ids: Tensor) -> Tensor:
        return topk_vocab_kl(lp, ids, logits, temperature, reduction="none")

    per_tok = per_token(student_logits, kl, teacher_topk_logprobs, teacher_topk_ids)
    return _reduce(per_sequence_mean(per_tok, sequence, n_sequences), reduction)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0
                    ) -> Tensor:
    """Per-token generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), ``(tokens,)``.

    ``beta = 0`` is the forward KL(teacher || student), ``beta = 1`` the reverse KL(student || teacher)
    (OPCD's choice on the student's own samples); in between, ``beta * KL(t || m) + (1 - beta) * KL(s || m)``
    with the mixture ``m = beta * t + (1 - beta) * s``, computed in log space as TRL does.
    Both (tokens, V) over one vocabulary; float32 math; scaled by T^2 like the other KLs.
    """
    _check_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)} (one tokenizer is needed).")
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float().to(s.device) / temperature, dim=-1)

    def kl(p_log: Tensor, q_log: Tensor) -> Tensor:  # KL(p || q) per row
        return (p_log.exp() * (p_log - q_log)).sum(-1)

    if beta == 0.0:
        out = kl(t, s)
    elif beta == 1.0:
        out = kl(s, t)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        out = beta * kl(t, m) + (1 - beta) * kl(s, m)
    return out * temperature**2


def answer_jsd(student_logits: Student, teacher_logits: Student, sequence: Tensor, n_sequences: int,
               beta: float = 1.0, temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """The ``on-policy`` signal's loss: generalised JSD per answer token, averaged per sequence.

    ``teacher_logits``: the teacher's (tokens, V) logits, or its :class:`ChunkedLogits`, whose rows are then
    computed a chunk at a time beside the student's (frozen: no gradient reaches the teacher).
    """
    whole = isinstance(teacher_logits, Tensor)

    def jsd(logits: Tensor, teacher: Tensor) -> Tensor:
        if not whole:
            with torch.no_grad():
                teacher = teacher_logits.logits(teacher)
        return generalized_jsd(logits, teacher, beta, temperature)

    per_tok = per_token(student_logits, jsd, teacher_logits if whole else teacher_logits.hidden)
    return _reduce(per_sequence_mean(per_tok, sequence, n_sequences), reduction)
