"""Generation distillation on tiny models and real GSM8K rows: each signal trains, only answer tokens are
scored, the teacher's pass is cached and reused, finished seeds resume, one-tokenizer signals refuse two."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_model

from icldistill.config import GenDistillOptions, build_config
from icldistill.errors import ConfigError
from icldistill.methods import gen_distill, gen_seed
from icldistill.methods.gen_distill import plan_seed, run_gen_distill
from icldistill.methods.gen_setup import encode_prompts, prepare_generation
from icldistill.methods.gen_teacher import (
    answer_tokens,
    context_logits,
    context_prefix,
    end_token,
    teacher_answers,
    teacher_topk,
)
from icldistill.methods.gen_train import FixedAnswers, GenBatch, OnPolicyAnswers, make_loss, reference_tokens
from icldistill.models.loading import load_model
from icldistill.scoring.generation import Generated
from icldistill.training.signals import TeacherSpec

SIGNALS = ("reference", "sequence", "token", "on-policy")


def _config(tmp_path: Path, data_dir: Path, tiny_dirs: dict[str, Path], **kw) -> GenDistillOptions:
    values = dict(teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["student"]), task="gsm8k", shots=2,
                  seeds=[0], limit=2, batch_size=4, max_new_tokens=6, data_dir=str(data_dir),
                  output_dir=str(tmp_path / "out"), dtype="fp32", device="cpu", chat_template="no", train_queries=4,
                  dev_queries=2, epochs=3, train_batch_size=4, warmup_ratio=0.0, lr=3e-2, teacher_topk=8,
                  cache_dir=str(tmp_path / "cache"))
    values.update(kw)
    return build_config(GenDistillOptions, values)


def _lora_b_norm(seed_dir: Path) -> float:
    state = load_file(str(seed_dir / "adapter" / "adapter_model.safetensors"))
    return sum(float(t.abs().sum()) for name, t in state.items() if "lora_B" in name)


@pytest.mark.parametrize("signal", SIGNALS)
def test_each_signal_trains_and_records(signal, tmp_path, data_dir, tiny_dirs):
    record = run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, signal=signal), progress=False)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["method"] == "gen-distill" and on_disk["signal"] == signal
    seed = record["seeds"]["0"]
    assert seed["status"] == "complete" and seed["signal"] == signal
    assert len(seed["train_queries"]) == 4 and len(seed["dev_examples"]) == 2 and len(seed["demonstrations"]) == 2
    taken = [set(seed[k]) for k in ("train_queries", "dev_examples", "demonstrations")]
    assert not (taken[0] & taken[1]) and not (taken[0] & taken[2]) and not (taken[1] & taken[2])
    assert seed["labelled_examples"] == (4 if signal == "reference" else 2)  # references used, or demonstrations
    # LoRA's B matrices start at zero: a trained student has moved them.
    assert _lora_b_norm(tmp_path / "out" / "seed-0") > 0
    losses = [h["train_loss"] for h in seed["history"]]
    assert len(losses) == 3 and all(h["dev_loss"] is not None for h in seed["history"])
    if signal != "on-policy":  # fixed targets: three full-batch steps at a high rate fit them better
        assert losses[-1] < losses[0]
    assert "dev_before_training" in seed and seed["eval"]["gsm8k"]["n"] == 2
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["seed"] == 0 and r["tokens"] <= 6 for r in rows)
    resources = record["resources"]
    assert resources["total"]["peak_memory_mb"] > 0 and resources["training_peak_memory_mb"] > 0
    if signal in ("sequence", "token"):
        assert resources["teacher_pass"]["teacher_loaded"] and resources["teacher_pass"]["cache_hits"] == 0
        assert seed["teacher_pass"]["answers"]["n"] == 4
    if signal == "on-policy":
        assert seed["on_policy_draws"] >= 3  # once per epoch (resample_every 1), every row in one batch


def _manual_answer_ce(model, prompts, answers) -> float:
    """Sum over rows of the mean CE of each answer token, from each unpadded row's full forward pass."""
    total = 0.0
    for p, a in zip(prompts, answers):
        ids = torch.tensor([list(p) + list(a)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1)
        positions = torch.arange(len(p) - 1, len(p) + len(a) - 1)
        total += float(-lp[positions, torch.tensor(a)].mean())
    return total


def test_only_answer_tokens_enter_the_loss(tmp_path, data_dir, tiny_dirs):
    """The CE equals the answer-only CE of each row alone, and changing a prompt's targets is impossible: the
    batch's targets are the answer tokens, and the loss differs from a whole-sequence CE."""
    config = _config(tmp_path, data_dir, tiny_dirs, signal="reference")
    setup = prepare_generation(config)
    plan = plan_seed(config, setup, 0)
    student = load_model(str(tiny_dirs["student"]), dtype="fp32", device="cpu")
    prompts = encode_prompts(student, setup.task, plan.queries, (), with_instruction=False)
    answers = reference_tokens(setup.task, student.tokenizer, end_token(student.model, student.tokenizer),
                               plan.queries)
    batch = FixedAnswers(prompts, answers, 0)([2, 0, 3])
    assert batch.rows.targets.tolist() == answers[2] + answers[0] + answers[3]
    out = make_loss(config, None)(student.model, batch)
    manual = _manual_answer_ce(student.model, [prompts[i] for i in (2, 0, 3)], [answers[i] for i in (2, 0, 3)])
    assert float(out.loss.detach()) == pytest.approx(manual, rel=1e-4)
    whole = _manual_answer_ce(student.model, [prompts[i][:1] for i in (2, 0, 3)],
                              [prompts[i][1:] + answers[i] for i in (2, 0, 3)])
    assert float(out.loss.detach()) != pytest.approx(whole, rel=1e-3)
    # Replacing every prompt token leaves the targets (and so what is scored) unchanged.
    other = [[5] * len(p) for p in prompts]
    assert FixedAnswers(other, answers, 0)([2, 0, 3]).rows.targets.tolist() == batch.rows.targets.tolist()


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
@pytest.mark.parametrize("chunked", [False, True])
def test_teacher_logits_after_the_context_are_those_of_each_whole_prompt_in_row_order(arch, chunked):
    """Gemma 3's sliding layers (window 8 here) would count the pads between the context and a shorter query
    as positions and drop context tokens the whole prompt sees: its rows run in groups of one query length."""
    model = make_model(arch, 64, seed=1)
    context = [30, 31, 32, 33, 34]
    prompts = [context + q for q in ([5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15])]
    answers = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29]]
    prefix = context_prefix(model, prompts)
    assert prefix is not None and prefix.length == len(context)
    with torch.no_grad():
        got = context_logits(model, prefix, prompts, answers, 0, chunked=chunked)
        got = got.logits(got.hidden) if chunked else got
        expected = torch.cat([model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1:len(p) + len(a) - 1]
                              for p, a in zip(prompts, answers)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_teacher_signals_are_those_of_the_whole_prompt(tmp_path, data_dir, tiny_dirs):
    """Top-k (token) and full logits (on-policy) after the cached context equal the full prompt's, at the answer
    tokens only."""
    config = _config(tmp_path, data_dir, tiny_dirs, signal="on-policy", sample_temperature=1.0)
    setup = prepare_generation(config)
    plan = plan_seed(config, setup, 0)
    teacher = load_model(str(tiny_dirs["teacher"]), dtype="fp32", device="cpu")
    student = load_model(str(tiny_dirs["student"]), dtype="fp32", device="cpu")
    t_prompts = encode_prompts(teacher, setup.task, plan.queries, plan.demonstrations, with_instruction=True)
    got = teacher_answers(teacher, t_prompts, setup.decode_settings(4))
    got.topk_logprobs, got.topk_ids = teacher_topk(teacher, t_prompts, got.answers, 3, 5)
    for i in (0, 3):
        ids = torch.tensor([t_prompts[i] + got.answers[i]])
        with torch.no_grad():
            lp = torch.log_softmax(teacher.model(input_ids=ids).logits[0].float(), dim=-1)
        at = lp[len(t_prompts[i]) - 1: len(t_prompts[i]) + len(got.answers[i]) - 1]
        values, _ = got.topk_rows([i])
        assert torch.allclose(values, at.topk(5, dim=-1).values, atol=1e-4)
    s_prompts = encode_prompts(student, setup.task, plan.queries, (), with_instruction=False)
    eos = end_token(student.model, student.tokenizer)
    source = OnPolicyAnswers(student.model, student.tokenizer, eos, s_prompts, teacher, t_prompts,
                             context_prefix(teacher.model, t_prompts),
                             setup.decode_settings(4, temperature=1.0), 1, 0, 0, 0)
    batch: GenBatch = source([1, 2])
    samples = [source.samples[1], source.samples[2]]
    assert batch.rows.targets.tolist() == samples[0] + samples[1]
    manual = []
    for i, sample in zip((1, 2), samples):
        with torch.no_grad():
            logits = teacher.model(input_ids=torch.tensor([t_prompts[i] + sample])).logits[0]
        manual.append(logits[len(t_prompts[i]) - 1: len(t_prompts[i]) + len(sample) - 1])
    teacher_rows = batch.teacher_logits  # its hidden states: the loss computes its logits a chunk at a time
    assert torch.allclose(teacher_rows.logits(teacher_rows.hidden), torch.cat(manual), atol=1e-4)
    # A second request of the same rows draws again (resample_every 1); answer_tokens ends on EOS when ended.
    source([1, 2])
    assert source.drawn == 2 and all(len(s) >= 1 for s in source.samples.values())


def test_answer_tokens_end_where_the_model_ended():
    assert answer_tokens(Generated((4, 5), "x", "eos"), 9) == [4, 5, 9]
    assert answer_tokens(Generated((4, 5), "x", "length"), 9) == [4, 5]
    assert answer_tokens(Generated((4, 5), "x", "stop"), 9) == [4, 5]  # the stop sequence's tokens end it
    assert answer_tokens(Generated((), "", "eos"), 9) == [9]


def test_token_cache_is_reused_without_the_teacher(tmp_path, data_dir, tiny_dirs, monkeypatch):
    first = run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, signal="token", epochs=1, dev_queries=0),
                            progress=False)
    assert first["resources"]["teacher_pass"]["cache_hits"] == 0

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded although its pass is cached")

    monkeypatch.setattr(TeacherSpec, "load", refuse)
    second = run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, signal="token", epochs=1, dev_queries=0,
                                     output_dir=str(tmp_path / "again")), progress=False)
    tp = second["resources"]["teacher_pass"]
    assert tp["cache_hits"] == 1 and not tp["teacher_loaded"]
    assert second["seeds"]["0"]["teacher_pass"]["key"] == first["seeds"]["0"]["teacher_pass"]["key"]
    assert second["seeds"]["0"]["history"][0]["train_loss"] == pytest.approx(first["seeds"]["0"]["history"][0]
                                                                              ["train_loss"])
    # The sequence signal reads the same answers (no teacher either).
    seq = run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, signal="sequence", epochs=1, dev_queries=0,
                                  output_dir=str(tmp_path / "seq")), progress=False)
    assert seq["resources"]["teacher_pass"]["cache_hits"] == 1
    assert seq["seeds"]["0"]["teacher_pass"]["answers_key"] == first["seeds"]["0"]["teacher_pass"]["answers_key"]
    # Another k is another top-k pass: its key changes and the teacher is needed.
    with pytest.raises(AssertionError, match="teacher was loaded"):
        run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, signal="token", epochs=1, dev_queries=0,
                                teacher_topk=4, output_dir=str(tmp_path / "k4")), progress=False)


