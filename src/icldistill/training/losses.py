"""Distillation losses as small pure functions: label-word log-probabilities, CE, KL, their mix.

Every function takes and returns tensors and imports nothing but torch, so that the training loop,
the offline teacher cache and the tests all score the same way (cf. torchtune ``kd_losses``).

Reduction convention: a loss is the *mean over the batch of per-example losses* by default. With
micro-batches of equal size, averaging their mean losses (gradient accumulation) then gives exactly
the gradient of one big batch. ``reduction="sum"`` returns the plain sum instead: that is what a
training loop needs when micro-batches (or data-parallel ranks) have unequal sizes; it sums the
per-example losses everywhere and divides once by the total number of examples.
``reduction="none"`` returns the per-example losses, shape ``(batch,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from icldistill.errors import ConfigError

__all__ = [
    "LossOutput",
    "REDUCTIONS",
    "ce_loss",
    "check_vocab_compatible",
    "class_log_probs",
    "distillation_loss",
    "kl_loss",
    "mix_terms",
    "topk_vocab_kl",
]

REDUCTIONS = ("mean", "sum", "none")
"""Accepted values of ``reduction``: batch mean (default), batch sum, or per-example losses."""


@dataclass(frozen=True)
class LossOutput:
    """The result of :func:`distillation_loss`."""

    loss: Tensor
    """The loss to backpropagate: ``alpha * kl + (1 - alpha) * ce`` (scalar, or ``(batch,)`` for reduction "none")."""
    kl: Tensor | None
    """The KL term, detached, for logging; None when not computed (alpha == 0)."""
    ce: Tensor | None
    """The CE term, detached, for logging; None when not computed (alpha == 1)."""


# --------------------------------------------------------------------------------------------------
# Validation and small helpers
# --------------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}.")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):  # NaN fails the comparison
        raise ConfigError(
            f"alpha (the weight of the KL term in alpha * KL + (1 - alpha) * CE) must lie in [0, 1], "
            f"got {alpha!r}."
        )


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    """Reduce per-example losses ``(batch,)`` to a scalar (mean, sum) or keep them (none)."""
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    # A caller bug, not a user option: a ValueError keeps its traceback.
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def _at_least_float32(x: Tensor) -> Tensor:
    """Upcast half precision (bf16, fp16) to float32; keep float32 / float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------------


