"""Packed shared-prefix scoring must equal naive whole-prompt scoring, on every family, for words of any length."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tiny import make_merging_tokenizer, make_model, make_tokenizer
from tokenizers import normalizers, processors

from icldistill.errors import PromptError
from icldistill.scoring import prefix_cache as pc
from icldistill.scoring.encoding import (
    common_prefix_length,
    encode_text,
    label_word_tokens,
    start_tokens,
    tokenize_prompts,
)
from icldistill.scoring.prefix_cache import (
    PrefixCache,
    label_token_ids,
    last_token_logits,
    pad_right,
    rows_forward,
    score_queries,
    unsupported_cache_layers,
)

DEMO = ("the cat saw a dog question: a man ran Yes or No? answer: Yes\n\n"
        "the dog slept question: the cat ran Yes or No? answer: No\n\n")
QUERIES = [
    "the doctor helped the lawyer question: the lawyer helped Yes or No? answer:",
    "a cat question: dog Yes or No? answer:",
    "the man ran quickly because he was sad and the woman was happy question: happy? answer:",
    "sad question: the artist thought that the student slept Yes or No? answer: ",  # trailing space: lm-eval moves it
    "N/A question: N/A Yes or No? answer:",
    # Starts with a space: after the blank line its whole-prompt tokens at the boundary differ from the others'.
    " question: N/A? answer:",
]
SINGLE = [" Yes", " No"]
MULTI = [" great", " terrible review", " Yes"]  # several tokens each, of different lengths, and one single token


def encode_prefix(tokenizer, text: str) -> list[int]:
    """Token ids of a text that starts a prompt: the tokenizer's start tokens (e.g. BOS), then the text."""
    return encode_text(tokenizer, text)


