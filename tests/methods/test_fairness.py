"""Issue 12: fair comparisons and honest numbers, each with a test a wrong implementation would fail.

Label budgets and --ce-target, the dev split and --select, --max-steps, the teacher's ICL gain, memory
as paid, pbft-teacher, OOD accuracy on every HANS set, hub revisions and cache keys, precision and
devices, the distillation details, tied embeddings, BitFit add-bias artefacts, label words with commas.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tiny import make_model, make_tokenizer, toy_training_problem

from icldistill.config import DistillOptions, IclOptions, PbftOptions, TrainOptions, build_config
from icldistill.errors import ConfigError, IcldError, ModelError
from icldistill.models.adapters import embeddings_tied, load_trainable, prepare_trainable
from icldistill.training.contexts import tempered_context_average
from icldistill.training.loop import StopTraining, fit, trainable_state


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in trainable_state(model).items()}


def _opts(**kw) -> TrainOptions:
    base = dict(epochs=3, lr=5e-3, train_batch_size=4, warmup_ratio=0.0, lora_dropout=0.0, peft="none")
    base.update(kw)
    return build_config(TrainOptions, base)


def _toy(seed: int = 0, tie: bool = False):
    return toy_training_problem(seed=seed, tie=tie)


def _common(tmp_path, data_dir, **kw):
    base = dict(task="mnli", eval=["mnli-m", "hans-lo"], shots=4, seeds=[0], limit=8, batch_size=8,
                data_dir=str(data_dir), output_dir=str(tmp_path / "out"), epochs=2, lr=1e-2, train_batch_size=4,
                warmup_ratio=0.0, lora_dropout=0.0, dtype="fp32", device="cpu", dev_queries=8)
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------ options


def test_label_words_with_commas_by_escape_or_yaml_list(tmp_path):
    config = build_config(IclOptions, {"label_words": r" 1\,000, 2\,000"})
    assert config.label_words == [" 1,000", " 2,000"]
    path = tmp_path / "opts.yaml"
    path.write_text('label_words: [" yes, really", " no"]\n')
    from icldistill.config import load_yaml

    assert build_config(IclOptions, load_yaml(path)).label_words == [" yes, really", " no"]
    assert build_config(IclOptions, {"label_words": " Yes, No"}).label_words == [" Yes", " No"]


def test_select_best_needs_a_dev_split_and_max_steps_is_positive():
    with pytest.raises(ConfigError, match="dev-queries"):
        build_config(PbftOptions, {"select": "best", "dev_queries": 0})
    with pytest.raises(ConfigError, match="max_steps"):
        build_config(PbftOptions, {"max_steps": 0})
    assert build_config(DistillOptions, {}).ce_target == "gold"
    with pytest.raises(ConfigError, match="ce_target"):
        build_config(DistillOptions, {"ce_target": "silver"})


# ------------------------------------------------------------------------------------ the loop


def test_max_steps_overrides_epochs_and_the_history_records_dev_metrics():
    model, make_batch, loss_fn = _toy()
    seen = []
    result = fit(model, 8, make_batch, loss_fn, _opts(epochs=40, max_steps=5), seed=0, progress=False,
                 evaluate=lambda m: {"accuracy": 0.5, "loss": 0.7}, on_evaluate=lambda e, m: seen.append(e))
    assert result.steps == 5 and result.planned_steps == 5 and result.train_examples_seen == 20
    assert result.epochs_done == 3  # 2 steps per epoch: the third stops after one step
    assert seen == [1, 2, 3]
    assert all(h["dev_accuracy"] == 0.5 and h["dev_loss"] == 0.7 for h in result.history)


def test_on_evaluate_can_stop_training():
    model, make_batch, loss_fn = _toy()

    def prune(epoch, metrics):
        if epoch == 2:
            raise StopTraining

    result = fit(model, 8, make_batch, loss_fn, _opts(epochs=10), seed=0, progress=False,
                 evaluate=lambda m: {"accuracy": 0.5, "loss": 0.7}, on_evaluate=prune)
    assert result.stopped_early and result.epochs_done == 2 and result.steps == 4


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_select_best_restores_the_best_evaluated_state(tmp_path, metric):
    """The dev scores peak at epoch 2; the model must end holding epoch 2's weights, not epoch 4's."""
    model, make_batch, loss_fn = _toy()
    snapshots, scores = [], iter([0.2, 0.9, 0.4, 0.3])

    def evaluate(m):
        snapshots.append(_snapshot(m))
        value = next(scores)
        return {"accuracy": value, "loss": 1 - value}

    result = fit(model, 8, make_batch, loss_fn, _opts(epochs=4, select="best", select_metric=metric, dev_queries=4),
                 seed=0, progress=False, evaluate=evaluate, checkpoint_dir=tmp_path)
    assert result.selected["epoch"] == 2 and result.selected["rule"] == "best"
    final = trainable_state(model)
    assert all(torch.equal(final[n], snapshots[1][n]) for n in final)
    assert not all(torch.equal(final[n], snapshots[3][n]) for n in final)


def test_select_best_survives_a_resume(tmp_path):
    """A run killed after epoch 3 and resumed still selects epoch 2 (its state is in the checkpoint)."""
    scores = [0.2, 0.9, 0.4, 0.3]

    def run(resume, die_at=None):
        model, make_batch, loss_fn = _toy()
        calls = {"n": 0}

        def evaluate(m):
            calls["n"] += 1
            epoch = calls["n"] + (3 if resume else 0)
            if die_at == epoch:
                raise KeyboardInterrupt
            return {"accuracy": scores[epoch - 1], "loss": 0.0}

        result = fit(model, 8, make_batch, loss_fn, _opts(epochs=4, select="best", dev_queries=4, resume=resume),
                     seed=0, progress=False, evaluate=evaluate, checkpoint_dir=tmp_path)
        return model, result

    with pytest.raises(KeyboardInterrupt):
        run(False, die_at=4)
    model, result = run(True)
    assert result.resumed_from_epoch == 3 and result.selected["epoch"] == 2
    # The same as an uninterrupted run's epoch-2 state.
    (tmp_path / "fresh").mkdir()
    fresh_model, make_batch, loss_fn = _toy()
    states = []

    def evaluate(m):
        states.append(_snapshot(m))
        return {"accuracy": scores[len(states) - 1], "loss": 0.0}

    fit(fresh_model, 8, make_batch, loss_fn, _opts(epochs=4, select="best", dev_queries=4), seed=0, progress=False,
        evaluate=evaluate, checkpoint_dir=tmp_path / "fresh")
    final = trainable_state(model)
    assert all(torch.allclose(final[n], states[1][n], atol=1e-6) for n in final)


def test_accelerate_places_the_model_on_the_asked_cuda_device(monkeypatch):
    """--device cuda:N: the loop makes cuda:N the current device, where accelerate's own placement puts it."""
    from icldistill.training import loop

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    loop._use_device(torch.device("cuda:1"))
    loop._use_device(torch.device("cpu"))
    assert calls == [torch.device("cuda:1")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_stays_on_the_explicit_cuda_device():
    n = torch.cuda.device_count() - 1
    model, make_batch, loss_fn = _toy()
    model = model.to(f"cuda:{n}")

    def batch(indices):
        return {k: v.to(f"cuda:{n}") if torch.is_tensor(v) else v for k, v in make_batch(indices).items()}

    fit(model, 8, batch, loss_fn, _opts(epochs=1), seed=0, cpu=False, progress=False)
    assert next(model.parameters()).device == torch.device(f"cuda:{n}")


def test_bf16_autocast_only_where_the_device_supports_it(monkeypatch):
    from icldistill.methods.finetune import mixed_precision_for
    from icldistill.models import loading

    assert mixed_precision_for("auto", torch.device("cpu")) == "no"
    assert mixed_precision_for("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(loading, "_cuda_has_native_bf16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert mixed_precision_for("auto", torch.device("cuda")) == "no"
    with pytest.raises(ModelError, match="no native bf16"):
        mixed_precision_for("bf16", torch.device("cuda"))
    monkeypatch.setattr(loading, "_cuda_has_native_bf16", lambda device: True)
    assert mixed_precision_for("auto", torch.device("cuda")) == "bf16"


# ------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_train_embeddings_keeps_tied_weights_tied(peft):
    model, make_batch, loss_fn = _toy(tie=True)
    assert embeddings_tied(model)
    before = model.get_input_embeddings().weight.detach().clone()
    opts = _opts(peft=peft, train_embeddings=True, epochs=2, lr=5e-2)
    model, _ = prepare_trainable(model, opts)
    fit(model, 8, make_batch, loss_fn, opts, seed=0, progress=False)
    base = model.get_base_model() if peft == "lora" else model
    ids = torch.randint(3, 200, (2, 5))
    # What the LM head computes is the (trained) input embedding: the two did not drift apart.
    with torch.no_grad():
        hidden = base.model(input_ids=ids).last_hidden_state
        head = base.lm_head(hidden)
        embedding = base.get_input_embeddings()
        tied_logits = hidden @ embedding(torch.arange(embedding.num_embeddings)).T
    assert torch.allclose(head, tied_logits, atol=1e-5)
    assert not torch.allclose(embedding(torch.arange(embedding.num_embeddings)), before)  # it did train


def test_bitfit_add_bias_artefact_loads_back_into_the_plain_base(tmp_path):
    from safetensors.torch import save_file

    trained = make_model("llama", 300, seed=3)
    trained, _ = prepare_trainable(trained, _opts(peft="bitfit", bitfit_fallback="add-bias"))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_()
    path = tmp_path / "trainable.safetensors"
    save_file(trainable_state(trained), str(path))
    ids = torch.randint(3, 300, (2, 6))
    fresh = make_model("llama", 300, seed=3)
    with torch.no_grad():
        base_logits = fresh(input_ids=ids).logits
        loaded = load_trainable(fresh, path)
        assert torch.allclose(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(base_logits, trained(input_ids=ids).logits, atol=1e-3)
    with pytest.raises(ConfigError, match="does not fit"):
        load_trainable(make_model("opt", 300), path)


# ------------------------------------------------------------------------------------ distillation details


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.floats(0.25, 4.0), st.integers(0, 1000))
def test_temperature_is_applied_per_context_before_averaging(contexts, T, seed):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(contexts, 5, 3, generator=g) * 3, -1)
    got = tempered_context_average(lp, T)
    want = torch.log(torch.stack([torch.softmax(c / T, -1) for c in lp]).mean(0))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.exp().sum(-1), torch.ones(5), atol=1e-5)
    if contexts > 1 and abs(T - 1) > 0.3:
        mixture = torch.logsumexp(lp, 0) - math.log(contexts)
        tempered_mixture = torch.log_softmax(mixture / T, -1)
        assert not torch.allclose(got, tempered_mixture, atol=1e-6) or torch.allclose(lp[0], lp[1])


