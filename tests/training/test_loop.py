"""The training loop and the two training methods on tiny models and real MNLI rows."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_model, toy_training_problem

from icldistill.config import DistillOptions, PbftOptions, TrainOptions, build_config
from icldistill.errors import ConfigError, IcldError
from icldistill.models.adapters import prepare_trainable
from icldistill.training.loop import TrainingDiverged, find_checkpoint, fit
from icldistill.training.losses import LossOutput


def _opts(**kw) -> TrainOptions:
    base = dict(epochs=3, lr=5e-3, train_batch_size=4, warmup_ratio=0.0, lora_dropout=0.0)
    base.update(kw)
    return build_config(TrainOptions, base)


def _toy_problem(arch="llama", seed=0):
    """A tiny model and a fixed set of 8 token sequences with binary targets on two tokens."""
    return toy_training_problem(arch, seed)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_is_exact():
    """One step over 8 examples == the same step as 2 x 4 or 4 x 2 micro-batches (fp32, no dropout)."""
    results = []
    for accum in (1, 2, 4):
        model, make_batch, loss_fn = _toy_problem()
        model, _ = prepare_trainable(model, _opts(peft="none"))
        fit(model, 8, make_batch, loss_fn, _opts(peft="none", epochs=1, train_batch_size=8, grad_accum=accum),
            seed=0, progress=False)
        results.append(_trainable(model))
    for other in results[1:]:
        for name, value in results[0].items():
            assert torch.allclose(value, other[name], atol=1e-6), name


def test_loss_falls_and_checkpoint_resume_equals_uninterrupted(tmp_path):
    opts = _opts(peft="lora", epochs=3)
    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    full = fit(model, 8, make_batch, loss_fn, opts, seed=0, checkpoint_dir=tmp_path / "a",
               evaluate=lambda m: {"ok": 1}, progress=False)
    losses = [h["train_loss"] for h in full.history]
    assert losses[-1] < losses[0]
    reference = _trainable(model)

    # A run killed during epoch 2's evaluation (after epoch 1's checkpoint), then resumed.
    calls = {"n": 0}

    def dying_eval(m):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return {"ok": 1}

    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    with pytest.raises(KeyboardInterrupt):
        fit(model, 8, make_batch, loss_fn, opts, seed=0, checkpoint_dir=tmp_path / "b", evaluate=dying_eval,
            progress=False)
    assert find_checkpoint(tmp_path / "b") is not None
    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    resumed = fit(model, 8, make_batch, loss_fn, _opts(peft="lora", epochs=3, resume=True), seed=0,
                  checkpoint_dir=tmp_path / "b", evaluate=lambda m: {"ok": 1}, progress=False)
    assert resumed.resumed_from_epoch == 1
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(losses, abs=1e-6)
    for name, value in reference.items():
        assert torch.allclose(value, _trainable(model)[name], atol=1e-6), name


def test_checkpoint_holds_only_trainable_parameters(tmp_path):
    opts = _opts(peft="lora", epochs=1)
    model, make_batch, loss_fn = _toy_problem()
    model, summary = prepare_trainable(model, opts)
    fit(model, 8, make_batch, loss_fn, opts, seed=0, checkpoint_dir=tmp_path, progress=False)
    from safetensors.torch import load_file

    saved = load_file(str(find_checkpoint(tmp_path) / "trainable.safetensors"))
    assert sum(t.numel() for t in saved.values()) == summary.trainable
    assert all("lora_" in n for n in saved)


def test_non_finite_loss_stops_with_a_message():
    model, make_batch, _ = _toy_problem()
    model, _ = prepare_trainable(model, _opts(peft="none"))

    def nan_loss(m, batch):
        out = m(input_ids=batch["input_ids"], logits_to_keep=1).logits.sum() * float("nan")
        return LossOutput(out, None, None)

    with pytest.raises(TrainingDiverged, match="Lower --lr"):
        fit(model, 8, make_batch, nan_loss, _opts(peft="none", epochs=1), seed=0, progress=False)


def test_bitfit_on_a_bias_free_model():
    model = make_model("llama", 300)
    with pytest.raises(ConfigError, match="no biases|has none"):
        prepare_trainable(model, _opts(peft="bitfit"))
    ids = torch.randint(3, 300, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model, summary = prepare_trainable(model, _opts(peft="bitfit", bitfit_fallback="add-bias"))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)  # zero-initialised biases change nothing at the start
    assert summary.trainable > 0 and all(".bias" in g for g in summary.groups)
    assert summary.notes


def test_bitfit_on_opt_trains_only_biases():
    model = make_model("opt", 300)
    model, summary = prepare_trainable(model, _opts(peft="bitfit"))
    assert all(g.endswith("bias") for g in summary.groups)
    assert summary.trainable == sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias")
                                    and "embed" not in n and "lm_head" not in n)


def test_lora_defaults_and_frozen_embeddings():
    model = make_model("opt", 300)
    model, summary = prepare_trainable(model, _opts(peft="lora", lora_r=8))
    assert set(summary.groups) <= {g for g in summary.groups if "lora_" in g}
    assert any("q_proj" in g for g in summary.groups) and any("v_proj" in g for g in summary.groups)
    assert not any("embed" in g or "lm_head" in g for g in summary.groups)
    with pytest.raises(ConfigError, match="do not exist"):
        prepare_trainable(make_model("opt", 300), _opts(peft="lora", lora_targets=["nope"]))


# ------------------------------------------------------------------------------------- methods end to end


def _common(tmp_path, data_dir, **kw):
    base = dict(task="mnli", eval=["mnli-m", "hans-lo"], shots=4, seeds=[0], limit=12, batch_size=8,
                data_dir=str(data_dir), output_dir=str(tmp_path / "out"), epochs=3, lr=1e-2, train_batch_size=4,
                warmup_ratio=0.0, lora_dropout=0.0, dtype="fp32", device="cpu")
    base.update(kw)
    return base


def test_pbft_end_to_end(tmp_path, data_dir, tiny_dirs, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from icldistill.methods.pbft import run_pbft

    config = build_config(PbftOptions, _common(tmp_path, data_dir, model=str(tiny_dirs["student"])))
    record = run_pbft(config, progress=False)
    assert record["status"] == "complete"
    seed = record["seeds"]["0"]
    losses = [h["train_loss"] for h in seed["history"]]
    assert losses[-1] < losses[0]
    assert len(seed["train_examples"]) == 4  # the k support examples
    assert seed["trainable"]["trainable_parameters"] > 0
    assert set(record["aggregate"]) == {"mnli-m", "hans-lo"}
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["status"] == "complete"
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    PeftModel.from_pretrained(base, seed["artefacts"]["adapter"])  # loadable in peft format


def test_distill_kl_falls_and_teacher_cache_is_reused(tmp_path, data_dir, tiny_dirs, cache_dir):
    from icldistill.methods.distill import run_distill

    values = _common(tmp_path, data_dir, teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["student"]),
                     train_queries=16, alpha=1.0, epochs=4, teacher_contexts=2)
    first = run_distill(build_config(DistillOptions, values), progress=False)
    seed = first["seeds"]["0"]
    kls = [h["train_kl"] for h in seed["history"]]
    assert kls[-1] < 0.7 * kls[0], kls
    contexts = seed["demonstration_contexts"]
    assert len(contexts) == 2 and contexts[0] != contexts[1]
    assert first["teacher_pass"]["cache_hits"] == 0 and first["teacher_pass"]["teacher_loaded"]
    assert not set(seed["train_examples"]) & set(seed["demonstration_contexts"][0])

    values["output_dir"] = str(tmp_path / "again")
    second = run_distill(build_config(DistillOptions, values), progress=False)
    assert second["teacher_pass"]["cache_hits"] == 1 and not second["teacher_pass"]["teacher_loaded"]
    assert second["seeds"]["0"]["history"][-1]["train_kl"] == pytest.approx(kls[-1], rel=1e-5)

    # A corrupt cache entry is detected and recomputed, not used (one epoch: the key holds no training option).
    entry = cache_dir / "teacher" / f"{first['teacher_pass']['keys']['0']}.safetensors"
    entry.write_bytes(entry.read_bytes()[:-8])
    values.update(output_dir=str(tmp_path / "third"), epochs=1)
    third = run_distill(build_config(DistillOptions, values), progress=False)
    assert third["teacher_pass"]["cache_hits"] == 0 and third["teacher_pass"]["teacher_loaded"]
    assert third["teacher_pass"]["keys"] == first["teacher_pass"]["keys"]  # the corrupt entry's key, recomputed


def test_cached_signal_equals_online_signal(data_dir, tiny_dirs):
    from icldistill.methods.common import prepare
    from icldistill.models.loading import load_model
    from icldistill.training.teacher import OnlineTeacher, compute_signal

    setup = prepare(build_config(DistillOptions, dict(data_dir=str(data_dir), limit=4, shots=4)))
    teacher = load_model(str(tiny_dirs["teacher"]), dtype="fp32", device="cpu")
    contexts = [setup.demonstrations(0, 4, context=j) for j in range(2)]
    queries = list(setup.train.examples[100:110])
    cached = compute_signal(teacher, setup.pattern, contexts, queries, batch_size=3, topk=5, progress=False)
    online = OnlineTeacher(teacher, setup.pattern, contexts)(queries[:6], topk=5)
    assert torch.allclose(cached.label_logprobs[:6], online.label_logprobs, atol=1e-5)
    assert torch.equal(cached.topk_ids[:6], online.topk_ids)


def test_online_distillation_runs_and_learns(tmp_path, data_dir, tiny_dirs, cache_dir):
    from icldistill.methods.distill import run_distill

    values = _common(tmp_path, data_dir, teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["student"]),
                     train_queries=8, alpha=0.5, epochs=3, teacher_signal="online", kl_space="vocab")
    record = run_distill(build_config(DistillOptions, values), progress=False)
    kls = [h["train_kl"] for h in record["seeds"]["0"]["history"]]
    assert kls[-1] < kls[0]


def test_vocab_kl_refuses_different_tokenizers(tmp_path, data_dir, tiny_dirs, cache_dir):
    from icldistill.methods.distill import run_distill

    values = _common(tmp_path, data_dir, teacher=str(tiny_dirs["other"]), student=str(tiny_dirs["student"]),
                     kl_space="vocab", train_queries=4)
    with pytest.raises(ConfigError, match="--kl-space label"):
        run_distill(build_config(DistillOptions, values), progress=False)


def test_merge_saves_a_plain_model_equal_to_the_adapter(tmp_path, data_dir, tiny_dirs, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from icldistill.methods.pbft import run_pbft

    config = build_config(PbftOptions, _common(tmp_path, data_dir, model=str(tiny_dirs["student"]), merge=True,
                                               epochs=2, eval=["mnli-m"], limit=4))
    artefacts = run_pbft(config, progress=False)["seeds"]["0"]["artefacts"]
    merged = AutoModelForCausalLM.from_pretrained(artefacts["merged"]).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]),
                                        artefacts["adapter"]).eval()
    ids = torch.randint(3, 250, (2, 7))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])(input_ids=ids).logits
    assert not torch.allclose(merged(input_ids=ids).logits, base, atol=1e-5)  # training changed something


# ------------------------------------------------------------------------------------ unreadable files on --resume


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _run_until(opts, directory, die_at_eval):
    """A run killed during its ``die_at_eval``-th dev evaluation (every earlier epoch is checkpointed)."""
    calls = {"n": 0}

    def dying_eval(m):
        calls["n"] += 1
        if calls["n"] == die_at_eval:
            raise KeyboardInterrupt
        return {"ok": 1}

    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    with pytest.raises(KeyboardInterrupt):
        fit(model, 8, make_batch, loss_fn, opts, seed=0, checkpoint_dir=directory, evaluate=dying_eval,
            progress=False)


@pytest.mark.parametrize("name", ["trainable.safetensors", "trainer_state.json"])
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one_and_resumes_exactly(tmp_path, caplog, name):
    import shutil

    opts = _opts(peft="lora", epochs=3)
    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    fit(model, 8, make_batch, loss_fn, opts, seed=0, checkpoint_dir=tmp_path / "a", evaluate=lambda m: {"ok": 1},
        progress=False)
    reference = _trainable(model)

    run = tmp_path / "b"
    _run_until(opts, run, die_at_eval=2)  # checkpoint after epoch 1
    shutil.copytree(run / "checkpoint", tmp_path / "epoch-1")
    _run_until(_opts(peft="lora", epochs=3, resume=True), run, die_at_eval=2)  # now after epoch 2
    # A kill during the swap leaves the previous checkpoint as checkpoint.old; the new one is then damaged.
    shutil.copytree(tmp_path / "epoch-1", run / "checkpoint.old")
    _truncate(run / "checkpoint" / name)

    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    with caplog.at_level("WARNING", logger="icldistill.training.loop"):
        resumed = fit(model, 8, make_batch, loss_fn, _opts(peft="lora", epochs=3, resume=True), seed=0,
                      checkpoint_dir=run, evaluate=lambda m: {"ok": 1}, progress=False)
    assert str(run / "checkpoint" / name) in caplog.text and "skipped" in caplog.text
    assert resumed.resumed_from_epoch == 1
    for key, value in reference.items():
        assert torch.equal(value, _trainable(model)[key]), key


def test_a_corrupt_checkpoint_with_no_previous_one_names_the_file_and_what_to_delete(tmp_path):
    opts = _opts(peft="lora", epochs=3)
    _run_until(opts, tmp_path, die_at_eval=2)
    _truncate(tmp_path / "checkpoint" / "trainable.safetensors")
    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    with pytest.raises(IcldError) as caught:
        fit(model, 8, make_batch, loss_fn, _opts(peft="lora", epochs=3, resume=True), seed=0, checkpoint_dir=tmp_path,
            evaluate=lambda m: {"ok": 1}, progress=False)
    message = str(caught.value)
    assert str(tmp_path / "checkpoint" / "trainable.safetensors") in message
    assert f"Delete {tmp_path / 'checkpoint'}" in message and "--resume" in message


def test_a_truncated_seed_result_on_resume_names_its_file(tmp_path, data_dir, tiny_dirs, cache_dir):
    from icldistill.methods.pbft import run_pbft

    values = _common(tmp_path, data_dir, model=str(tiny_dirs["student"]), epochs=1, resume=True)
    run_pbft(build_config(PbftOptions, values), progress=False)
    done = tmp_path / "out" / "seed-0" / "seed_result.json"
    _truncate(done)
    with pytest.raises(IcldError) as caught:
        run_pbft(build_config(PbftOptions, values), progress=False)
    assert str(done) in str(caught.value) and "Delete it" in str(caught.value)


# ------------------------------------------------------------------------------------ disk full (issue 21 case 11)

_TORCH_FULL = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
               "file write failed")


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_resuming_after_freeing_space_is_exact(tmp_path, monkeypatch,
                                                                                              writer):
    """The second checkpoint's write fails (safetensors' file, or torch.save's C++ writer under accelerate):
    one line naming the checkpoint, saying nothing is lost; the partial checkpoint is gone, the first kept."""
    import errno

    import safetensors.torch

    opts = _opts(peft="lora", epochs=3)
    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    fit(model, 8, make_batch, loss_fn, opts, seed=0, checkpoint_dir=tmp_path / "a", evaluate=lambda m: {"ok": 1},
        progress=False)
    reference = _trainable(model)

    run = tmp_path / "b"
    real = safetensors.torch.save_file if writer == "safetensors" else torch.save

    def full_after_the_first_checkpoint(*args, **kwargs):
        if (run / "checkpoint").exists():
            if writer == "safetensors":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError(_TORCH_FULL)
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_after_the_first_checkpoint) if writer == "safetensors" \
        else monkeypatch.setattr(torch, "save", full_after_the_first_checkpoint)
    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    with pytest.raises(IcldError) as caught:
        fit(model, 8, make_batch, loss_fn, opts, seed=0, checkpoint_dir=run, evaluate=lambda m: {"ok": 1},
            progress=False)
    message = str(caught.value)
    assert str(run / "checkpoint.tmp") in message and "\n" not in message
    assert ("No space left on device" if writer == "safetensors" else "inline_container") in message
    assert "Nothing written before is lost" in message and "free disk space" in message and "--resume" in message
    assert not (run / "checkpoint.tmp").exists()  # the partial checkpoint is removed: it only took space
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["epochs_done"] == 1

    monkeypatch.undo()  # space freed
    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    resumed = fit(model, 8, make_batch, loss_fn, _opts(peft="lora", epochs=3, resume=True), seed=0,
                  checkpoint_dir=run, evaluate=lambda m: {"ok": 1}, progress=False)
    assert resumed.resumed_from_epoch == 1
    for name, value in reference.items():
        assert torch.equal(value, _trainable(model)[name]), name


def _full_disk_at(monkeypatch, artefact: str, seed_dir) -> None:
    """The write of one of a seed's final artefacts fails with a full disk (nothing else does)."""
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if artefact == "adapter":
        from peft import PeftModel

        monkeypatch.setattr(PeftModel, "save_pretrained", full)
    elif artefact == "merged":
        from transformers import PreTrainedModel

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    else:
        import safetensors.torch

        real = safetensors.torch.save_file

        def full_for_the_seed(tensors, filename, *args, **kwargs):
            if str(filename) == str(seed_dir / "trainable.safetensors"):
                full()
            return real(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(safetensors.torch, "save_file", full_for_the_seed)


@pytest.mark.parametrize("artefact", ["adapter", "merged", "trainable"])
def test_a_full_disk_saving_the_trained_model_is_one_line_and_a_resume_retrains_nothing(tmp_path, data_dir, tiny_dirs,
                                                                                        cache_dir, monkeypatch,
                                                                                        artefact):
    """Issue 21 case 11: the adapter, the --merge model, BitFit's tensors on a full disk."""
    from icldistill.methods.pbft import run_pbft

    extra = {"merge": True} if artefact == "merged" else {}
    if artefact == "trainable":
        extra = {"peft": "bitfit", "bitfit_fallback": "add-bias"}
    values = _common(tmp_path, data_dir, model=str(tiny_dirs["student"]), epochs=2, eval=["mnli-m"], limit=4,
                     **extra)
    reference = run_pbft(build_config(PbftOptions, {**values, "output_dir": str(tmp_path / "ref")}),
                         progress=False)["seeds"]["0"]
    seed_dir = tmp_path / "out" / "seed-0"
    _full_disk_at(monkeypatch, artefact, seed_dir)
    with pytest.raises(IcldError) as caught:
        run_pbft(build_config(PbftOptions, values), progress=False)
    message = str(caught.value)
    assert str(seed_dir) in message and "No space left on device" in message and "\n" not in message
    assert "Nothing written before is lost" in message and "--resume" in message
    assert not (seed_dir / "seed_result.json").exists()

    monkeypatch.undo()
    resumed = run_pbft(build_config(PbftOptions, {**values, "resume": True}), progress=False)["seeds"]["0"]
    assert resumed["resources"]["resumed_from_epoch"] == 2  # the last checkpoint: nothing is trained again
    assert resumed["eval"]["mnli-m"]["accuracy"] == reference["eval"]["mnli-m"]["accuracy"]
    assert set(resumed["artefacts"]) == set(reference["artefacts"])


# ------------------------------------------------------------------------------ the run's identity in a checkpoint


def test_a_checkpoint_records_the_run_identity_and_another_run_cannot_resume_it(tmp_path):
    opts = _opts(peft="lora", epochs=3)
    calls = {"n": 0}

    def dying_eval(m):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return {"ok": 1}

    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    with pytest.raises(KeyboardInterrupt):
        fit(model, 8, make_batch, loss_fn, opts, seed=0, checkpoint_dir=tmp_path, evaluate=dying_eval,
            progress=False, identity="run-a")
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["identity"] == "run-a"

    model, make_batch, loss_fn = _toy_problem()
    model, _ = prepare_trainable(model, opts)
    with pytest.raises(ConfigError) as caught:
        fit(model, 8, make_batch, loss_fn, _opts(peft="lora", epochs=3, resume=True), seed=0, checkpoint_dir=tmp_path,
            evaluate=lambda m: {"ok": 1}, progress=False, identity="run-b")
    message = str(caught.value)
    assert str(tmp_path / "checkpoint") in message and "another run" in message and "run-a" in message
    resumed = fit(model, 8, make_batch, loss_fn, _opts(peft="lora", epochs=3, resume=True), seed=0,
                  checkpoint_dir=tmp_path, evaluate=lambda m: {"ok": 1}, progress=False, identity="run-a")
    assert resumed.resumed_from_epoch == 1


def test_a_trained_seed_s_checkpoint_carries_the_identity_of_its_run(tmp_path, data_dir, tiny_dirs, cache_dir):
    from icldistill.methods.pbft import run_pbft

    run_pbft(build_config(PbftOptions, _common(tmp_path, data_dir, model=str(tiny_dirs["student"]), epochs=1,
                                               eval=["mnli-m"], limit=4)), progress=False)
    recorded = json.loads((tmp_path / "out" / "results.json").read_text())["identity"]
    state = json.loads((tmp_path / "out" / "seed-0" / "checkpoint" / "trainer_state.json").read_text())
    assert recorded and state["identity"] == recorded


# ------------------------------------------------------------------------------ teacher cache (issue 21 cases 12, 14)


def _signal():
    from icldistill.training.teacher import TeacherSignal

    return TeacherSignal(["q0", "q1"], torch.log_softmax(torch.randn(2, 3), dim=-1), contexts=[["d0"]])


@pytest.mark.parametrize("meta", ["[]", "null", "1", '"text"', "{}", '{"sha256": null'])
def test_a_teacher_cache_meta_file_that_is_not_an_entry_is_recomputed_not_a_crash(tmp_path, caplog, meta):
    from icldistill.tasks.data import Example
    from icldistill.training.teacher import SignalCache

    cache, signal = SignalCache(tmp_path), _signal()
    queries = [Example(id=q, fields={"text": q}, label=0) for q in signal.query_ids]
    cache.save("k", signal, {"what": "test"})
    assert torch.equal(cache.load("k", queries).label_logprobs, signal.label_logprobs)
    cache.paths("k")[1].write_text(meta, encoding="utf-8")
    with caplog.at_level("WARNING", logger="icldistill.training.teacher"):
        assert cache.load("k", queries) is None
    assert "unusable" in caplog.text and "recomputing" in caplog.text
    cache.save("k", signal, {"what": "test"})  # the recomputed signal replaces it
    assert torch.equal(cache.load("k", queries).label_logprobs, signal.label_logprobs)


def test_a_teacher_cache_that_cannot_be_written_names_cache_dir(tmp_path):
    from icldistill.training.teacher import SignalCache

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    with pytest.raises(IcldError) as caught:
        SignalCache(blocker / "teacher").save("k", _signal(), {})
    message = str(caught.value)
    assert "--cache-dir" in message and "--output-dir" not in message and str(blocker) in message


# ------------------------------------------------------------------------ a resumed run's training cost


def test_a_resumed_runs_training_cost_covers_the_attempts_before_the_resume(tmp_path, data_dir, tiny_dirs,
                                                                            monkeypatch):
    """The peak and wall time of the training before a kill travel in the checkpoint: the resumed seed's record
    reports the larger peak and the summed time, not only what the attempt after the resume measured."""
    from icldistill.experiments.results import partial_training
    from icldistill.methods.pbft import run_pbft
    from icldistill.training import loop

    values = _common(tmp_path, data_dir, model=str(tiny_dirs["student"]), epochs=3, eval=["mnli-m"], limit=4,
                     select="best", dev_queries=4)
    big = 10.0 ** 7  # MB: far above any real peak, so it can only come from the first attempt's checkpoint
    monkeypatch.setattr(loop, "peak_so_far", lambda device=None: big)
    calls = {"n": 0}
    real_checkpoint = loop._Loop.checkpoint

    def dying_after_the_first_checkpoint(self):
        real_checkpoint(self)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop._Loop, "checkpoint", dying_after_the_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_pbft(build_config(PbftOptions, values), progress=False)
    monkeypatch.undo()
    seed = run_pbft(build_config(PbftOptions, {**values, "resume": True}), progress=False)["seeds"]["0"]
    training = seed["resources"]["training"]
    assert seed["resources"]["resumed_from_epoch"] == 1
    assert training["peak_memory_mb"] == big and training["measured"] == "whole"
    assert seed["resources"]["peak_memory_mb"]["overall"] == big
    assert not partial_training(seed["resources"])

    # A checkpoint without these figures (written before they were kept): the record says what it covers.
    from icldistill.training.checkpoint import STATE_FILE

    state_file = find_checkpoint(tmp_path / "out" / "seed-0") / STATE_FILE
    state = json.loads(state_file.read_text())
    state.pop("training_cost")
    state_file.write_text(json.dumps(state))
    (tmp_path / "out" / "seed-0" / "seed_result.json").unlink()
    again = run_pbft(build_config(PbftOptions, {**values, "resume": True}), progress=False)["seeds"]["0"]
    assert again["resources"]["training"]["measured"].startswith("after epoch 3")
    assert again["resources"]["training"]["peak_memory_mb"] < big and partial_training(again["resources"])


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize(("arch", "peft"), [("llama", "lora"), ("opt", "bitfit"), ("gemma3", "none")])
def test_gradient_checkpointing_trains_the_same_weights_and_recomputes_every_layer(arch, peft):
    """--gradient-checkpointing changes memory, not numbers: the same trained weights (LoRA dropout on, so the
    recompute must replay its random state), each decoder layer's modules run twice per micro-batch, and it is
    off afterwards."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    trained, calls = [], []
    for on in (False, True):
        model, make_batch, loss_fn = _toy_problem(arch)
        opts = _opts(peft=peft, epochs=2, lora_dropout=0.2, gradient_checkpointing=on)
        model, _ = prepare_trainable(model, opts)
        layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
        inner = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))  # the recompute calls it again
        count = [0]
        inner.register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        torch.manual_seed(0)
        fit(model, 8, make_batch, loss_fn, opts, seed=0, progress=False)
        assert not _checkpointing(model)  # exported, evaluated and sampled from as before
        trained.append(_trainable(model))
        calls.append(count[0])
    assert calls[1] == 2 * calls[0] > 0
    assert trained[0].keys() == trained[1].keys()
    for name, value in trained[0].items():
        assert torch.allclose(value, trained[1][name], atol=1e-6), name


def test_gradient_checkpointing_is_refused_by_name_for_a_model_without_it():
    class Plain(torch.nn.Module):
        supports_gradient_checkpointing = False

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(ConfigError, match=r"--gradient-checkpointing: Plain does not support"):
        fit(Plain(), 8, lambda i: i, lambda m, b: None, _opts(gradient_checkpointing=True), seed=0, progress=False)