def test_resume_reuses_a_finished_seed(tmp_path, data_dir, tiny_dirs, monkeypatch):
    config = _config(tmp_path, data_dir, tiny_dirs, signal="reference", epochs=1, dev_queries=0)
    first = run_gen_distill(config, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr(gen_seed, "load_model", refuse)
    again = run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, signal="reference", epochs=1, dev_queries=0,
                                    resume=True), progress=False)
    assert again["status"] == "complete"
    assert again["seeds"]["0"]["eval"] == first["seeds"]["0"]["eval"]
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("signal", ["token", "on-policy"])
def test_two_tokenizers_are_refused_before_any_weights(signal, tmp_path, data_dir, tiny_dirs, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(TeacherSpec, "load", refuse)
    monkeypatch.setattr(gen_seed, "load_model", refuse)
    config = _config(tmp_path, data_dir, tiny_dirs, signal=signal, teacher=str(tiny_dirs["other"]))
    with pytest.raises(ConfigError, match=f"--signal {signal}.*--signal sequence"):
        gen_distill.run_gen_distill(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_sequence_works_across_tokenizers(tmp_path, data_dir, tiny_dirs):
    record = run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, signal="sequence", epochs=1, dev_queries=0,
                                     teacher=str(tiny_dirs["other"])), progress=False)
    assert record["status"] == "complete" and record["seeds"]["0"]["teacher_pass"]["answers"]["n"] == 4