def test_ce_target_teacher_uses_the_teachers_class_not_the_gold_label():
    from reference_losses import label_log_probs

    from icldistill.methods.distill import make_distill_loss
    from icldistill.methods.finetune import StudentBatch, student_logits
    from icldistill.training.losses import ce_loss
    from icldistill.training.teacher import TeacherSignal

    tok = make_tokenizer()
    model = make_model("llama", len(tok), seed=1)
    ids = torch.randint(3, len(tok), (4, 5))
    gold = torch.tensor([0, 0, 0, 0])
    teacher_lp = torch.log_softmax(torch.tensor([[0.0, 3.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]), -1)
    signal = TeacherSignal(["a", "b", "c", "d"], teacher_lp)
    label_ids = torch.tensor([5, 6])
    batch = StudentBatch(ids, torch.tensor([5] * 4), gold, [0, 1, 2, 3], ids.tolist(), [[[5], [6]]] * 4, 0, 20)

    student_lp = label_log_probs(student_logits(model, batch), label_ids)
    losses = {}
    for target in ("gold", "teacher"):
        config = build_config(DistillOptions, {"alpha": 0.0, "ce_target": target})
        losses[target] = make_distill_loss(config, lambda b: signal)(model, batch).loss
    assert torch.allclose(losses["gold"], ce_loss(student_lp, gold, reduction="sum"))
    assert torch.allclose(losses["teacher"], ce_loss(student_lp, torch.tensor([1, 0, 1, 1]), reduction="sum"))


def test_online_vocab_kl_keeps_only_the_real_vocabulary():
    from icldistill.training.signals import within_vocab
    from icldistill.training.teacher import TeacherSignal

    ids = torch.tensor([[7, 1, 5, 0, 6, 2, 3, 4]])  # a whole-width top-k of 8 logits; the tokenizer has 5
    lp = torch.log_softmax(torch.randn(1, 8), -1)
    kept = within_vocab(TeacherSignal(["q"], torch.zeros(1, 2), lp.clone(), ids.clone()), 5)
    assert kept.topk_ids.shape == (1, 5) and int(kept.topk_ids.max()) < 5
    assert set(kept.topk_ids[0].tolist()) == {0, 1, 2, 3, 4}
    assert torch.equal(kept.topk_logprobs[0], lp[0][ids[0] < 5])


def test_vocab_kl_compares_the_logit_widths_of_both_models(tmp_path, data_dir, cache_dir):
    """Same tokenizer, padded embedding on one side: the tokenizers agree, the logit widths do not."""
    from icldistill.methods.distill import run_distill

    tok = make_tokenizer()
    dirs = {}
    for name, width in (("teacher", len(tok) + 16), ("student", len(tok))):
        model = make_model("llama", width, seed=1)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    values = _common(tmp_path, data_dir, teacher=dirs["teacher"], student=dirs["student"], kl_space="vocab",
                     train_queries=4)
    with pytest.raises(ConfigError, match="--kl-space label"):
        run_distill(build_config(DistillOptions, values), progress=False)


def test_online_teacher_checks_the_maximum_length(data_dir, tmp_path):
    from icldistill.methods.common import prepare
    from icldistill.models.loading import load_model
    from icldistill.training.teacher import OnlineTeacher

    tok = make_tokenizer()
    model = make_model("llama", len(tok), seed=1, max_positions=512)
    setup = prepare(build_config(DistillOptions, dict(data_dir=str(data_dir), limit=2, shots=4)))
    demos = setup.demonstrations(0, 4)
    model.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    teacher = load_model(str(tmp_path / "t"), dtype="fp32", device="cpu")
    online = OnlineTeacher(teacher, setup.pattern, [demos])
    teacher.max_length = len(online.prefixes[0]) + 3  # the prefix fits, no query does
    with pytest.raises(IcldError, match="do not fit"):
        online(list(setup.train.examples[200:202]))


def test_the_cache_code_version_follows_the_source(tmp_path, monkeypatch):
    import sys

    from icldistill.training import teacher as teacher_mod

    module = tmp_path / "fake_signal_code.py"
    module.write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_signal_code", None)
    first = teacher_mod.signal_code_version(("fake_signal_code",))
    module.write_text("x = 2\n")
    teacher_mod.signal_code_version.cache_clear()
    second = teacher_mod.signal_code_version(("fake_signal_code",))
    assert first != second
    # And the key of a signal uses it.
    from icldistill.tasks.prompts import Pattern

    pattern = Pattern("p", "{premise}", (" Yes", " No"))
    identity = {"name": "t", "fingerprint": "f", "dtype": "float32"}
    key = teacher_mod.signal_key(identity, pattern, [[]], [], "d", 0)[0]
    monkeypatch.setattr(teacher_mod, "signal_code_version", lambda: "changed")
    assert teacher_mod.signal_key(identity, pattern, [[]], [], "d", 0)[0] != key


# ------------------------------------------------------------------------------------ hub revisions


def _fake_hub(root, repo: str, commit: str, tiny_dir) -> None:
    """A hub cache entry as huggingface_hub lays it out: snapshots/<commit>/ and refs/main."""
    import shutil

    base = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(tiny_dir, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


def test_hub_identity_uses_the_resolved_commit_before_and_after_download(tmp_path, tiny_dirs, monkeypatch):
    from huggingface_hub import HfApi, constants

    from icldistill.models import loading

    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import transformers.utils.hub as tf_hub

    if hasattr(tf_hub, "TRANSFORMERS_CACHE"):
        monkeypatch.setattr(tf_hub, "TRANSFORMERS_CACHE", str(hub))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    class Info:
        sha = commit

    monkeypatch.setattr(HfApi, "model_info", lambda self, name, revision=None, **kw: Info())
    before = loading.model_identity("tiny-org/tiny", dtype="fp32", device="cpu")
    _fake_hub(hub, "tiny-org/tiny", commit, tiny_dirs["student"])
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    after = loading.model_identity("tiny-org/tiny", dtype="fp32", device="cpu")
    assert before["fingerprint"] == after["fingerprint"] and after["commit"] == commit
    # As a process started with HF_HUB_OFFLINE=1 sees it (the constant is read at import): with the variable
    # alone, transformers still asked the (unreachable) hub for an adapter config, five tries and 23 s of backoff.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = loading.load_model("tiny-org/tiny", dtype="fp32", device="cpu", revision=commit)
    assert loaded.commit == commit and loaded.fingerprint == after["fingerprint"]


# ------------------------------------------------------------------------------------ OOD accuracy


def test_ood_accuracy_is_the_label_mean_on_every_hans_set():
    from icldistill.scoring.metrics import hans_ood_accuracy

    sub = {"accuracy": 0.9, "per_label": {"entailment": {"accuracy": 1.0}, "non-entailment": {"accuracy": 0.2}}}
    assert hans_ood_accuracy(sub)["ood_accuracy"] == pytest.approx(0.6)  # not the pooled 0.9
    whole = {**sub, "by_heuristic": {"lexical_overlap": {}, "subsequence": {}},
             "by_heuristic_label": {"lexical_overlap/entailment": {"accuracy": 1.0},
                                    "lexical_overlap/non-entailment": {"accuracy": 0.0},
                                    "subsequence/entailment": {"accuracy": 0.5},
                                    "subsequence/non-entailment": {"accuracy": 0.7}}}
    out = hans_ood_accuracy(whole)
    assert out["ood_accuracy_by_heuristic"] == pytest.approx({"lexical_overlap": 0.5, "subsequence": 0.6})
    assert hans_ood_accuracy({"per_label": {"entailment": {"accuracy": 1.0}}})["ood_accuracy"] is None


def test_icl_run_defines_ood_accuracy_for_hans_sub_and_const(tmp_path, data_dir, tiny_dirs, cache_dir):
    from icldistill.methods.icl import run_icl

    config = build_config(IclOptions, dict(model=str(tiny_dirs["student"]), eval=["hans-sub", "hans-const"], shots=2,
                                           limit=8, batch_size=8, data_dir=str(data_dir), dtype="fp32", device="cpu",
                                           output_dir=str(tmp_path / "icl")))
    record = run_icl(config, progress=False)
    for name in ("hans-sub", "hans-const"):
        m = record["seeds"]["0"]["eval"][name]
        labels = [m["per_label"][c]["accuracy"] for c in ("entailment", "non-entailment")]
        assert m["ood_accuracy"] == pytest.approx(sum(labels) / 2)
    assert record["labelled_examples"] == 2


# ------------------------------------------------------------------------------------ methods end to end


def test_pbft_label_budget_dev_split_and_evaluation_sets_scored_once(tmp_path, data_dir, tiny_dirs, cache_dir,
                                                                      monkeypatch):
    from icldistill.methods import finetune
    from icldistill.methods.pbft import run_pbft

    calls = []
    real = finetune.evaluate_on_sets
    monkeypatch.setattr(finetune, "evaluate_on_sets", lambda *a, **k: calls.append(1) or real(*a, **k))
    values = _common(tmp_path, data_dir, model=str(tiny_dirs["student"]), epochs=3, select="best")
    record = run_pbft(build_config(PbftOptions, values), progress=False)
    seed = record["seeds"]["0"]
    assert calls == [1]  # the evaluation sets: once, after training, never to choose a checkpoint
    assert [h["epoch"] for h in seed["history"]] == [1, 2, 3]
    assert all(h["dev_accuracy"] is not None and h["dev_loss"] > 0 for h in seed["history"])
    assert seed["selected"]["rule"] == "best" and 1 <= seed["selected"]["epoch"] <= 3
    # The label budget: k support examples, plus the dev labels that chose the checkpoint.
    assert seed["labelled_examples"] == 4 + 8
    assert not set(seed["dev_examples"]) & set(seed["train_examples"])
    res = seed["resources"]
    assert res["steps"] == 3 and res["examples_seen"] == 12 and res["planned_steps"] == 3
    peaks = res["peak_memory_mb"]
    assert peaks["overall"] == max(peaks["training"], peaks["inference"])


def test_distill_label_budget_gain_check_memory_and_shared_dev(tmp_path, data_dir, tiny_dirs, cache_dir, caplog):
    from icldistill.methods.distill import run_distill
    from icldistill.methods.pbft import run_pbft

    values = _common(tmp_path, data_dir, teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["student"]),
                     train_queries=8, alpha=0.5, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="icldistill.methods.distill"):
        gold = run_distill(build_config(DistillOptions, values), progress=False)
    seed = gold["seeds"]["0"]
    assert seed["labelled_examples"] == 4 + 8 and gold["labelled_examples"] == 12
    assert seed["resources"]["steps"] == 3 and seed["resources"]["examples_seen"] == 12
    gain = seed["teacher_icl_gain"]
    assert gain["dev_queries"] == 8
    assert gain["vs_student_zero_shot"]["accuracy"] == pytest.approx(
        gain["teacher_icl"]["accuracy"] - gain["student_zero_shot"]["accuracy"])
    assert gain["student_zero_shot"] == seed["dev_before_training"]
    icl, student = gain["teacher_icl"], gain["student_zero_shot"]
    assert gain["worth_distilling"] == (icl["accuracy"] > student["accuracy"]
                                        or (icl["accuracy"] == student["accuracy"] and icl["loss"] < student["loss"]))
    warned = any("no better than the student alone" in r.message for r in caplog.records)
    assert warned == (not gain["worth_distilling"])
    # Dev rows: disjoint from the demonstrations and the training queries.
    dev = set(seed["dev_examples"])
    assert len(dev) == 8 and not dev & set(seed["train_examples"]) and not dev & set(seed["demonstration_contexts"][0])
    # Memory as paid: the teacher pass and the training, each recorded, and the overall peak over both.
    peaks = seed["resources"]["peak_memory_mb"]
    assert peaks["overall"] == max(peaks["training"], peaks["inference"], peaks["teacher_pass"])
    assert seed["teacher_pass"]["cache_hit"] is False and seed["teacher_pass"]["wall_time_s"] > 0

    values.update(output_dir=str(tmp_path / "teacher-ce"), ce_target="teacher")
    teacher_ce = run_distill(build_config(DistillOptions, values), progress=False)
    assert teacher_ce["seeds"]["0"]["labelled_examples"] == 4  # the true few-shot setting
    assert teacher_ce["seeds"]["0"]["teacher_pass"]["cache_hit"] is True

    pbft = run_pbft(build_config(PbftOptions, _common(tmp_path, data_dir, model=str(tiny_dirs["student"]),
                                                      output_dir=str(tmp_path / "pbft"), max_steps=1)), progress=False)
    assert set(pbft["seeds"]["0"]["dev_examples"]) == dev  # one dev split for both methods of a seed


def test_gain_check_warns_only_when_the_teacher_is_no_better(caplog):
    from icldistill.methods.distill import icl_gain

    student = {"n": 8, "accuracy": 0.5, "loss": 0.7}
    cases = [({"n": 8, "accuracy": 0.75, "loss": 0.9}, True), ({"n": 8, "accuracy": 0.5, "loss": 0.6}, True),
             ({"n": 8, "accuracy": 0.5, "loss": 0.8}, False), ({"n": 8, "accuracy": 0.25, "loss": 0.5}, False)]
    for icl, worth in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="icldistill.methods.distill"):
            zero_shot = {"n": 8, "accuracy": 0.5, "loss": 0.7}
            gain = icl_gain({"teacher_icl": icl, "teacher_zero_shot": zero_shot}, student, 0)
        assert gain["teacher_icl_gain"]["worth_distilling"] is worth
        assert gain["teacher_icl_gain"]["vs_student_zero_shot"]["accuracy"] == pytest.approx(icl["accuracy"] - 0.5)
        assert any("no better than the student alone" in r.message for r in caplog.records) is (not worth)


