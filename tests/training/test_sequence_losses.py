"""Token-level losses of answers: exact special cases, zero on identical inputs, per-sequence averaging."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from icldistill.training.sequence_losses import (
    answer_ce,
    answer_jsd,
    answer_topk_kl,
    generalized_jsd,
    per_sequence_mean,
)


def logits(seed, n=6, v=11):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 2


def kl(p_logits, q_logits):
    p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (p.exp() * (p - q)).sum(-1)


def test_jsd_ends_are_the_two_kls():
    s, t = logits(0), logits(1)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), kl(t, s))
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), kl(s, t))


@settings(max_examples=30, deadline=None)
@given(beta=st.floats(0.0, 1.0), seed=st.integers(0, 1000), temperature=st.floats(0.5, 3.0))
def test_jsd_is_zero_only_for_equal_distributions(beta, seed, temperature):
    s, t = logits(seed), logits(seed + 1)
    same = generalized_jsd(s, s.clone(), beta, temperature)
    assert same.abs().max() < 1e-5
    assert (generalized_jsd(s, t, beta, temperature) >= -1e-6).all()


def test_jsd_interior_matches_the_mixture_definition():
    s, t, beta = logits(2), logits(3), 0.3
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    m = (beta * pt + (1 - beta) * ps).log()
    expected = beta * (pt * (pt.log() - m)).sum(-1) + (1 - beta) * (ps * (ps.log() - m)).sum(-1)
    torch.testing.assert_close(generalized_jsd(s, t, beta), expected, atol=1e-5, rtol=1e-5)


def test_jsd_refuses_mismatched_vocabularies():
    with pytest.raises(ValueError, match="one tokenizer"):
        generalized_jsd(logits(0, v=11), logits(1, v=12))
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(logits(0), logits(1), beta=1.5)


def test_each_sequence_weighs_the_same():
    per_token = torch.tensor([1.0, 1.0, 1.0, 4.0])
    sequence = torch.tensor([0, 0, 0, 1])  # a 3-token answer and a 1-token answer
    torch.testing.assert_close(per_sequence_mean(per_token, sequence, 3), torch.tensor([1.0, 4.0, 0.0]))


def test_ce_of_two_sequences_is_the_mean_of_their_token_means():
    s = logits(4, n=5)
    targets = torch.tensor([1, 2, 3, 4, 5])
    sequence = torch.tensor([0, 0, 1, 1, 1])
    per_token = torch.nn.functional.cross_entropy(s, targets, reduction="none")
    expected = (per_token[:2].mean() + per_token[2:].mean()) / 2
    torch.testing.assert_close(answer_ce(s, targets, sequence, 2), expected)
    # Sum reduction over micro-batches of whole sequences equals the full batch (gradient accumulation).
    parts = answer_ce(s[:2], targets[:2], sequence[:2], 1, "sum") + answer_ce(s[2:], targets[2:], sequence[2:] - 1, 1,
                                                                             "sum")
    torch.testing.assert_close(parts / 2, expected)


def test_topk_kl_with_the_whole_vocabulary_is_the_forward_kl():
    s, t = logits(5), logits(6)
    t_logp = torch.log_softmax(t, -1)
    ids = torch.arange(t.shape[1]).expand(t.shape[0], -1)
    sequence = torch.zeros(t.shape[0], dtype=torch.long)
    torch.testing.assert_close(answer_topk_kl(t_logp, ids, s, sequence, 1), kl(t, s).mean())


def test_on_policy_loss_is_differentiable_in_the_student_only():
    s = logits(7).requires_grad_()
    t = logits(8).requires_grad_()
    loss = answer_jsd(s, t.detach(), torch.tensor([0, 0, 1, 1, 2, 2]), 3, beta=1.0)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
