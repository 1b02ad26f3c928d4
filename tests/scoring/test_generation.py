"""Greedy generation after a shared prefix equals generating from each whole prompt (tiny models)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tiny import make_model, make_tokenizer

from icldistill.errors import ConfigError
from icldistill.scoring.generation import DecodeSettings, _batches, generate

CONTEXT = "question: the cat saw a dog ? answer: Yes\n\nquestion: the man ran ? answer: No\n\n"
QUERIES = ["question: the woman slept", "question: a lawyer", "question: the doctor helped the artist because",
           "question: sad", "question: the student thought that the dog was happy and", "question: why"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def sharpened(arch: str, vocab: int, seed: int = 0):
    """A tiny model whose head is scaled up, so that greedy choices are far from ties (float noise cannot flip them)."""
    model = make_model(arch, vocab, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def prompts_of(tokenizer, context=CONTEXT, queries=QUERIES):
    return [tokenizer(context + q)["input_ids"] for q in queries]


class StepLogits:
    """Records the last position's logits (rows, vocab) of every forward call of a model."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_hook(lambda m, args, out: self.calls.append(out.logits[:, -1].clone()))

    def row(self, i, skip=0):
        """Row i's logits at every step, after the first ``skip`` calls (a prefix pass)."""
        return torch.stack([c[i] for c in self.calls[skip:]])

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3"])
def test_cached_equals_each_whole_prompt(tokenizer, arch):
    """Every step's logits of a cached, left-padded batch equal those of each whole prompt decoded alone."""
    model = sharpened(arch, len(tokenizer))
    prompts = prompts_of(tokenizer)
    decode = DecodeSettings(max_new_tokens=12, batch_size=len(prompts))
    steps = StepLogits(model)
    cached = generate(model, tokenizer, prompts, decode)
    steps.close()
    batches = _batches(prompts, len(prompts), arch == "gemma3")  # queries sort as their prompts do
    order = [i for b in batches for i in b]
    assert [g.tokens for g in cached] == [
        generate(model, tokenizer, [p], DecodeSettings(max_new_tokens=12, batch_size=1),
                        use_prefix_cache=False)[0].tokens for p in prompts]
    assert any(len(g.tokens) > 1 for g in cached)  # the test decodes, it does not stop at once
    if len(batches) == 1:  # one batch: each row's logits at every step against its whole prompt alone
        for row, i in enumerate(order):
            alone = StepLogits(model)
            generate(model, tokenizer, [prompts[i]], DecodeSettings(max_new_tokens=12),
                            use_prefix_cache=False)
            alone.close()
            n = len(alone.calls)
            torch.testing.assert_close(steps.row(row, skip=1)[:n], alone.row(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_batch_size_does_not_change_answers(tokenizer, batch_size):
    model = sharpened("llama", len(tokenizer), seed=5)
    prompts = prompts_of(tokenizer)
    reference = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=10, batch_size=1))
    got = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=10, batch_size=batch_size))
    assert [g.tokens for g in got] == [g.tokens for g in reference]


def test_naive_batched_equals_batch_of_one(tokenizer):
    model = sharpened("llama", len(tokenizer), seed=1)
    prompts = prompts_of(tokenizer)
    batched = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=8, batch_size=3),
                              use_prefix_cache=False)
    single = [generate(model, tokenizer, [p], DecodeSettings(max_new_tokens=8, batch_size=1),
                              use_prefix_cache=False)[0] for p in prompts]
    assert [g.tokens for g in batched] == [g.tokens for g in single]


def test_greedy_matches_transformers_generate(tokenizer):
    model = sharpened("llama", len(tokenizer), seed=2)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    for p in prompts_of(tokenizer)[:3]:
        ours = generate(model, tokenizer, [p], DecodeSettings(max_new_tokens=10, batch_size=1))[0]
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist()
        if tokenizer.eos_token_id in ref:
            ref = ref[:ref.index(tokenizer.eos_token_id)]
        assert list(ours.tokens) == ref


def test_stop_sequence_cuts_the_text(tokenizer):
    model = sharpened("llama", len(tokenizer), seed=3)
    prompts = prompts_of(tokenizer)
    free = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=16))
    # Stop at a piece of text that the first answer actually writes, after its first character.
    text = free[0].text
    assert len(text) > 3
    stop = text[2:4]
    stopped = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=16, stop=(stop,)))
    assert stopped[0].finish == "stop"
    assert stop not in stopped[0].text and free[0].text.startswith(stopped[0].text)
    assert len(stopped[0].tokens) <= len(free[0].tokens)