def encode_queries(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text alone, without special tokens (to follow a prefix or a start token)."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


@pytest.fixture(scope="module", params=["no-bos", "bos", "merging"])
def tokenizer(request):
    """Without and with BOS, and one whose blank-line token makes boundary tokens differ between queries."""
    return make_merging_tokenizer() if request.param == "merging" else make_tokenizer(bos=request.param == "bos")


def reference(model, prompt: list[int], continuation: list[int]) -> float:
    """log p(continuation | prompt) from one plain, unpadded, uncached forward pass."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([prompt + continuation])).logits[0].float(), -1)
    return sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(continuation))


@pytest.mark.parametrize("words", [SINGLE, MULTI], ids=["single-token", "multi-token"])
@pytest.mark.parametrize("arch", ["opt", "llama", "gemma3"])
def test_cached_equals_naive_and_plain_transformers(arch, words, tokenizer):
    model = make_model(arch, len(tokenizer))
    tokens = tokenize_prompts(tokenizer, DEMO * 3, QUERIES, words)  # longer than gemma3's sliding window of 8
    assert PrefixCache(model, tokens.prefix_ids).unsupported is None  # the packed path, not the fallback
    naive = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations, batch_size=2,
                          use_prefix_cache=False)
    for batch_size in (1, 4, len(QUERIES)):
        cached = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations, batch_size=batch_size)
        assert torch.allclose(cached.label_logprobs, naive.label_logprobs, atol=1e-4), (arch, batch_size)
        assert torch.equal(cached.top_token, naive.top_token)
    assert naive.multi_token == any(len(c) > 1 for row in tokens.continuations for c in row)
    for i, query in enumerate(tokens.query_ids):
        for c, cont in enumerate(tokens.continuations[i]):
            assert naive.label_logprobs[i, c].item() == pytest.approx(reference(model, tokens.prefix_ids + query, cont),
                                                                       abs=1e-4)


def test_prompts_are_tokenized_whole_and_boundary_tokens_differ():
    tokenizer = make_merging_tokenizer()
    tokens = tokenize_prompts(tokenizer, DEMO, QUERIES, SINGLE)
    prompts = [tokens.prefix_ids + q for q in tokens.query_ids]
    for text, prompt in zip(QUERIES, prompts):
        assert prompt == encode_text(tokenizer, (DEMO + text).rstrip(" "))
    # Tokenizing the demonstrations apart gives other tokens at the boundary than the whole prompts do...
    alone = encode_text(tokenizer, DEMO)
    assert any(p[: len(alone)] != alone for p in prompts)
    # ...and the boundary token after the shared prefix is not the same for every query.
    assert len({p[len(tokens.prefix_ids)] for p in prompts}) > 1
    assert len(tokens.prefix_ids) == common_prefix_length(prompts) and len(tokens.prefix_ids) > len(alone) - 4


def test_continuations_follow_lm_eval_split(tokenizer):
    """A word's tokens are those of context + word after the context's tokens; a trailing space moves to the word."""
    tokens = tokenize_prompts(tokenizer, DEMO, QUERIES, MULTI)
    for text, query, conts in zip(QUERIES, tokens.query_ids, tokens.continuations):
        context = (DEMO + text).rstrip(" ")
        moved = (DEMO + text)[len(context):]
        for word, cont in zip(MULTI, conts):
            whole = encode_text(tokenizer, context + moved + word)
            assert tokens.prefix_ids + query + cont == whole


def test_mean_is_the_length_normalised_sum():
    tok = make_tokenizer()
    model = make_model("gemma3", len(tok))
    tokens = tokenize_prompts(tok, DEMO, QUERIES, MULTI)
    total = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations)
    mean = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations, label_score="mean")
    lengths = torch.tensor([[len(c) for c in row] for row in tokens.continuations], dtype=torch.float32)
    assert lengths.max() > 1
    assert torch.allclose(mean.label_logprobs, total.label_logprobs / lengths, atol=1e-5)


@pytest.mark.parametrize("arch", ["opt", "llama", "gemma3"])
def test_prefix_changes_the_scores(arch, tokenizer):
    """Guards against a cache that is silently ignored: the demonstrations must matter."""
    model = make_model(arch, len(tokenizer))
    with_demos = tokenize_prompts(tokenizer, DEMO, QUERIES, SINGLE)
    without = tokenize_prompts(tokenizer, "", QUERIES, SINGLE)
    a = score_queries(model, with_demos.prefix_ids, with_demos.query_ids, with_demos.continuations)
    b = score_queries(model, without.prefix_ids, without.query_ids, without.continuations)
    assert (a.label_logprobs - b.label_logprobs).abs().max() > 1e-3


def test_a_longer_cache_is_shortened_exactly():
    """A cache of the demonstrations tokenized alone serves whole prompts: it is cut to the tokens they share."""
    tok = make_tokenizer()
    model = make_model("gemma3", len(tok))
    tokens = tokenize_prompts(tok, DEMO * 2, QUERIES, MULTI)
    cache = PrefixCache(model, encode_text(tok, DEMO * 2) + [5, 6, 7])
    cached = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations, prefix_cache=cache)
    naive = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations, use_prefix_cache=False)
    assert cache.length <= len(tokens.prefix_ids) and cache.tokens == tokens.prefix_ids[: cache.length]
    assert torch.allclose(cached.label_logprobs, naive.label_logprobs, atol=1e-4)
    # A prefix longer than the cache: the rest of it is scored with each query.
    short = PrefixCache(model, tokens.prefix_ids[:10])
    again = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations, prefix_cache=short)
    assert torch.allclose(again.label_logprobs, naive.label_logprobs, atol=1e-4)


def test_empty_prefix_cached_equals_naive(tokenizer):
    model = make_model("opt", len(tokenizer))
    tokens = tokenize_prompts(tokenizer, "", QUERIES, MULTI)
    a = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations, batch_size=2)
    b = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations, batch_size=5,
                      use_prefix_cache=False)
    assert torch.allclose(a.label_logprobs, b.label_logprobs, atol=1e-4)


def test_topk_matches_full_distribution():
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    prefix, queries = encode_prefix(tok, DEMO), encode_queries(tok, QUERIES)
    labels = label_token_ids(tok, SINGLE)
    scores = score_queries(model, prefix, queries, labels, topk=5)
    assert scores.topk_ids.shape == (len(queries), 5)
    assert torch.equal(scores.topk_ids[:, 0], scores.top_token)
    assert (scores.topk_logprobs[:, :-1] >= scores.topk_logprobs[:, 1:]).all()
    # One token per class: the class score is the next-token log-probability of the word.
    assert torch.allclose(scores.label_logprobs, scores.topk_logprobs.new_tensor(
        [[score_queries(model, prefix, [q], labels).label_logprobs[0, c].item() for c in range(2)] for q in queries]),
        atol=1e-5)


def test_label_words_of_several_tokens_are_accepted_and_bad_words_fail():
    tok = make_tokenizer()
    expected = [len(tok(w, add_special_tokens=False)["input_ids"]) for w in MULTI]
    assert [len(t) for t in label_word_tokens(tok, MULTI)] == expected
    with pytest.raises(PromptError, match="single tokens"):  # the one-position helper still says so
        label_token_ids(tok, [" great", " No"], "tiny")
    with pytest.raises(PromptError, match="non-empty"):
        label_word_tokens(tok, [" Yes", " "])
    with pytest.raises(PromptError, match="distinct"):
        label_word_tokens(tok, [" Yes", " Yes"])
    lower = make_tokenizer()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(PromptError, match="tokenize identically"):
        label_word_tokens(lower, [" yes", " YES"], "tiny")


def test_a_tokenizer_that_appends_eos_puts_no_eos_in_the_prompt():
    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    assert tok("a b")["input_ids"][-1] == tok.eos_token_id  # the tokenizer does append it
    assert start_tokens(tok) == [tok.bos_token_id]
    tokens = tokenize_prompts(tok, DEMO, QUERIES, MULTI)
    for query, conts in zip(tokens.query_ids, tokens.continuations):
        row = tokens.prefix_ids + query + [t for c in conts for t in c]
        assert tok.eos_token_id not in row and row[0] == tok.bos_token_id


def test_last_token_logits_is_differentiable():
    tok = make_tokenizer()
    model = make_model("llama", len(tok)).train()
    ids, lengths = pad_right(encode_queries(tok, QUERIES[:3]), 0, torch.device("cpu"))
    logits = last_token_logits(model, ids, lengths)
    logits[:, 5].sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_rows_forward_is_differentiable_and_matches_the_packed_pass():
    tok = make_tokenizer()
    model = make_model("opt", len(tok))  # eval mode (no dropout), gradients on
    tokens = tokenize_prompts(tok, "", QUERIES[:3], MULTI)
    prompts = [tokens.prefix_ids + q for q in tokens.query_ids]
    _, scores = rows_forward(model, prompts, tokens.continuations)
    scores[:, 1].sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    packed = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations)
    assert torch.allclose(scores.detach(), packed.label_logprobs, atol=1e-4)


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
       words=st.lists(st.integers(1, 4), min_size=2, max_size=3),
       batch=st.integers(1, 4))
def test_padding_and_packing_never_leak(lengths, words, batch):
    """Random query and word lengths and batch sizes: each prompt's scores equal its own, unbatched, naive ones."""
    tok = make_tokenizer()
    model = make_model("gemma3", len(tok))
    g = torch.Generator().manual_seed(sum(lengths) + 7 * sum(words))
    queries = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in lengths]
    conts = [[torch.randint(3, len(tok), (m,), generator=g).tolist() for m in words] for _ in queries]
    prefix = encode_prefix(tok, DEMO)
    cached = score_queries(model, prefix, queries, conts, batch_size=batch)
    for i, q in enumerate(queries):
        alone = score_queries(model, prefix, [q], [conts[i]], batch_size=1, use_prefix_cache=False)
        assert torch.allclose(cached.label_logprobs[i], alone.label_logprobs[0], atol=1e-4)


