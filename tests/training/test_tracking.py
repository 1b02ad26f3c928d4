"""Training curves through accelerate's trackers: TensorBoard written offline and read back."""

from __future__ import annotations

import math

import pytest
from tiny import toy_training_problem

from icldistill.config import TRACKERS, TrainOptions, build_config
from icldistill.errors import ConfigError
from icldistill.models.adapters import prepare_trainable
from icldistill.training import tracking
from icldistill.training.loop import fit
from icldistill.training.losses import LossOutput


def _problem():
    """tiny.toy_training_problem with a second loss term (half the CE, as a stand-in KL), so both terms are logged."""
    model, make_batch, loss_fn = toy_training_problem()

    def two_terms(m, batch):
        ce = loss_fn(m, batch).loss
        kl = 0.5 * ce
        return LossOutput(ce + kl, kl.detach(), ce.detach())

    return model, make_batch, two_terms


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The scalars file sits in the run directory; add_hparams writes another in a timestamped subdirectory.
    files = sorted(log_dir.rglob("events.out.tfevents.*"), key=lambda p: len(p.parts))
    assert files, f"no TensorBoard event file under {log_dir}"
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_read_back_equal_the_logged_losses(tmp_path):
    pytest.importorskip("tensorboard")
    opts = build_config(TrainOptions, dict(epochs=2, lr=5e-3, train_batch_size=4, warmup_ratio=0.0,
                                           lora_dropout=0.0, report_to="tensorboard"))
    model, make_batch, loss_fn = _problem()
    model, _ = prepare_trainable(model, opts)
    seed_dir = tmp_path / "run" / "seed-0"
    result = fit(model, 8, make_batch, loss_fn, opts, seed=0, checkpoint_dir=seed_dir,
                 evaluate=lambda m: {"accuracy": 0.625, "loss": 0.5, "n": 8}, progress=False)
    scalars = _scalars(seed_dir / tracking.LOG_DIR)
    for tag in ("train/loss", "train/kl", "train/ce", "train/lr", "train/grad_norm"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
    # Two steps of 4 examples per epoch: the epoch's mean loss is the mean of its two logged steps.
    for epoch, entry in enumerate(h for h in result.history if "train_loss" in h):
        steps = [v for s, v in scalars["train/loss"] if 2 * epoch < s <= 2 * epoch + 2]
        assert math.isclose(sum(steps) / 2, entry["train_loss"], rel_tol=1e-5)
        kl = [v for s, v in scalars["train/kl"] if 2 * epoch < s <= 2 * epoch + 2]
        assert math.isclose(sum(kl) / 2, entry["train_kl"], rel_tol=1e-5)
    # No warm-up, linear decay over 4 steps: the rate each step used, not the one after it.
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([5e-3, 3.75e-3, 2.5e-3, 1.25e-3])
    # The dev evaluations after each epoch, at their optimiser steps.
    assert scalars["dev/accuracy"] == [(2, pytest.approx(0.625)), (4, pytest.approx(0.625))]
    assert scalars["dev/loss"] == [(2, pytest.approx(0.5)), (4, pytest.approx(0.5))]


def test_no_tracker_writes_no_logs(tmp_path):
    opts = build_config(TrainOptions, dict(epochs=1, lr=5e-3, train_batch_size=4, warmup_ratio=0.0))
    model, make_batch, loss_fn = _problem()
    model, _ = prepare_trainable(model, opts)
    fit(model, 8, make_batch, loss_fn, opts, seed=0, checkpoint_dir=tmp_path / "seed-0", progress=False)
    assert not (tmp_path / "seed-0" / tracking.LOG_DIR).exists()


def test_a_tracker_that_is_not_installed_is_refused_before_training(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        tracking.check_tracker("wandb")
    with pytest.raises(ConfigError, match="choose one of"):
        build_config(TrainOptions, {"report_to": "nope"})


def test_every_tracker_choice_names_its_package():
    assert set(TRACKERS) - {"none"} == set(tracking.TRACKER_PACKAGES)


def test_hyperparameters_are_scalars_trackers_accept():
    flat = tracking.hyperparameters({"lr": 1e-5, "eval": ["mnli-m", "hans-lo"], "pattern": None, "resume": False})
    assert flat == {"lr": 1e-5, "eval": "mnli-m,hans-lo", "pattern": "none", "resume": False}