def test_cli_runs_gen_distill(tmp_path, data_dir, tiny_dirs, capsys):
    from icldistill.cli import main

    code = main(["--quiet", "gen-distill", "--teacher", str(tiny_dirs["teacher"]),
                 "--student", str(tiny_dirs["student"]), "--signal", "sequence", "--task", "gsm8k", "--shots", "1",
                 "--limit", "2", "--max-new-tokens", "4",
                 "--train-queries", "2", "--dev-queries", "0", "--epochs", "1", "--chat-template", "no",
                 "--device", "cpu", "--dtype", "fp32", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "o"),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    record = json.loads((tmp_path / "o" / "results.json").read_text())
    assert record["method"] == "gen-distill" and record["config"]["signal"] == "sequence"
    assert "gsm8k" in capsys.readouterr().out


def test_full_fine_tuning_and_selection_on_the_dev_split(tmp_path, data_dir, tiny_dirs):
    record = run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, signal="sequence", peft="none", epochs=2,
                                     select="best", select_metric="loss"), progress=False)
    seed = record["seeds"]["0"]
    assert (tmp_path / "out" / "seed-0" / "trainable.safetensors").is_file() and "adapter" not in seed["artefacts"]
    assert seed["selected"]["rule"] == "best" and seed["selected"]["metric"] == "dev_loss"
    dev_losses = [h["dev_loss"] for h in seed["history"]]
    assert seed["selected"]["value"] == min(dev_losses)
    assert seed["labelled_examples"] == 2 + 2  # demonstrations, and the dev references that chose the state