def test_pbft_teacher_is_a_sweep_method_on_the_teacher_model():
    from icldistill.experiments.grid import expand

    experiment = expand({"teacher": "big", "student": "small", "grid": {"method": ["pbft-teacher", "pbft", "distill"],
                                                                        "ce_target": ["gold", "teacher"]}})
    by_method: dict[str, list] = {}
    for cell in experiment.cells:
        by_method.setdefault(cell.method, []).append(cell)
    assert [c.config.model for c in by_method["pbft-teacher"]] == ["big"]
    assert [c.config.model for c in by_method["pbft"]] == ["small"]
    assert sorted(c.config.ce_target for c in by_method["distill"]) == ["gold", "teacher"]


def test_a_pbft_teacher_cell_runs_pbft_on_the_teacher(tmp_path, data_dir, tiny_dirs, cache_dir):
    from icldistill.experiments.grid import expand
    from icldistill.experiments.sweep import run_cell

    experiment = expand({"teacher": str(tiny_dirs["teacher"]), "student": str(tiny_dirs["student"]),
                         **{k: v for k, v in _common(tmp_path, data_dir, max_steps=1).items() if k != "output_dir"},
                         "grid": {"method": ["pbft-teacher"]}}, output_dir=tmp_path / "sweep")
    (cell,) = experiment.cells
    record = run_cell(cell, progress=False)
    assert record["method"] == "pbft" and record["seeds"]["0"]["student"]["path"] == str(tiny_dirs["teacher"])


