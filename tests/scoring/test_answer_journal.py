"""A killed greedy decode resumes at its next batch: the journal's answers equal a run never killed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from test_generation import prompts_of, sharpened
from tiny import make_tokenizer

from icldistill.scoring import generation
from icldistill.scoring.answer_journal import AnswerJournal, journal_key
from icldistill.scoring.generation import DecodeSettings, Generated, generate

DECODE = DecodeSettings(max_new_tokens=8, batch_size=2)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def counting(monkeypatch):
    """Count the batches actually decoded (a journalled batch is not)."""
    calls = []
    real = generation._decode_batch

    def decode(model, prefix, queries, *args):
        calls.append(len(queries))
        return real(model, prefix, queries, *args)

    monkeypatch.setattr(generation, "_decode_batch", decode)
    return calls


def killed_after(batches):
    """A progress callback that kills the decode after ``batches`` batches (after their journal entries)."""
    seen = []

    def progress(n):
        seen.append(n)
        if len(seen) == batches:
            raise Killed
    return progress


def test_a_killed_decode_resumes_with_the_answers_of_one_never_killed(tmp_path, tokenizer, monkeypatch):
    model = sharpened("llama", len(tokenizer), seed=3)
    prompts = prompts_of(tokenizer)
    reference = generate(model, tokenizer, prompts, DECODE)
    journal = AnswerJournal(tmp_path / "j.jsonl", journal_key(prompts, DECODE, "run"))
    with pytest.raises(Killed):
        generate(model, tokenizer, prompts, DECODE, journal=journal, progress=killed_after(2))
    assert len(journal.load()) == 4  # two batches of two, on disk
    calls = counting(monkeypatch)
    resumed = generate(model, tokenizer, prompts, DECODE, journal=journal)
    assert resumed == reference
    assert sum(calls) == len(prompts) - 4  # only the batch not journalled was decoded again
    assert len(journal.load()) == len(prompts)


def test_another_decodes_journal_is_not_trusted(tmp_path, tokenizer, monkeypatch):
    model = sharpened("llama", len(tokenizer), seed=3)
    prompts = prompts_of(tokenizer)
    path = tmp_path / "j.jsonl"
    generate(model, tokenizer, prompts, DECODE, journal=AnswerJournal(path, journal_key(prompts, DECODE, "run A")))
    calls = counting(monkeypatch)
    other = AnswerJournal(path, journal_key(prompts, DECODE, "run B"))
    assert other.load() == {}
    generate(model, tokenizer, prompts, DECODE, journal=other)
    assert sum(calls) == len(prompts)
    assert AnswerJournal(path, journal_key(prompts, DECODE, "run A")).load() == {}  # begun afresh for run B
    longer = DecodeSettings(max_new_tokens=9, batch_size=2)
    assert journal_key(prompts, longer, "run B") != other.key != journal_key(prompts[1:], DECODE, "run B")


def test_a_torn_last_line_is_dropped_and_the_journal_goes_on(tmp_path, tokenizer):
    model = sharpened("llama", len(tokenizer), seed=4)
    prompts = prompts_of(tokenizer)
    reference = generate(model, tokenizer, prompts, DECODE)
    journal = AnswerJournal(tmp_path / "j.jsonl", journal_key(prompts, DECODE))
    with pytest.raises(Killed):
        generate(model, tokenizer, prompts, DECODE, journal=journal, progress=killed_after(1))
    with journal.path.open("a") as handle:
        handle.write('{"indices": [0, 1], "answers": [{"tok')  # killed while writing the next batch
    assert len(journal.load()) == 2
    assert generate(model, tokenizer, prompts, DECODE, journal=journal) == reference
    assert len(journal.load()) == len(prompts)  # the batches after the torn line were read back


def test_sampled_decoding_is_not_journalled(tmp_path, tokenizer):
    model = sharpened("llama", len(tokenizer))
    prompts = prompts_of(tokenizer)
    sampled = DecodeSettings(max_new_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match="sampled"):
        generate(model, tokenizer, prompts, sampled, journal=AnswerJournal(tmp_path / "j", "k"))


answers = st.builds(Generated, st.lists(st.integers(0, 200_000), max_size=6).map(tuple), st.text(max_size=20),
                    st.sampled_from(["eos", "stop", "length"]))


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(answers, min_size=1, max_size=3), max_size=4))
def test_answers_come_back_as_written(tmp_path_factory, batches):
    journal = AnswerJournal(tmp_path_factory.mktemp("j") / "j.jsonl", "key")
    journal.open()
    written, start = {}, 0
    for batch in batches:
        indices = list(range(start, start + len(batch)))
        journal.append(indices, batch)
        written.update(zip(indices, batch))
        start += len(batch)
    assert {i: Generated(tuple(a["tokens"]), a["text"], a["finish"]) for i, a in journal.load().items()} == written
    assert AnswerJournal(journal.path, "other key").load() == {}


@pytest.mark.parametrize("line", ['{"indices": [0], "answers": []}', '{"indices": ["0"], "answers": [{}]}',
                                  '{"indices": [0], "answers": [{"tokens": [1], "text": 3, "finish": "eos"}]}',
                                  '[1, 2]', 'null'])
def test_a_line_that_is_not_a_finished_batch_is_ignored(tmp_path, line):
    journal = AnswerJournal(tmp_path / "j.jsonl", "key")
    journal.open()
    journal.append([1], [Generated((5, 6), "x", "eos")])
    with journal.path.open("a") as handle:
        handle.write(line + "\n")
    assert journal.load() == {1: {"tokens": [5, 6], "text": "x", "finish": "eos"}}
