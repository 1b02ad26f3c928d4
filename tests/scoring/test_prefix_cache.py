"""Cached-prefix scoring must equal naive full-prompt scoring, batched and padded, on every family."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from icldistill.errors import PromptError
from icldistill.scoring.prefix_cache import (
    PrefixCache,
    encode_prefix,
    encode_queries,
    label_token_ids,
    last_token_logits,
    pad_right,
    score_queries,
)
from tiny import make_model, make_tokenizer

DEMO = "the cat saw a dog question: a man ran Yes or No? answer: Yes\n\nthe dog slept question: the cat ran Yes or No? answer: No\n\n"
QUERIES = [
    "the doctor helped the lawyer question: the lawyer helped Yes or No? answer:",
    "a cat question: dog Yes or No? answer:",
    "the man ran quickly because he was sad and the woman was happy question: happy? answer:",
    "sad question: the artist thought that the student slept Yes or No? answer:",
    "N/A question: N/A Yes or No? answer:",
]


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def tokenizer(request):
    return make_tokenizer(bos=request.param)


@pytest.mark.parametrize("arch", ["opt", "llama", "gemma3"])
def test_cached_equals_naive(arch, tokenizer):
    model = make_model(arch, len(tokenizer))
    prefix = encode_prefix(tokenizer, DEMO * 3)  # longer than gemma3's sliding window of 8
    queries = encode_queries(tokenizer, QUERIES)
    labels = label_token_ids(tokenizer, [" Yes", " No"])
    naive = score_queries(model, prefix, queries, labels, batch_size=len(queries), use_prefix_cache=False)
    for batch_size in (1, 2, 4):
        cached = score_queries(model, prefix, queries, labels, batch_size=batch_size)
        assert torch.allclose(cached.label_logprobs, naive.label_logprobs, atol=1e-4), arch
        assert torch.equal(cached.top_token, naive.top_token)
    # The reference: each prompt alone, unpadded, through a plain forward pass.
    for i, q in enumerate(queries):
        ids = torch.tensor([prefix + q])
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)[labels]
        assert torch.allclose(naive.label_logprobs[i], ref, atol=1e-4)


@pytest.mark.parametrize("arch", ["opt", "llama", "gemma3"])
def test_prefix_changes_the_scores(arch, tokenizer):
    """Guards against a cache that is silently ignored: the demonstrations must matter."""
    model = make_model(arch, len(tokenizer))
    queries = encode_queries(tokenizer, QUERIES)
    labels = label_token_ids(tokenizer, [" Yes", " No"])
    with_demos = score_queries(model, encode_prefix(tokenizer, DEMO), queries, labels)
    without = score_queries(model, encode_prefix(tokenizer, ""), queries, labels)
    assert (with_demos.label_logprobs - without.label_logprobs).abs().max() > 1e-3


def test_empty_prefix_cached_equals_naive(tokenizer):
    model = make_model("llama", len(tokenizer))
    queries = encode_queries(tokenizer, QUERIES)
    labels = label_token_ids(tokenizer, [" Yes", " No"])
    prefix = encode_prefix(tokenizer, "")
    a = score_queries(model, prefix, queries, labels, batch_size=2)
    b = score_queries(model, prefix, queries, labels, batch_size=5, use_prefix_cache=False)
    assert torch.allclose(a.label_logprobs, b.label_logprobs, atol=1e-5)


def test_topk_matches_full_distribution():
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    prefix, queries = encode_prefix(tok, DEMO), encode_queries(tok, QUERIES)
    labels = label_token_ids(tok, [" Yes", " No"])
    scores = score_queries(model, prefix, queries, labels, topk=5)
    assert scores.topk_ids.shape == (len(queries), 5)
    assert torch.equal(scores.topk_ids[:, 0], scores.top_token)
    assert (scores.topk_logprobs[:, :-1] >= scores.topk_logprobs[:, 1:]).all()


def test_multi_token_label_word_is_an_error():
    tok = make_tokenizer()
    with pytest.raises(PromptError, match="single tokens"):
        label_token_ids(tok, [" great", " No"], "tiny")


def test_last_token_logits_is_differentiable():
    tok = make_tokenizer()
    model = make_model("llama", len(tok)).train()
    ids, lengths = pad_right(encode_queries(tok, QUERIES[:3]), 0, torch.device("cpu"))
    logits = last_token_logits(model, ids, lengths)
    logits[:, 5].sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6), batch=st.integers(1, 4))
def test_padding_never_leaks(lengths, batch):
    """Random query lengths and batch sizes: each row's score equals its unpadded, unbatched score."""
    tok = make_tokenizer()
    model = make_model("gemma3", len(tok))
    g = torch.Generator().manual_seed(sum(lengths))
    queries = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in lengths]
    prefix = encode_prefix(tok, DEMO)
    labels = [5, 6, 7]
    cached = score_queries(model, prefix, queries, labels, batch_size=batch)
    for i, q in enumerate(queries):
        alone = score_queries(model, prefix, [q], labels, batch_size=1, use_prefix_cache=False)
        assert torch.allclose(cached.label_logprobs[i], alone.label_logprobs[0], atol=1e-4)


def test_prefix_cache_copies_are_independent():
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    cache = PrefixCache(model, encode_prefix(tok, DEMO))
    first = cache.for_batch(2)
    ids, lengths = pad_right(encode_queries(tok, QUERIES[:2]), 0, torch.device("cpu"))
    last_token_logits(model, ids, lengths, first, cache.length)
    assert cache.for_batch(1).get_seq_length() == cache.length
