"""Tests for icldistill.training.losses on random tensors: identities, edge cases and gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from reference_losses import label_log_probs, vocab_log_probs

from icldistill.errors import ConfigError
from icldistill.training.losses import (
    LossOutput,
    ce_loss,
    check_vocab_compatible,
    distillation_loss,
    kl_loss,
    topk_vocab_kl,
)

# Few, derandomised examples: the file runs in seconds and gives the same result every time.
FEW = settings(max_examples=15, deadline=None, derandomize=True)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
batches = st.integers(min_value=1, max_value=6)
widths = st.integers(min_value=2, max_value=12)
temperatures = st.sampled_from([0.5, 1.0, 2.0, 3.5])


def _logprobs(generator: torch.Generator, batch: int, width: int, scale: float = 2.0) -> torch.Tensor:
    """Random (batch, width) log-probabilities."""
    logits = torch.randn(batch, width, generator=generator) * scale
    return torch.log_softmax(logits, dim=-1)


# --------------------------------------------------------------------------------------------------
# kl_loss
# --------------------------------------------------------------------------------------------------


@FEW
@given(seed=seeds, batch=batches, width=widths, temperature=temperatures)
def test_kl_zero_for_identical_and_positive_for_different(seed, batch, width, temperature):
    g = torch.Generator().manual_seed(seed)
    teacher = _logprobs(g, batch, width)
    student = _logprobs(g, batch, width)
    assert kl_loss(teacher, teacher.clone(), temperature).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(teacher, student, temperature).item() > 0
    assert (kl_loss(teacher, student, temperature, reduction="none") > 0).all()


@FEW
@given(seed=seeds, batch=batches, width=widths)
def test_kl_matches_torch_kl_div_batchmean(seed, batch, width):
    g = torch.Generator().manual_seed(seed)
    teacher = _logprobs(g, batch, width)
    student = _logprobs(g, batch, width)
    expected = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    torch.testing.assert_close(kl_loss(teacher, student), expected)


@FEW
@given(seed=seeds, batch=batches, width=widths, temperature=temperatures)
def test_kl_scales_by_temperature_squared(seed, batch, width, temperature):
    g = torch.Generator().manual_seed(seed)
    teacher = _logprobs(g, batch, width)
    student = _logprobs(g, batch, width)
    torch.testing.assert_close(
        kl_loss(teacher, student, temperature), temperature**2 * kl_loss(teacher, student, 1.0)
    )


@FEW
@given(seed=seeds, batch=batches, width=widths)
def test_kl_reductions_agree(seed, batch, width):
    g = torch.Generator().manual_seed(seed)
    teacher = _logprobs(g, batch, width)
    student = _logprobs(g, batch, width)
    per_example = kl_loss(teacher, student, reduction="none")
    assert per_example.shape == (batch,)
    torch.testing.assert_close(kl_loss(teacher, student, reduction="sum"), per_example.sum())
    torch.testing.assert_close(kl_loss(teacher, student, reduction="mean"), per_example.mean())


@FEW
@given(seed=seeds, batch=batches, width=widths)
def test_kl_with_one_hot_teacher_equals_ce(seed, batch, width):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, width, (batch,), generator=g)
    teacher = torch.log(F.one_hot(labels, width).float())  # exact zeros -> -inf log-probs
    student = _logprobs(g, batch, width).requires_grad_(True)
    kl = kl_loss(teacher, student)
    assert torch.isfinite(kl)
    torch.testing.assert_close(kl, ce_loss(student, labels))
    kl.backward()
    assert torch.isfinite(student.grad).all()


def test_kl_student_minus_inf_off_teacher_support_is_finite_without_nan_gradient():
    teacher = torch.log(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    student_logits = torch.tensor([[0.3, -1.0, 0.2], [1.0, 0.0, 2.0]], requires_grad=True)
    mask = torch.tensor([[False, True, False], [False, False, True]])  # where the teacher is 0
    student = torch.log_softmax(student_logits.masked_fill(mask, float("-inf")), dim=-1)
    assert torch.isinf(student).any()
    kl = kl_loss(teacher, student)
    assert torch.isfinite(kl)
    kl.backward()
    assert torch.isfinite(student_logits.grad).all()


def test_kl_is_infinite_where_teacher_has_mass_and_student_has_none():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[1.0, 0.0]]))
    assert math.isinf(kl_loss(teacher, student).item())


def test_kl_upcasts_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    teacher = _logprobs(g, 4, 5).bfloat16()
    student = _logprobs(g, 4, 5).bfloat16()
    out = kl_loss(teacher, student)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, kl_loss(teacher.float(), student.float()))


def test_shape_mismatch_and_bad_reduction_raise():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="same shape"):
        kl_loss(_logprobs(g, 2, 3), _logprobs(g, 2, 4))
    with pytest.raises(ValueError, match="reduction"):
        kl_loss(_logprobs(g, 2, 3), _logprobs(g, 2, 3), reduction="batchmean")
    with pytest.raises(ValueError, match="labels"):
        ce_loss(_logprobs(g, 2, 3), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------------------------------
# ce_loss
# --------------------------------------------------------------------------------------------------


@FEW
@given(seed=seeds, batch=batches, width=widths)
def test_ce_matches_torch_nll_and_weights_scale_per_example(seed, batch, width):
    g = torch.Generator().manual_seed(seed)
    logprobs = _logprobs(g, batch, width)
    labels = torch.randint(0, width, (batch,), generator=g)
    torch.testing.assert_close(ce_loss(logprobs, labels), F.nll_loss(logprobs, labels))
    torch.testing.assert_close(
        ce_loss(logprobs, labels, reduction="sum"), F.nll_loss(logprobs, labels, reduction="sum")
    )
    weight = torch.rand(width, generator=g) + 0.5
    per_example = F.nll_loss(logprobs, labels, reduction="none") * weight[labels]
    # Mean over the batch (not divided by the sum of the weights): accumulation stays exact.
    torch.testing.assert_close(ce_loss(logprobs, labels, weight), per_example.mean())


# --------------------------------------------------------------------------------------------------
# distillation_loss
# --------------------------------------------------------------------------------------------------


def _distillation_inputs(seed: int, batch: int, width: int):
    g = torch.Generator().manual_seed(seed)
    student_T = _logprobs(g, batch, width)
    teacher_T = _logprobs(g, batch, width)
    student_1 = _logprobs(g, batch, width)
    labels = torch.randint(0, width, (batch,), generator=g)
    return student_T, teacher_T, student_1, labels


@FEW
@given(seed=seeds, batch=batches, width=widths, temperature=temperatures)
def test_distillation_endpoints_are_ce_and_kl(seed, batch, width, temperature):
    student_T, teacher_T, student_1, labels = _distillation_inputs(seed, batch, width)
    kl = kl_loss(teacher_T, student_T, temperature)
    ce = ce_loss(student_1, labels)

    at_zero = distillation_loss(None, None, student_1, labels, alpha=0.0, temperature=temperature)
    assert isinstance(at_zero, LossOutput)
    assert torch.equal(at_zero.loss, ce) and at_zero.kl is None
    torch.testing.assert_close(at_zero.ce, ce)

    at_one = distillation_loss(student_T, teacher_T, None, None, alpha=1.0, temperature=temperature)
    assert torch.equal(at_one.loss, kl) and at_one.ce is None
    torch.testing.assert_close(at_one.kl, kl)


@FEW
@given(
    seed=seeds,
    batch=batches,
    width=widths,
    temperature=temperatures,
    alpha=st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
)
def test_distillation_is_linear_in_alpha(seed, batch, width, temperature, alpha):
    student_T, teacher_T, student_1, labels = _distillation_inputs(seed, batch, width)
    kl = kl_loss(teacher_T, student_T, temperature)
    ce = ce_loss(student_1, labels)
    out = distillation_loss(student_T, teacher_T, student_1, labels, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(out.loss, alpha * kl + (1 - alpha) * ce)


def test_distillation_terms_are_detached():
    student_T, teacher_T, student_1, labels = _distillation_inputs(0, 4, 3)
    student_T.requires_grad_(True)
    student_1.requires_grad_(True)
    out = distillation_loss(student_T, teacher_T, student_1, labels, alpha=0.5)
    assert out.loss.requires_grad
    assert not out.kl.requires_grad and not out.ce.requires_grad


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_invalid_alpha_raises_config_error(alpha):
    student_T, teacher_T, student_1, labels = _distillation_inputs(0, 2, 3)
    with pytest.raises(ConfigError, match="alpha"):
        distillation_loss(student_T, teacher_T, student_1, labels, alpha=alpha)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_invalid_temperature_raises_config_error(temperature):
    with pytest.raises(ConfigError, match="temperature"):
        label_log_probs(torch.zeros(2, 5), torch.tensor([1, 3]), temperature)


def test_missing_inputs_for_a_weighted_term_raise():
    student_T, teacher_T, student_1, labels = _distillation_inputs(0, 2, 3)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(student_T, teacher_T, student_1, None, alpha=0.5)
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(student_T, None, student_1, labels, alpha=0.5)


# --------------------------------------------------------------------------------------------------
# Gradient accumulation: batch 8 == 2 micro-batches of 4 (and sum over unequal micro-batches)
# --------------------------------------------------------------------------------------------------

LABEL_IDS = torch.tensor([3, 7])


def _loss_fn(kind: str, model: torch.nn.Module, x, teacher_logits, labels, reduction="mean"):
    logits = model(x)
    temperature = 2.0
    student_1 = label_log_probs(logits, LABEL_IDS)
    student_T = label_log_probs(logits, LABEL_IDS, temperature)
    teacher_T = label_log_probs(teacher_logits, LABEL_IDS, temperature)
    if kind == "ce":
        return ce_loss(student_1, labels, reduction=reduction)
    if kind == "kl":
        return kl_loss(teacher_T, student_T, temperature, reduction=reduction)
    if kind == "vocab_kl":
        return kl_loss(
            vocab_log_probs(teacher_logits, temperature),
            vocab_log_probs(logits, temperature),
            temperature,
            reduction=reduction,
        )
    return distillation_loss(
        student_T, teacher_T, student_1, labels, alpha=0.3, temperature=temperature, reduction=reduction
    ).loss


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["ce", "kl", "vocab_kl", "mix"])
def test_gradient_accumulation_matches_full_batch(kind):
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(6, 10)
    x = torch.randn(8, 6, generator=g)
    teacher_logits = torch.randn(8, 10, generator=g) * 2
    labels = torch.randint(0, 2, (8,), generator=g)

    model.zero_grad()
    _loss_fn(kind, model, x, teacher_logits, labels).backward()
    full = _grads(model)

    model.zero_grad()
    for chunk in (slice(0, 4), slice(4, 8)):
        (_loss_fn(kind, model, x[chunk], teacher_logits[chunk], labels[chunk]) / 2).backward()
    accumulated = _grads(model)

    for a, b in zip(full, accumulated):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)

    # Unequal micro-batches (3 + 5): sum everywhere, divide once by the total count.
    model.zero_grad()
    for chunk in (slice(0, 3), slice(3, 8)):
        (_loss_fn(kind, model, x[chunk], teacher_logits[chunk], labels[chunk], "sum") / 8).backward()
    for a, b in zip(full, _grads(model)):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# label_log_probs / vocab_log_probs
# --------------------------------------------------------------------------------------------------


@FEW
@given(seed=seeds, batch=batches, temperature=temperatures, n_labels=st.integers(2, 5))
def test_label_log_probs_bf16_is_float32_and_close_to_fp32(seed, batch, temperature, n_labels):
    g = torch.Generator().manual_seed(seed)
    vocab = 50
    logits = torch.randn(batch, vocab, generator=g) * 3
    ids = torch.randperm(vocab, generator=g)[:n_labels]
    out = label_log_probs(logits.bfloat16(), ids, temperature)
    assert out.dtype == torch.float32 and out.shape == (batch, n_labels)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(batch))
    # Close to the fp32 computation on the original logits (in probability space: bf16 rounds the
    # input logits themselves by up to ~1e-2, which 1/T amplifies in log space)...
    reference = label_log_probs(logits, ids, temperature)
    torch.testing.assert_close(out.exp(), reference.exp(), atol=1e-2, rtol=0)
    # ...and equal to it on the bf16-rounded logits: the arithmetic itself ran in float32.
    expected = torch.log_softmax(logits.bfloat16().float()[:, ids] / temperature, dim=-1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_label_log_probs_restricts_to_label_words_in_class_order():
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0]])
    out = label_log_probs(logits, torch.tensor([2, 0]))
    expected = torch.log_softmax(torch.tensor([[1.0, 0.0]]), dim=-1)
    torch.testing.assert_close(out, expected)


@FEW
@given(seed=seeds, batch=batches, width=widths, temperature=temperatures)
def test_vocab_log_probs_is_float32_log_softmax_at_temperature(seed, batch, width, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, width, generator=g)
    out = vocab_log_probs(logits.bfloat16(), temperature)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(batch))
    torch.testing.assert_close(out, torch.log_softmax(logits.bfloat16().float() / temperature, -1))


# --------------------------------------------------------------------------------------------------
# topk_vocab_kl / check_vocab_compatible
# --------------------------------------------------------------------------------------------------


@FEW
@given(seed=seeds, batch=batches, vocab=widths, temperature=temperatures)
def test_topk_vocab_kl_with_k_equal_vocab_is_full_kl(seed, batch, vocab, temperature):
    g = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(batch, vocab, generator=g) * 2
    student_logits = torch.randn(batch, vocab, generator=g) * 2
    # The cache stores the teacher's top-k log-probabilities at T = 1, sorted, with their ids.
    topk_logprobs, topk_ids = vocab_log_probs(teacher_logits).topk(vocab, dim=-1)
    expected = kl_loss(
        vocab_log_probs(teacher_logits, temperature), vocab_log_probs(student_logits, temperature), temperature
    )
    torch.testing.assert_close(topk_vocab_kl(topk_logprobs, topk_ids, student_logits, temperature), expected)


def test_topk_vocab_kl_renormalises_over_the_teacher_support():
    g = torch.Generator().manual_seed(3)
    teacher_logits = torch.randn(4, 20, generator=g)
    topk_logprobs, topk_ids = vocab_log_probs(teacher_logits).topk(5, dim=-1)
    # A student that agrees with the teacher on the top 5 (up to a shift) and differs elsewhere.
    student_logits = torch.full((4, 20), -3.0).scatter(-1, topk_ids, teacher_logits.gather(-1, topk_ids) + 1.0)
    assert topk_vocab_kl(topk_logprobs, topk_ids, student_logits).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(4, 20, generator=g)
    assert topk_vocab_kl(topk_logprobs, topk_ids, other).item() > 0


def test_check_vocab_compatible():
    check_vocab_compatible(50272, 50272, "facebook/opt-1.3b", "facebook/opt-125m", same_tokenizer=True)
    with pytest.raises(ConfigError) as info:
        check_vocab_compatible(50272, 49152, "facebook/opt-1.3b", "HuggingFaceTB/SmolLM2-135M", False)
    message = str(info.value)
    assert "facebook/opt-1.3b" in message and "HuggingFaceTB/SmolLM2-135M" in message
    assert "--kl-space label" in message
    with pytest.raises(ConfigError, match="teacher-x.*student-y"):
        check_vocab_compatible(50304, 50432, "teacher-x", "student-y", same_tokenizer=True)