def test_eos_ends_an_answer(tokenizer):
    model = sharpened("llama", len(tokenizer), seed=4)
    prompts = prompts_of(tokenizer)
    free = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=6))
    first = free[0].tokens[0]
    model.generation_config.eos_token_id = [first]  # the first token it writes now ends the answer
    ended = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=6))
    assert ended[0].finish == "eos" and ended[0].tokens == () and ended[0].text == ""


@pytest.mark.parametrize("arch", ["llama", "opt"])  # one batch (gemma3 batches only equal-length queries)
def test_ended_rows_leave_the_batch_and_the_rest_decode_as_alone(tokenizer, arch):
    """Rows that end early (EOS at different steps) leave the batch: each forward pass carries only the rows
    still decoding, and every answer equals the one its whole prompt gets alone."""
    model = sharpened(arch, len(tokenizer), seed=6)
    prompts = prompts_of(tokenizer)
    free = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=12))
    # An end token that some answers write early and others late or never: rows end at different steps.
    firsts = {}
    for g in free:
        for step, token in enumerate(g.tokens):
            firsts.setdefault(token, []).append(step)
    eos = max(firsts, key=lambda t: (len(set(firsts[t])) + (len(firsts[t]) < len(free)), -min(firsts[t])))
    model.generation_config.eos_token_id = [eos]
    rows_per_call = []
    handle = model.register_forward_hook(lambda m, args, out: rows_per_call.append(out.logits.shape[0]))
    batched = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=12, batch_size=len(prompts)))
    handle.remove()
    alone = [generate(model, tokenizer, [p], DecodeSettings(max_new_tokens=12, batch_size=1),
                      use_prefix_cache=False)[0] for p in prompts]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    assert [g.finish for g in batched] == [g.finish for g in alone]
    lengths = sorted((len(g.tokens) + 1 if g.finish == "eos" else len(g.tokens) for g in batched), reverse=True)
    assert lengths[0] > lengths[-1]  # the rows do end at different steps
    decode_calls = rows_per_call[-lengths[0]:]  # after the prefix pass, one call per step
    assert decode_calls == [sum(n > step for n in lengths) for step in range(lengths[0])]


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        DecodeSettings(max_new_tokens=0)
    with pytest.raises(ConfigError, match="stop sequence"):
        DecodeSettings(stop=("",))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=20), size=st.integers(1, 5),
       equal=st.booleans())
def test_batches_cover_every_query_once(lengths, size, equal):
    queries = [[0] * n for n in lengths]
    batches = _batches(queries, size, equal)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= size for b in batches)
    if equal:
        assert all(len({lengths[i] for i in b}) == 1 for b in batches)


def test_sampling_is_seeded_and_differs_from_greedy(tokenizer):
    model = make_model("llama", len(tokenizer), seed=6)  # not sharpened: sampling has choices to make
    prompts = prompts_of(tokenizer)
    sampled = DecodeSettings(max_new_tokens=8, temperature=1.0)
    a = generate(model, tokenizer, prompts, sampled, seed=1)
    assert [g.tokens for g in a] == [g.tokens for g in generate(model, tokenizer, prompts, sampled, seed=1)]
    assert [g.tokens for g in a] != [g.tokens for g in generate(model, tokenizer, prompts, sampled, seed=2)]
    greedy = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=8))
    assert [g.tokens for g in a] != [g.tokens for g in greedy]
    with pytest.raises(ConfigError, match="temperature"):
        DecodeSettings(temperature=-1.0)


def test_a_long_decode_logs_how_far_it_is(tokenizer, monkeypatch, caplog):
    import icldistill.scoring.generation as generation

    model = sharpened("llama", len(tokenizer))
    prompts = prompts_of(tokenizer)
    settings_ = DecodeSettings(max_new_tokens=3, batch_size=2)
    monkeypatch.setattr(generation, "LOG_EVERY_S", 1e9)  # a decode shorter than the interval stays quiet
    with caplog.at_level("INFO", logger="icldistill.scoring.generation"):
        generate(model, tokenizer, prompts, settings_)
    assert not caplog.records
    monkeypatch.setattr(generation, "LOG_EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="icldistill.scoring.generation"):
        generate(model, tokenizer, prompts, settings_)
    counts = [r.getMessage().split(" answers")[0] for r in caplog.records]
    n = len(prompts)
    assert counts == [f"decoded {min(i, n)} of {n}" for i in range(2, n + 2, 2)]
