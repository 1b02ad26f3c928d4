"""Answer-token logits of padded (prompt, answer) rows equal those of each row alone, with and without a prefix."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tiny import make_model

from icldistill.errors import ConfigError
from icldistill.scoring.generation import prefix_for_rows
from icldistill.scoring.prefix_cache import PrefixCache
from icldistill.training.sequence import AnswerHidden, answer_batch, answer_logits, answer_scores
from icldistill.training.sequence_losses import answer_ce, answer_jsd, answer_topk_kl

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
ANSWERS = [[20, 21], [22, 23, 24, 25], [26]]


def alone(model, prompt, answer):
    """Logits predicting each answer token from the unpadded row, one forward pass."""
    ids = torch.tensor([list(prompt) + list(answer)])
    logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1:len(prompt) + len(answer) - 1]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_padded_rows_equal_each_row_alone(arch):
    model = make_model(arch, 64)
    batch = answer_batch(PROMPTS, ANSWERS, pad_id=0)
    got = answer_logits(model, batch)
    expected = torch.cat([alone(model, p, a) for p, a in zip(PROMPTS, ANSWERS)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert batch.targets.tolist() == [t for a in ANSWERS for t in a]
    assert batch.sequence.tolist() == [i for i, a in enumerate(ANSWERS) for _ in a]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_rows_after_a_cached_prefix_equal_the_whole_rows(arch):
    model = make_model(arch, 64, seed=1)
    prefix = [30, 31, 32, 33, 34]
    cache = PrefixCache(model, prefix)
    batch = answer_batch(PROMPTS, ANSWERS, pad_id=0, past=len(prefix))
    got = answer_logits(model, batch, prefix_for_rows(cache, batch.n))
    expected = torch.cat([alone(model, prefix + p, a) for p, a in zip(PROMPTS, ANSWERS)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_model():
    model = make_model("llama", 64).train()
    batch = answer_batch(PROMPTS, ANSWERS, pad_id=0)
    answer_logits(model, batch).logsumexp(-1).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=6))
def test_layout_keeps_prompt_tokens_out_of_the_targets(shapes):
    prompts = [[1] * p for p, _ in shapes]
    answers = [[2] * a for _, a in shapes]
    batch = answer_batch(prompts, answers, pad_id=0, past=3)
    assert batch.n_tokens == sum(a for _, a in shapes) and set(batch.targets.tolist()) == {2}
    assert batch.attention_mask.sum().item() == 3 * len(shapes) + sum(p + a for p, a in shapes)
    assert batch.keep.numel() == batch.answer_mask.shape[1]


def test_bad_rows_are_refused():
    with pytest.raises(ConfigError, match="as many answers"):
        answer_batch([[1]], [], pad_id=0)
    with pytest.raises(ConfigError, match="at least one token"):
        answer_batch([[1]], [[]], pad_id=0)


LOSSES = {  # each signal's loss of (student, batch, teacher logits at the answer tokens), summed over sequences
    "ce": lambda s, b, t: answer_ce(s, b.targets, b.sequence, b.n, "sum"),
    "topk-kl": lambda s, b, t: answer_topk_kl(*t.log_softmax(-1).topk(5), s, b.sequence, b.n, 2.0, "sum"),
    "jsd": lambda s, b, t: answer_jsd(s, t, b.sequence, b.n, 0.5, 2.0, "sum"),
}


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_losses_and_gradients_equal_those_of_the_whole_logits(arch, loss, chunk):
    model = make_model(arch, 64)  # eval mode: no dropout; gradients still flow
    params = [p for p in model.parameters() if p.requires_grad]
    batch = answer_batch(PROMPTS, ANSWERS, pad_id=0)
    teacher = torch.randn(batch.n_tokens, 64, generator=torch.Generator().manual_seed(1))
    whole = LOSSES[loss](answer_logits(model, batch), batch, teacher)
    scores = answer_scores(model, batch)
    assert isinstance(scores, AnswerHidden)
    chunked = LOSSES[loss](dataclasses.replace(scores, chunk=chunk), batch, teacher)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    for got, expected in zip(torch.autograd.grad(chunked, params), torch.autograd.grad(whole, params)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the dev loss: no recompute, the same value
        torch.testing.assert_close(LOSSES[loss](dataclasses.replace(answer_scores(model, batch), chunk=chunk),
                                                batch, teacher), whole.detach(), atol=1e-5, rtol=1e-5)


def test_no_more_than_a_chunk_of_logits_exists_at_once():
    """The forward keeps one column of logits a row; the loss and its backward then run the head a chunk at a time.
    (A model's first batch also runs its first row whole, once, to check that the head's output is the logits.)"""
    model = make_model("llama", 64)
    batch = answer_batch(PROMPTS, ANSWERS, pad_id=0)
    rows_per_call = []
    model.lm_head.register_forward_hook(lambda m, a, out: rows_per_call.append(out.shape[:-1].numel()))
    scores = dataclasses.replace(answer_scores(model, batch), chunk=2)
    answer_ce(scores, batch.targets, batch.sequence, batch.n, "sum").backward()
    chunks = math.ceil(batch.n_tokens / 2)
    each = [2] * (chunks - 1) + [batch.n_tokens - 2 * (chunks - 1)]
    probe = len(PROMPTS[0]) + len(ANSWERS[0])  # once per head: is its output the model's logits?
    assert rows_per_call[:2 + chunks] == [probe, batch.n, *each]  # then the forward, then the loss's chunks
    assert sorted(rows_per_call[2 + chunks:]) == sorted(each)  # each recomputed once in the backward
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_a_model_that_transforms_its_logits_after_the_head_is_scored_through_the_whole_logits():
    """Gemma 2's soft-cap (tanh after the head): the head alone is not the logits, and the check sees it."""
    model = make_model("gemma3", 64)
    model.config.final_logit_softcapping = 3.0
    batch = answer_batch(PROMPTS, ANSWERS, pad_id=0)
    for _ in range(2):  # found once, remembered
        scores = answer_scores(model, batch)
        assert isinstance(scores, torch.Tensor)
        torch.testing.assert_close(scores, answer_logits(model, batch))
        assert scores.abs().max() <= 3.0
    prefix = [30, 31, 32, 33]  # after a context's cache (the on-policy teacher): the rows' cache is used once
    context, after = PrefixCache(model, prefix), answer_batch(PROMPTS, ANSWERS, pad_id=0, past=len(prefix))
    torch.testing.assert_close(answer_scores(model, after, prefix_for_rows(context, after.n)),
                               answer_logits(model, after, prefix_for_rows(context, after.n)))