def test_on_policy_resume_trains_on_the_samples_the_uninterrupted_run_drew(tmp_path, data_dir, tiny_dirs):
    """A run killed after epoch 1's checkpoint and resumed ends with the weights of the run never killed: the
    student's samples of epoch 1 (kept for epoch 2 with --resample-every 2) travel in the checkpoint, not drawn
    again from the resumed student."""
    kw = dict(signal="on-policy", epochs=3, resample_every=2, dev_queries=2, sample_temperature=1.0, resume=True)
    whole = _config(tmp_path / "whole", data_dir, tiny_dirs, **kw)
    run_gen_distill(whole, progress=False, score_eval_sets=False)

    class Killed(Exception):
        pass

    def kill_in_epoch_two(epoch, metrics):
        if epoch == 2:
            raise Killed  # during epoch 2's dev evaluation: epoch 1's checkpoint is the last on disk

    killed = _config(tmp_path / "killed", data_dir, tiny_dirs, **kw)
    with pytest.raises(Killed):
        run_gen_distill(killed, progress=False, score_eval_sets=False, on_evaluate=kill_in_epoch_two)
    state = json.loads(next((tmp_path / "killed" / "out" / "seed-0").glob("checkpoint*/trainer_state.json"))
                       .read_text())
    assert state["epochs_done"] == 1 and state["batch_source"]["drawn"] == 1
    resumed = run_gen_distill(killed, progress=False, score_eval_sets=False)
    seed = resumed["seeds"]["0"]
    assert seed["resources"]["resumed_from_epoch"] == 1 and seed["on_policy_draws"] == 2
    a = load_file(str(tmp_path / "whole" / "out" / "seed-0" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "out" / "seed-0" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def _kill_first_call(module, monkeypatch, after: int) -> None:
    """Replace ``module.generate`` by one whose first call is killed after ``after`` batches."""
    real, state = module.generate, {"calls": 0, "batches": 0}

    def generate(*args, **kwargs):
        state["calls"] += 1
        first = state["calls"] == 1

        def progress(n):
            state["batches"] += 1
            if first and state["batches"] == after:
                raise KeyboardInterrupt
        return real(*args, **{**kwargs, "progress": progress})

    monkeypatch.setattr(module, "generate", generate)


def _count_decoded(monkeypatch) -> list[int]:
    """The sizes of the batches decoded from now on (a batch read from a journal is not decoded)."""
    from icldistill.scoring import generation

    real, decoded = generation._decode_batch, []

    def decode(model, prefix, queries, *args):
        decoded.append(len(queries))
        return real(model, prefix, queries, *args)

    monkeypatch.setattr(generation, "_decode_batch", decode)
    return decoded


@pytest.mark.parametrize("killed_in", ["teacher pass", "final evaluation"])
def test_a_run_killed_while_decoding_resumes_at_its_next_batch(killed_in, tmp_path, data_dir, tiny_dirs, monkeypatch):
    """The teacher's answers and the student's final answers are journalled batch by batch: a rerun decodes
    only the batches not yet journalled, and ends where a run never killed ends."""
    from icldistill.methods import gen_setup, gen_teacher
    from icldistill.runtime.rundir import JOURNAL_DIR

    options = dict(signal="sequence", epochs=1, dev_queries=0, batch_size=1)
    reference = run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, output_dir=str(tmp_path / "ref"),
                                        cache_dir=str(tmp_path / "ref-cache"), **options), progress=False)
    module = gen_teacher if killed_in == "teacher pass" else gen_setup
    _kill_first_call(module, monkeypatch, after=1)
    with pytest.raises(KeyboardInterrupt):
        run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, **options), progress=False)
    journals = [*(tmp_path / "cache").rglob("*.journal.jsonl"), *(tmp_path / "out").rglob("*.journal.jsonl")]
    assert len(journals) == 1
    monkeypatch.undo()
    decoded = _count_decoded(monkeypatch)
    again = run_gen_distill(_config(tmp_path, data_dir, tiny_dirs, resume=True, **options), progress=False)
    # One query a batch: the teacher answers 4 training queries, the student 2 evaluation queries; the batch
    # journalled before the kill is not decoded again (a teacher pass finished before it is cached).
    assert len(decoded) == (3 + 2 if killed_in == "teacher pass" else 1)
    assert again["seeds"]["0"]["eval"] == reference["seeds"]["0"]["eval"]
    assert not any(path.exists() for path in journals) and not (tmp_path / "out" / JOURNAL_DIR).exists()