def test_prefix_cache_is_never_modified_by_a_pass():
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    cache = PrefixCache(model, encode_prefix(tok, DEMO))
    keys = [layer.keys.clone() for layer in cache._cache.layers]
    score_queries(model, cache.tokens, encode_queries(tok, QUERIES[:2]), label_token_ids(tok, SINGLE),
                  prefix_cache=cache)
    assert cache.for_pass().get_seq_length() == cache.length
    assert all(torch.equal(k, layer.keys) for k, layer in zip(keys, cache._cache.layers))


def test_unsupported_cache_layers_are_detected():
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    assert unsupported_cache_layers(cache, 1) is None
    cache.layers.append(DynamicSlidingWindowLayer(sliding_window=4))
    assert "DynamicSlidingWindowLayer" in unsupported_cache_layers(cache)
    assert "not a DynamicCache" in unsupported_cache_layers(object())


def test_hybrid_family_falls_back_to_naive_with_one_warning(caplog):
    """LFM2 mixes convolution layers (state updated in place) with attention: no shared prefix, same numbers."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = Lfm2ForCausalLM(Lfm2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       layer_types=["conv", "full_attention"])).eval()
    tokens = tokenize_prompts(tok, DEMO, QUERIES[:3], MULTI)
    pc._warned.clear()
    with caplog.at_level(logging.WARNING, logger="icldistill.scoring.prefix_cache"):
        first = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations)
        score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations)
    warnings = [r for r in caplog.records if "shared-prefix scoring is not available" in r.getMessage()]
    assert len(warnings) == 1 and "lfm2" in warnings[0].getMessage()
    for i, query in enumerate(tokens.query_ids):
        for c, cont in enumerate(tokens.continuations[i]):
            assert first.label_logprobs[i, c].item() == pytest.approx(reference(model, tokens.prefix_ids + query, cont),
                                                                       abs=1e-4)


def _more_families(name: str, vocab_size: int):
    """Tiny models of the other families in ``PACKED_FAMILIES`` (and Mistral, which is not among them)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = {
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=8,
                                                            max_window_layers=1)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=8)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**common, head_dim=8)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8, sliding_window=8)),  # eager
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=8)),
    }
    torch.manual_seed(0)
    return configs[name]().eval()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma", "gemma2", "phi3", "mistral"])
def test_other_families_packed_or_fallback_equal_naive(family):
    tok = make_merging_tokenizer()
    model = _more_families(family, len(tok))
    tokens = tokenize_prompts(tok, DEMO * 3, QUERIES, MULTI)
    assert (PrefixCache(model, tokens.prefix_ids).unsupported is None) == (family != "mistral")
    naive = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations, use_prefix_cache=False)
    cached = score_queries(model, tokens.prefix_ids, tokens.query_ids, tokens.continuations, batch_size=4)
    assert torch.allclose(cached.label_logprobs, naive.label_logprobs, atol=1e-4)


def test_a_sliding_window_without_layer_types_is_refused(monkeypatch):
    """Mistral's window is not listed per layer: even if its family were allowed, packing would be refused."""
    model = _more_families("mistral", 300)
    monkeypatch.setattr(pc, "PACKED_FAMILIES", pc.PACKED_FAMILIES | {"mistral"})
    assert "sliding window" in pc.packing_unsupported(model)
