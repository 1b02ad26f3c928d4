"""Answer-token logits of padded (prompt, answer) rows equal those of each row alone, with and without a prefix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tiny import make_model

from icldistill.errors import ConfigError
from icldistill.scoring.generation import prefix_for_rows
from icldistill.scoring.prefix_cache import PrefixCache
from icldistill.training.sequence import answer_batch, answer_logits

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
