"""Evaluation sets, the teacher and the student score the same whole-prompt tokens with the same class scores."""

from __future__ import annotations

import pytest
import torch
from reference_losses import label_log_probs

from icldistill.config import DistillOptions, IclOptions, PbftOptions, build_config
from icldistill.methods.common import evaluate_on_sets, prepare
from icldistill.models.loading import load_model
from icldistill.scoring import evalsets
from icldistill.scoring.evalsets import score_prompts
from icldistill.training.losses import class_log_probs

MULTI = [" Yes indeed", " No"]  # several tokens and one token


def _setup(data_dir, **kw):
    values = dict(task="mnli", eval=["mnli-m", "hans-lo"], limit=6, data_dir=str(data_dir))
    values.update(kw)
    return prepare(build_config(IclOptions, values))


def test_one_prefix_cache_per_context_serves_every_set(data_dir, tiny_dirs, monkeypatch):
    setup = _setup(data_dir)
    model = load_model(str(tiny_dirs["gemma3"]), dtype="fp32", device="cpu")
    built = []
    real = evalsets.PrefixCache

    def counting(*args, **kwargs):
        built.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(evalsets, "PrefixCache", counting)
    demos = setup.demonstrations(0, 4)
    metrics, _, _ = evaluate_on_sets(model, setup, demos, batch_size=4, progress=False)
    assert len(built) == 1 and set(metrics) == {"mnli-m", "hans-lo"}
    # ...and the shared cache gives each set the numbers of its own naive scoring.
    naive, _, _ = evaluate_on_sets(model, setup, demos, batch_size=4, progress=False, use_prefix_cache=False)
    for name in metrics:
        assert metrics[name]["auc"] == pytest.approx(naive[name]["auc"], abs=1e-6)


@pytest.mark.parametrize("arch", ["opt", "teacher", "gemma3"])  # teacher: the tiny Llama
def test_multi_token_words_cached_equals_naive_through_evaluation(arch, data_dir, tiny_dirs):
    setup = _setup(data_dir, label_words=MULTI)
    model = load_model(str(tiny_dirs[arch]), dtype="fp32", device="cpu")
    demos = setup.demonstrations(0, 4)
    examples = setup.eval_examples["mnli-m"]
    enc, cached, _ = score_prompts(model, setup.pattern, demos, examples, batch_size=3)
    _, naive, _ = score_prompts(model, setup.pattern, demos, examples, batch_size=2, use_prefix_cache=False)
    assert cached.multi_token and max(len(c) for c in enc.continuations[0]) > 1
    assert torch.allclose(cached.label_logprobs, naive.label_logprobs, atol=1e-4)
    mean = score_prompts(model, setup.pattern, demos, examples, batch_size=3, label_score="mean")[1]
    lengths = torch.tensor([[len(c) for c in row] for row in enc.continuations], dtype=torch.float32)
    assert torch.allclose(mean.label_logprobs, cached.label_logprobs / lengths, atol=1e-5)


def test_record_says_what_full_vocabulary_metrics_measure(data_dir, tiny_dirs):
    model = load_model(str(tiny_dirs["student"]), dtype="fp32", device="cpu")
    single = _setup(data_dir)
    multi = _setup(data_dir, label_words=MULTI)
    shared_first = _setup(data_dir, label_words=[" Yes indeed", " Yes not"])
    results = {}
    for name, setup in (("single", single), ("multi", multi), ("shared", shared_first)):
        metrics, _, _ = evaluate_on_sets(model, setup, setup.demonstrations(0, 2), batch_size=4, progress=False)
        results[name] = metrics["mnli-m"]
    assert results["single"]["full_vocab_basis"] == "label_word"
    assert results["multi"]["full_vocab_basis"] == "first_token"
    assert results["multi"]["accuracy_full_vocab"] is not None
    assert results["shared"]["full_vocab_basis"] == "not_applicable"
    assert results["shared"]["accuracy_full_vocab"] is None and results["shared"]["non_label_rate"] is None
    assert results["multi"]["label_score"] == "sum"