def test_under_mixed_precision_each_chunk_computes_what_the_forward_would():
    """accelerate's bf16 mixed precision wraps the model's forward only in autocast (``Accelerator.prepare`` sets
    ``model.forward`` so; an Accelerator here would fix the process's precision for the other tests): the chunks
    replay the autocast the head ran under."""
    model = make_model("llama", 64)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    batch = answer_batch(PROMPTS, ANSWERS, pad_id=0)
    scores = answer_scores(model, batch)
    assert isinstance(scores, AnswerHidden) and scores.autocast == ("cpu", torch.bfloat16, True)
    whole = answer_logits(model, batch).float()  # bf16 logits
    chunked = dataclasses.replace(scores, chunk=2).per_token(lambda logits: logits.max(-1).values)
    assert torch.equal(chunked, whole.max(-1).values)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_on_policy_jsd_with_a_chunked_teacher_equals_the_whole_logits(beta):
    """The on-policy teacher (frozen, after its context's cache) hands the loss its hidden states; each chunk of its
    logits is computed beside the student's: the same loss and student gradients, none reaching the teacher."""
    student, teacher = make_model("llama", 64), make_model("opt", 64, seed=3)
    prefix = [30, 31, 32]
    teacher_batch = answer_batch(PROMPTS, ANSWERS, pad_id=0, past=len(prefix))
    context = PrefixCache(teacher, prefix)
    with torch.no_grad():  # a forward extends the rows' cache: each gets its own
        teacher_whole = answer_logits(teacher, teacher_batch, prefix_for_rows(context, teacher_batch.n))
        teacher_chunked = dataclasses.replace(
            answer_scores(teacher, teacher_batch, prefix_for_rows(context, teacher_batch.n)), chunk=2)
    assert isinstance(teacher_chunked, AnswerHidden)
    batch = answer_batch(PROMPTS, ANSWERS, pad_id=0)
    params = [p for p in student.parameters() if p.requires_grad]
    whole = answer_jsd(answer_logits(student, batch), teacher_whole, batch.sequence, batch.n, beta, 1.5, "sum")
    chunked = answer_jsd(dataclasses.replace(answer_scores(student, batch), chunk=3), teacher_chunked,
                         batch.sequence, batch.n, beta, 1.5, "sum")
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    for got, expected in zip(torch.autograd.grad(chunked, params), torch.autograd.grad(whole, params)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in teacher.parameters())