def test_collect_reads_budgets_and_memory_parts(tmp_path):
    from icldistill.experiments.results import collect

    cell_dir = tmp_path / "cells" / "distill"
    cell_dir.mkdir(parents=True)
    config = {"task": "mnli", "eval": ["hans-sub"], "shots": 4, "seeds": [0], "teacher": "t", "student": "s",
              "alpha": 0.5, "peft": "lora", "ce_target": "teacher"}
    (cell_dir / "cell.json").write_text(json.dumps({"id": "distill", "method": "distill", "config": config}))
    seed = {"labelled_examples": 4, "teacher_pass": {"peak_memory_mb": 900.0, "wall_time_s": 2.0, "cache_hit": False},
            "eval": {"hans-sub": {"n": 8, "accuracy": 0.9, "ood_accuracy": 0.5, "ood_metric": "label mean"}},
            "resources": {"training": {"peak_memory_mb": 300.0}, "steps": 6, "examples_seen": 48,
                          "peak_memory_mb": {"overall": 900.0, "training": 300.0}, "inference": {}}}
    (cell_dir / "results.json").write_text(json.dumps({"status": "complete", "seeds": {"0": seed}}))
    row = collect(tmp_path).iloc[0]
    assert row["peak_memory_mb"] == 900.0 and row["train_peak_memory_mb"] == 300.0
    assert row["teacher_peak_memory_mb"] == 900.0 and row["teacher_cache_hit"] == 0.0
    assert (row["labelled_examples"], row["steps"], row["examples_seen"]) == (4, 6, 48)
    assert row["ce_target"] == "teacher" and row["ood_accuracy"] == 0.5


def test_teacher_topk_above_the_vocabulary_fails_before_the_teacher_loads(tmp_path, data_dir, tiny_dirs, cache_dir,
                                                                         monkeypatch):
    from icldistill.methods.distill import run_distill
    from icldistill.models.loading import logit_width
    from icldistill.training import signals

    def no_weights(*args, **kwargs):
        raise AssertionError("the teacher's weights were loaded")

    monkeypatch.setattr(signals, "load_model", no_weights)
    width = logit_width(str(tiny_dirs["teacher"]))
    values = _common(tmp_path, data_dir, teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["teacher"]),
                     kl_space="vocab", train_queries=4, teacher_topk=width + 1)
    with pytest.raises(ConfigError, match=f"--teacher-topk {width + 1} exceeds .* vocabulary of {width}"):
        run_distill(build_config(DistillOptions, values), progress=False)