def test_two_workers_needing_one_teacher_pass_decode_it_once(tmp_path, data_dir, tiny_dirs, monkeypatch):
    """The token and sequence signals of one seed need the same teacher answers: run at once (two sweep
    workers), the second waits for the first's pass and reads it from the cache instead of decoding it too."""
    import threading

    real, calls, first_started = gen_distill.teacher_answers, [], threading.Event()

    def slow_teacher_answers(*args, **kwargs):
        calls.append(1)
        first_started.set()
        time.sleep(0.5)  # the other worker arrives while this pass runs
        return real(*args, **kwargs)

    monkeypatch.setattr(gen_distill, "teacher_answers", slow_teacher_answers)
    results = {}

    def worker(signal: str) -> None:
        config = _config(tmp_path, data_dir, tiny_dirs, signal=signal, epochs=1, dev_queries=0,
                         output_dir=str(tmp_path / signal))
        results[signal] = run_gen_distill(config, progress=False)

    token = threading.Thread(target=worker, args=("token",))
    token.start()
    first_started.wait(30)
    worker("sequence")
    token.join()
    assert len(calls) == 1
    passes = {s: r["seeds"]["0"]["teacher_pass"] for s, r in results.items()}
    assert passes["sequence"]["cache_hit"] and passes["sequence"]["answers_key"] == passes["token"]["answers_key"]