def test_student_class_scores_equal_zero_shot_evaluation(data_dir, tiny_dirs):
    """What PBFT/CD train on is what evaluation (no demonstrations) reads, for words of any length."""
    from icldistill.methods.finetune import StudentBatchBuilder, student_label_scores, student_logits

    for words in (None, MULTI):
        setup = _setup(data_dir, label_words=words)
        model = load_model(str(tiny_dirs["gemma3"]), dtype="fp32", device="cpu")
        examples = setup.eval_examples["mnli-m"]
        batches = StudentBatchBuilder.build(model, setup, examples)
        batch = batches(list(range(len(examples))))
        logits, scores = student_label_scores(model.model, batch)
        _, evaluated, _ = score_prompts(model, setup.pattern, [], examples, batch_size=4)
        assert torch.allclose(scores.detach(), evaluated.label_logprobs, atol=1e-4)
        if words is None:  # one token per class: the old definition, on the answer-position logits
            first = torch.tensor([c[0] for c in batch.continuations[0]])
            assert torch.allclose(class_log_probs(scores, 2.0), label_log_probs(student_logits(model.model, batch),
                                                                                first, 2.0), atol=1e-5)
            assert torch.allclose(logits, student_logits(model.model, batch), atol=1e-5)


def test_teacher_signal_uses_the_evaluation_scores(data_dir, tiny_dirs):
    from icldistill.training.teacher import OnlineTeacher, compute_signal

    setup = _setup(data_dir, label_words=MULTI)
    teacher = load_model(str(tiny_dirs["teacher"]), dtype="fp32", device="cpu")
    demos = setup.demonstrations(0, 4)
    queries = setup.eval_examples["mnli-m"]
    signal = compute_signal(teacher, setup.pattern, [demos], queries, batch_size=4, progress=False)
    _, scores, _ = score_prompts(teacher, setup.pattern, demos, queries, batch_size=4)
    expected = scores.label_logprobs - torch.logsumexp(scores.label_logprobs, -1, keepdim=True)
    assert torch.allclose(signal.label_logprobs, expected, atol=1e-4)
    online = OnlineTeacher(teacher, setup.pattern, [demos])(queries)
    assert torch.allclose(online.label_logprobs, signal.label_logprobs, atol=1e-4)


@pytest.mark.parametrize("method", ["pbft", "distill"])
def test_training_with_multi_token_words_runs_and_learns(method, tmp_path, data_dir, tiny_dirs, cache_dir):
    from icldistill.methods.distill import run_distill
    from icldistill.methods.pbft import run_pbft

    common = dict(task="mnli", eval=["mnli-m"], shots=4, seeds=[0], limit=6, epochs=3, lr=5e-3, train_batch_size=4,
                  warmup_ratio=0.0, eval_every=-1, data_dir=str(data_dir), output_dir=str(tmp_path / method),
                  label_words=MULTI, dtype="fp32", device="cpu")
    if method == "pbft":
        record = run_pbft(build_config(PbftOptions, dict(common, model=str(tiny_dirs["student"]))), progress=False)
        losses = [h["train_ce"] for h in record["seeds"]["0"]["history"]]
    else:
        record = run_distill(build_config(DistillOptions, dict(
            # mean: summed scores of words of unequal length saturate a random tiny model's distribution.
            common, teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["other"]), train_queries=8, alpha=1.0,
            label_score="mean")),
            progress=False)
        losses = [h["train_kl"] for h in record["seeds"]["0"]["history"]]
    assert record["status"] == "complete"
    assert losses[-1] < losses[0], losses
    assert record["seeds"]["0"]["eval"]["mnli-m"]["full_vocab_basis"] in ("first_token", "not_applicable")


def test_teacher_cache_key_names_the_tokenization_and_label_score(data_dir):
    from icldistill.training.teacher import signal_key

    setup = _setup(data_dir)
    identity = {"name": "t", "fingerprint": "f", "dtype": "float32"}
    demos, queries = setup.demonstrations(0, 2), setup.eval_examples["mnli-m"]
    key, description = signal_key(identity, setup.pattern, [demos], queries, "data", 0)
    assert description["tokenization"] == "whole-prompt"  # entries from split tokenization are not reused
    assert signal_key(identity, setup.pattern, [demos], queries, "data", 0, label_score="mean")[0] != key