def class_log_probs(class_scores: Tensor, temperature: float = 1.0) -> Tensor:
    """The answer distribution over C classes from their label-word scores, at temperature ``temperature``.

    A class's score is the log-probability of its whole label word after the prompt (the sum, or the
    mean, of its tokens' log-probabilities; issue 10). For single-token words the score is
    ``log p(word) = logit - logsumexp(logits)``, and since a softmax ignores a shared shift this equals
    a log-softmax of the logits restricted to the label words: one definition serves words of any length,
    across tokenizers. The upcast to float32 happens before the division and the softmax: bf16 keeps only 8
    mantissa bits, and a log-softmax computed in bf16 is off by up to ~1e-2 (the paper trains in BF16).

    Args:
        class_scores: ``(batch, C)`` label-word log-probabilities (e.g. ``Scores.label_logprobs``).
        temperature: softmax temperature T > 0; the scores are divided by T.

    Returns:
        ``(batch, C)`` float32 ``log_softmax(class_scores / T)``.
    """
    _check_temperature(temperature)
    if class_scores.ndim != 2:
        raise ValueError(f"class_scores must have shape (batch, C), got {tuple(class_scores.shape)}.")
    return torch.log_softmax(_at_least_float32(class_scores) / temperature, dim=-1)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def ce_loss(
    student_label_logprobs: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy (negative log-likelihood) of the gold label under the student.

    The CE term of pattern-based fine-tuning and of context distillation: the student's
    log-probability of the gold label word, usually over the label words at T = 1.

    Args:
        student_label_logprobs: ``(batch, C)`` log-probabilities (e.g. from :func:`class_log_probs`).
        labels: ``(batch,)`` integer gold classes in ``[0, C)``.
        weight: optional ``(C,)`` class weights; example i's loss is multiplied by
            ``weight[labels[i]]``. Unlike ``torch.nn.functional.cross_entropy``, "mean" divides by the
            batch size, not by the sum of the weights: that keeps the loss a mean of per-example
            losses, so gradient accumulation over equal micro-batches stays exact.
        reduction: "mean" (default), "sum" (for unequal micro-batches / ranks: sum everywhere and
            divide once by the total count) or "none" (per-example, ``(batch,)``).

    Returns:
        A scalar (mean, sum) or ``(batch,)`` (none).
    """
    if student_label_logprobs.ndim != 2:
        raise ValueError(
            f"student_label_logprobs must have shape (batch, C), got {tuple(student_label_logprobs.shape)}."
        )
    if labels.shape != student_label_logprobs.shape[:1]:
        raise ValueError(
            f"labels must have shape (batch,) = ({student_label_logprobs.shape[0]},), "
            f"got {tuple(labels.shape)}."
        )
    logprobs = _at_least_float32(student_label_logprobs)
    labels = labels.to(device=logprobs.device, dtype=torch.long)
    per_example = -logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if weight is not None:
        per_example = per_example * weight.to(logprobs).index_select(0, labels)
    return _reduce(per_example, reduction)


def kl_loss(
    teacher_logprobs: Tensor,
    student_logprobs: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Forward KL(teacher || student), scaled by T^2.

    ``KL_i = sum_c p_t[i, c] * (log p_t[i, c] - log p_s[i, c])``. The result is multiplied by T^2
    (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531): the
    gradients of the softened KL scale as 1/T^2, and the factor keeps the KL term's weight relative
    to the CE term roughly independent of T. At T = 1 the factor is 1, so it is always applied.

    Entries where the teacher's probability is exactly 0 (a one-hot or truncated teacher) contribute
    0 (the convention 0 * log 0 = 0), even where the student's log-probability there is -inf; the
    forward and backward passes stay free of NaN. A student at -inf where the teacher's probability
    is positive gives +inf, as the KL should.

    Args:
        teacher_logprobs: ``(batch, K)`` teacher log-probabilities at temperature T, over the label
            words (K = C) or over a vocabulary (K = V). Usually without gradient.
        student_logprobs: ``(batch, K)`` student log-probabilities at the same temperature T.
        temperature: the temperature T both inputs were computed at; used only for the T^2 factor.
        reduction: "mean" (default), "sum" or "none", as in :func:`ce_loss`. "mean" at T = 1 equals
            ``F.kl_div(student, teacher, log_target=True, reduction="batchmean")``.

    Returns:
        A scalar (mean, sum) or ``(batch,)`` (none), in float32 or wider.
    """
    _check_temperature(temperature)
    if teacher_logprobs.shape != student_logprobs.shape or teacher_logprobs.ndim != 2:
        raise ValueError(
            "teacher_logprobs and student_logprobs must have the same shape (batch, K), got "
            f"{tuple(teacher_logprobs.shape)} and {tuple(student_logprobs.shape)}."
        )
    teacher = _at_least_float32(teacher_logprobs)
    student = _at_least_float32(student_logprobs).to(teacher.dtype)
    teacher_probs = teacher.exp()
    # Off the teacher's support, replace the difference by 0 *before* multiplying, so that
    # 0 * (-inf) or -inf - (-inf) never reaches the product (torch.where's backward sends zero
    # gradient to the branch it did not select).
    on_support = teacher_probs > 0
    log_ratio = torch.where(on_support, teacher - student, torch.zeros_like(teacher))
    per_example = (teacher_probs * log_ratio).sum(dim=-1) * (temperature**2)
    return _reduce(per_example, reduction)


def distillation_loss(
    student_logprobs_T: Tensor | None,
    teacher_logprobs_T: Tensor | None,
    student_label_logprobs_1: Tensor | None,
    labels: Tensor | None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> LossOutput:
    """Context-distillation loss ``alpha * KL(teacher || student) + (1 - alpha) * CE(gold, student)``.

    alpha = 0.5 is the default of arXiv 2412.13243 (out-of-domain accuracy rose with alpha, then
    fell; 0.5 was its best trade-off). alpha = 0 is pattern-based fine-tuning (CE only); alpha = 1
    is pure distillation, which needs no gold labels.

    Only the terms with a non-zero weight are computed: at alpha == 1 ``labels`` and
    ``student_label_logprobs_1`` may be None (unlabelled queries); at alpha == 0 the teacher (and
    ``student_logprobs_T``) may be None.

    Args:
        student_logprobs_T: ``(batch, K)`` student log-probabilities at temperature T, in the KL's
            space (label words, K = C, or vocabulary, K = V).
        teacher_logprobs_T: ``(batch, K)`` teacher log-probabilities at temperature T, same space.
        student_label_logprobs_1: ``(batch, C)`` student log-probabilities over the label words at
            T = 1, for the CE term (the gold label is always scored at T = 1).
        labels: ``(batch,)`` integer gold classes.
        alpha: weight of the KL term in [0, 1]; otherwise :class:`ConfigError`.
        temperature: T, for the KL's T^2 factor (see :func:`kl_loss`).
        reduction: "mean" (default), "sum" or "none", applied to both terms (see the module docstring).

    Returns:
        :class:`LossOutput` with the loss to backpropagate and the detached terms for logging
        (tensors, so that logging every step forces no device synchronisation).
    """
    _check_alpha(alpha)
    _check_temperature(temperature)
    kl: Tensor | None = None
    ce: Tensor | None = None
    if alpha > 0:
        if student_logprobs_T is None or teacher_logprobs_T is None:
            raise ValueError(
                f"alpha = {alpha} > 0 needs the teacher's and the student's log-probabilities at T "
                "(student_logprobs_T, teacher_logprobs_T); got None."
            )
        kl = kl_loss(teacher_logprobs_T, student_logprobs_T, temperature, reduction=reduction)
    if alpha < 1:
        if student_label_logprobs_1 is None or labels is None:
            raise ValueError(
                f"alpha = {alpha} < 1 needs gold labels and the student's label log-probabilities "
                "(student_label_logprobs_1, labels); got None."
            )
        ce = ce_loss(student_label_logprobs_1, labels, reduction=reduction)
    return mix_terms(kl, ce, alpha)


def mix_terms(kl: Tensor | None, ce: Tensor | None, alpha: float) -> LossOutput:
    """The one alpha mix: ``alpha * kl + (1 - alpha) * ce``, or the one term computed when the other is None.

    Exactly one term is returned as it is (no ``0 * term``, no ``1.0 *`` rounding); the terms come back
    detached for logging.
    """
    if kl is not None and ce is not None:
        loss = alpha * kl + (1.0 - alpha) * ce
    else:
        loss = kl if kl is not None else ce
    if loss is None:
        raise ValueError("mix_terms needs the KL term, the CE term or both; got neither.")
    return LossOutput(
        loss=loss,
        kl=None if kl is None else kl.detach(),
        ce=None if ce is None else ce.detach(),
    )


def topk_vocab_kl(
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    student_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Full-vocabulary KL from an offline cache of the teacher's top-k log-probabilities.

    Storing the teacher's whole vocabulary distribution for every training query costs V floats
    per query; its top k carry almost all of the mass. The choice made here: the KL is taken over
    the teacher's top-k support only, with **both** distributions renormalised over those k ids:

    - teacher: ``log_softmax(teacher_topk_logprobs / T)`` over the k entries. The cache holds
      log-probabilities at T = 1 (``log p = z - log Z``); dividing by T and renormalising over the
      k entries gives exactly the teacher's temperature-T distribution restricted to its top k, so
      one cache serves every temperature.
    - student: ``log_softmax(student_logits[ids] / T)`` over the same k ids.

    This is a proper KL between two distributions on the same support (>= 0, and 0 iff they agree
    there), and with k == V it equals the full-vocabulary KL. The trade-off: the student's mass
    outside the teacher's top k is not penalised (its tail is ignored, not pushed down). The
    alternative, using the student's un-renormalised full-vocabulary log-probabilities, also pushes
    that mass into the top k, but is not a KL between distributions and is biased by the missing
    teacher tail.

    Entries of ``teacher_topk_logprobs`` equal to -inf (padding) get probability 0 and are ignored.

    Args:
        teacher_topk_logprobs: ``(batch, k)`` the teacher's top-k full-vocabulary log-probabilities at T = 1.
        teacher_topk_ids: ``(batch, k)`` their vocabulary ids.
        student_logits: ``(batch, V)`` the student's next-token logits at the answer position.
        temperature: T > 0; the result is scaled by T^2 as in :func:`kl_loss`.
        reduction: "mean" (default), "sum" or "none".

    Returns:
        A scalar (mean, sum) or ``(batch,)`` (none), in float32.
    """
    _check_temperature(temperature)
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape or teacher_topk_ids.ndim != 2:
        raise ValueError(
            "teacher_topk_logprobs and teacher_topk_ids must have the same shape (batch, k), got "
            f"{tuple(teacher_topk_logprobs.shape)} and {tuple(teacher_topk_ids.shape)}."
        )
    if student_logits.ndim != 2 or student_logits.shape[0] != teacher_topk_ids.shape[0]:
        raise ValueError(
            f"student_logits must have shape (batch, V) with batch = {teacher_topk_ids.shape[0]}, "
            f"got {tuple(student_logits.shape)}."
        )
    teacher_T = torch.log_softmax(teacher_topk_logprobs.float() / temperature, dim=-1)
    student_on_support = student_logits.gather(
        -1, teacher_topk_ids.to(device=student_logits.device, dtype=torch.long)
    )
    student_T = torch.log_softmax(student_on_support.float() / temperature, dim=-1)
    return kl_loss(teacher_T.to(student_T.device), student_T, temperature, reduction=reduction)


def check_vocab_compatible(
    teacher_vocab_size: int,
    student_vocab_size: int,
    teacher_name: str,
    student_name: str,
    same_tokenizer: bool,
) -> None:
    """Fail early unless a full-vocabulary KL between the two models is meaningful.

    A vocabulary KL compares the teacher's and the student's probability of each token id, which
    only means something when both models share a tokenizer (id i is the same string in both) and
    produce logits of the same width. Models of one family sometimes pad their embedding matrices
    to different sizes even with one tokenizer; that is refused too rather than guessed at. The
    label-word distribution (``--kl-space label``) works across tokenizers: each side only needs
    its own ids of the label words.

    Args:
        teacher_vocab_size: width V of the teacher's logits.
        student_vocab_size: width V of the student's logits.
        teacher_name: the teacher's name, for the message.
        student_name: the student's name, for the message.
        same_tokenizer: whether the two tokenizers are the same (same vocabulary, same ids).

    Raises:
        ConfigError: if the tokenizers differ or the logit widths differ.
    """
    if not same_tokenizer:
        raise ConfigError(
            f"Full-vocabulary KL needs the teacher ({teacher_name}) and the student ({student_name}) "
            "to share a tokenizer, and theirs differ. Use --kl-space label: the label-word "
            "distribution works across tokenizers."
        )
    if teacher_vocab_size != student_vocab_size:
        raise ConfigError(
            f"Full-vocabulary KL needs logits of the same width, but the teacher ({teacher_name}) has "
            f"{teacher_vocab_size} and the student ({student_name}) has {student_vocab_size}. "
            "Use --kl-space label: the label-word distribution works across tokenizers."
        )
