"""The one training loop, on ``accelerate``: every method supplies its batches and its loss, not a loop.

AdamW, linear schedule with warm-up, gradient clipping, exact gradient accumulation (each micro-batch's
summed loss is divided by the number of examples in the whole optimiser step, so uneven micro-batches
weigh correctly), a step budget (``max_steps``, overriding epochs), evaluation on the dev split every
epoch or every N steps, selection of the best or the last evaluated state, a non-finite loss stops the
run, and a checkpoint at the end of every epoch that ``resume`` continues from.

Each dev evaluation appends a history entry with ``dev_accuracy`` and ``dev_loss`` and calls
``on_evaluate(epoch, metrics)``; the callback may raise :class:`StopTraining` to end the run there (the
hook a tuner's pruner uses, issue 14). The evaluation sets are never seen here: the caller scores them
once, on the selected state, after ``fit`` returns.

``fit`` reads as its steps: set up (``_Loop.start``), resume, then per epoch one optimiser step at a time
(``_Loop.step``, whose sums are a :class:`StepSums`), dev evaluation and selection (``_Loop.evaluate``)
and one checkpoint (``_Loop.checkpoint``; what a checkpoint holds is in ``training.checkpoint``).

Under N processes (``accelerate launch``) the loop is data-parallel: each optimiser step's examples
(the same global order as in one process) are split across ranks, and each rank's summed loss is
divided by the GLOBAL number of examples in the step and multiplied by N, because DDP (and FSDP)
average gradients over ranks; the gradient is then the single-process one. Logged sums are summed
over ranks, so the history reads the same for any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from icldistill.config import TrainOptions
from icldistill.errors import ConfigError, IcldError
from icldistill.runtime import distributed
from icldistill.runtime.records import over_attempts, peak_so_far, read_json
from icldistill.training import tracking
from icldistill.training.checkpoint import (
    BEST_FILE,
    CHECKPOINT,
    STATE_FILE,
    TRAINABLE_FILE,
    UNREADABLE,
    check_identity,
    complete_checkpoints,
    find_checkpoint,
    gathered_trainable_state,
    load_trainable,
    register_checkpoint_hooks,
    save_checkpoint,
    shards_parameters,
    trainable_state,
    unreadable_file,
)
from icldistill.training.losses import LossOutput

__all__ = ["BEST_FILE", "CHECKPOINT", "STATE_FILE", "TRAINABLE_FILE", "StepSums", "StopTraining", "TrainResult",
           "TrainingDiverged", "find_checkpoint", "fit", "gathered_trainable_state", "trainable_state"]

logger = logging.getLogger(__name__)


class TrainingDiverged(IcldError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class StopTraining(Exception):
    """Raised by an ``on_evaluate`` callback to end training after this evaluation (e.g. a pruned trial).

    ``fit`` catches it, keeps what was selected so far and returns normally, with ``stopped_early`` set.
    """


@dataclass
class TrainResult:
    """What the loop did: per-evaluation history, steps, tokens, and where it resumed from."""

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    epochs_done: int = 0
    train_examples_seen: int = 0
    train_tokens: int = 0
    resumed_from_epoch: int | None = None
    train_seconds: float = 0.0  # optimisation only (evaluation and checkpoints excluded), across resumes
    # Resumed runs: the training section's wall time and peak memory before the resume, as the checkpoint
    # recorded them ({} where it did not: a checkpoint older than these figures); None when not resumed.
    # ``methods.common.training_cost`` merges them with this attempt's measurement.
    before_resume: dict[str, Any] | None = None
    planned_steps: int = 0  # the step budget: max_steps, or steps per epoch x epochs
    stopped_early: bool = False  # an on_evaluate callback raised StopTraining
    # Which evaluated state the model holds on return: {"rule", "metric", "epoch", "step", "value"}.
    selected: dict[str, Any] | None = None
    # The trained tensors, gathered, where the model's parameters are sharded across ranks (FSDP,
    # DeepSpeed) and cannot be read from the model on rank 0 alone; None otherwise.
    final_trainable_state: dict[str, torch.Tensor] | None = None


@dataclass
class StepSums:
    """Loss terms SUMMED over examples (one rank's share of a step, a whole step, or an epoch).

    ``terms`` names the loss terms the method computes (PBFT has no KL), so a missing term logs as None,
    not as 0. ``n`` counts examples (filled in per step; the loop divides by it).
    """

    loss: float = 0.0
    kl: float = 0.0
    ce: float = 0.0
    tokens: float = 0.0
    n: int = 0
    terms: set[str] = field(default_factory=set)

    def add_output(self, out: LossOutput, tokens: int) -> None:
        """Add one micro-batch's (summed) loss output."""
        self.loss += out.loss.item()
        self.kl += out.kl.item() if out.kl is not None else 0.0
        self.ce += out.ce.item() if out.ce is not None else 0.0
        self.terms |= {name for name, value in (("kl", out.kl), ("ce", out.ce)) if value is not None}
        self.tokens += tokens

    def across_ranks(self, n: int) -> StepSums:
        """The sums over every rank's share of a step of ``n`` examples (the values themselves in one process)."""
        loss, kl, ce, tokens = distributed.sum_across([self.loss, self.kl, self.ce, self.tokens])
        return StepSums(loss, kl, ce, tokens, n, set(self.terms))

    def add(self, step: StepSums) -> None:
        """Add a whole step to an epoch's sums."""
        self.loss += step.loss
        self.kl += step.kl
        self.ce += step.ce
        self.n += step.n
        self.terms |= step.terms

    def mean(self, term: str) -> float | None:
        """The per-example mean of ``term`` ("loss", "kl", "ce"), None for a term the method does not compute."""
        if term != "loss" and term not in self.terms:
            return None
        return getattr(self, term) / max(self.n, 1)


# A batch is whatever the method's ``make_batch`` returns (a dataclass or a mapping); ``loss_fn`` must return
# SUMMED losses. Its ``n_tokens`` (attribute or key), where present, is counted in ``train_tokens``.
MakeBatch = Callable[[Sequence[int]], Any]
LossFn = Callable[[torch.nn.Module, Any], LossOutput]
Evaluate = Callable[[torch.nn.Module], dict[str, Any]]
"""Dev metrics of the model; must hold ``accuracy`` and ``loss`` (mean log-loss) for selection."""
OnEvaluate = Callable[[int, dict[str, Any]], None]


def _batch_tokens(batch: Any) -> int:
    if isinstance(batch, Mapping):
        return int(batch.get("n_tokens", 0))
    return int(getattr(batch, "n_tokens", 0))


def _use_device(device: torch.device) -> None:
    """Make an explicit ``cuda:N`` the current CUDA device, so accelerate's own placement (its device is the
    current one in a single process) keeps the model there instead of moving it to ``cuda:0``.

    Under a distributed launch accelerate assigns each rank its device itself, and this does nothing.
    """
    if device.type == "cuda" and device.index is not None and not distributed.launched():
        torch.cuda.set_device(device)


def _better(metric: str, value: float | None, best: float | None) -> bool:
    """Whether a dev ``value`` beats ``best`` (accuracy: higher; loss: lower); ties keep the earlier state."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best if metric == "accuracy" else value < best


@dataclass
class _Budget:
    """How long the run is: ``total`` optimiser steps over ``epochs`` epochs of ``per_epoch`` steps."""

    per_epoch: int
    total: int
    epochs: int

    @classmethod
    def of(cls, options: TrainOptions, n_examples: int) -> _Budget:
        per_epoch = math.ceil(n_examples / options.train_batch_size)
        max_steps = getattr(options, "max_steps", None)
        total = max_steps if max_steps else per_epoch * options.epochs
        return cls(per_epoch, total, math.ceil(total / per_epoch))


@dataclass
class _Loop:
    """The state the loop's steps share: the prepared model and optimiser, the result so far, the best state."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    options: TrainOptions
    budget: _Budget
    names: set[str]
    checkpoint_dir: Path | None
    evaluate_fn: Evaluate | None
    on_evaluate: OnEvaluate | None
    result: TrainResult
    best: dict[str, Any] = field(default_factory=dict)  # {"value", "epoch", "step"} of the best dev evaluation
    best_state: dict[str, torch.Tensor] | None = None
    identity: str | None = None  # the run's (runtime.rundir.identity_of), recorded in every checkpoint
    batch_source: Any = None  # the make_batch of fit: checkpointed with the loop where it keeps state
    started: float = field(default_factory=time.perf_counter)  # this attempt's start (for the training cost)

    @property
    def select(self) -> str:
        return getattr(self.options, "select", "last")

    @property
    def select_metric(self) -> str:
        return getattr(self.options, "select_metric", "accuracy")

    @classmethod
    def start(cls, model: torch.nn.Module, n_examples: int, options: TrainOptions, *, mixed_precision: str, cpu: bool,
              checkpoint_dir: Path | None, evaluate: Evaluate | None, on_evaluate: OnEvaluate | None) -> _Loop:
        """The accelerator, optimiser and schedule, prepared; the trackers started; the checkpoint hooks set."""
        _use_device(next(model.parameters()).device)
        # One scheduler step per optimiser step: accelerate would otherwise step it once per process,
        # assuming a dataloader sharded across ranks (here every rank walks the same global steps).
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, step_scheduler_with_optimizer=False,
                                  **tracking.accelerator_kwargs(options.report_to, checkpoint_dir))
        if options.report_to != "none":
            run_name = checkpoint_dir.parent.name if checkpoint_dir is not None else "run"
            accelerator.init_trackers(f"{run_name}-{checkpoint_dir.name}" if checkpoint_dir else run_name,
                                      config=tracking.hyperparameters(dataclasses.asdict(options)))
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        register_checkpoint_hooks(accelerator, names)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr,
                                      weight_decay=options.weight_decay)
        budget = _Budget.of(options, n_examples)
        scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(options.warmup_ratio * budget.total),
                                                    budget.total)
        if getattr(options, "select", "last") == "best" and shards_parameters(accelerator):
            raise IcldError("--select best is not available with sharded parameters (FSDP, DeepSpeed): the selected "
                            "state could not be restored into the sharded model; use --select last.")
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        return cls(accelerator, model, optimizer, scheduler, options, budget, names, checkpoint_dir, evaluate,
                   on_evaluate, TrainResult(planned_steps=budget.total))

    def resume(self) -> int:
        """Continue from the latest readable checkpoint under ``--resume``; returns the first epoch still to run.

        A truncated or corrupt checkpoint is skipped (with a warning naming its unreadable file) for the
        previous one where a kill left one; with none left, the error names the file and what to delete.
        """
        if not (self.options.resume and self.checkpoint_dir):
            return 0
        # Rank 0 picks the checkpoints and every rank loads the same one.
        candidates = distributed.broadcast(complete_checkpoints(self.checkpoint_dir))
        for i, ckpt in enumerate(candidates):
            try:
                return self._load(ckpt)
            except UNREADABLE as exc:
                bad = unreadable_file(ckpt)
                if i + 1 < len(candidates):
                    logger.warning("checkpoint file %s is unreadable (%s); skipped, resuming from %s instead",
                                   bad, exc, candidates[i + 1])
                    continue
                raise IcldError(f"Cannot resume: the checkpoint file {bad} is unreadable ({type(exc).__name__}: "
                                f"{exc}); it was truncated or corrupted. Delete {ckpt} to train this seed from the "
                                "start, or run without --resume.") from None
        return 0

    def _load(self, ckpt: Path) -> int:
        """Restore the model, optimiser, schedule, RNG, result so far and best state from ``ckpt``."""
        check_identity(ckpt, self.identity)  # a checkpoint of another run is refused, never resumed
        self.accelerator.load_state(str(ckpt))
        state = read_json(ckpt / STATE_FILE)
        self.result = TrainResult(state["history"], state["steps"], state["epochs_done"], state["train_examples_seen"],
                                  state["train_tokens"], resumed_from_epoch=state["epochs_done"],
                                  train_seconds=state["train_seconds"], planned_steps=self.budget.total,
                                  before_resume=state.get("training_cost") or {})
        self.best = state.get("best") or {}
        self.best_state = load_file(str(ckpt / BEST_FILE)) if self.best and (ckpt / BEST_FILE).exists() else None
        if state.get("batch_source") is not None and hasattr(self.batch_source, "load_state_dict"):
            self.batch_source.load_state_dict(state["batch_source"])
        logger.info("resumed from %s after epoch %d", ckpt, state["epochs_done"])
        return state["epochs_done"]

    def _forward_backward(self, step_indices: list[int], make_batch: MakeBatch, loss_fn: LossFn) -> StepSums:
        """Every micro-batch of this rank's share of one step, forward and backward; this rank's sums.

        Each micro-batch's summed loss is divided by the GLOBAL number of examples in the step (times the
        number of ranks, which DDP averages over), so the gradient is the single-process one.
        """
        micro = self.options.train_batch_size // self.options.grad_accum
        world = distributed.num_processes()
        local, share = distributed.split_step(step_indices)
        n_micro = math.ceil(share / micro)  # the same on every rank
        sums = StepSums()
        for m in range(n_micro):
            chunk = local[m * micro : (m + 1) * micro]
            # A rank whose share runs out still runs every forward/backward the others run (DDP and FSDP
            # synchronise inside them), on a stand-in example whose loss counts zero.
            batch = make_batch(chunk or step_indices[:1])
            # Gradients are all-reduced once per step, in the last micro-batch's backward.
            with contextlib.nullcontext() if m == n_micro - 1 else self.accelerator.no_sync(self.model):
                out = loss_fn(self.model, batch)
                loss = out.loss / len(step_indices) if chunk else out.loss * 0.0
                if world > 1:
                    loss = loss * world  # DDP averages over ranks; the sum over ranks is what is wanted
                self.accelerator.backward(loss)
            if chunk:
                sums.add_output(out, _batch_tokens(batch))
        return sums

    def step(self, step_indices: list[int], make_batch: MakeBatch, loss_fn: LossFn, epoch: int) -> StepSums:
        """One optimiser step over ``step_indices``; returns its sums over every rank."""
        step_start = time.perf_counter()
        sums = self._forward_backward(step_indices, make_batch, loss_fn).across_ranks(len(step_indices))
        # Checked on the sum over ranks, so every rank stops at the same step (a rank raising alone
        # would leave the others waiting in a collective); the optimiser has not stepped yet.
        if not math.isfinite(sums.loss):
            kept = (f"The last good checkpoint is kept in {self.checkpoint_dir / CHECKPOINT}. "
                    if self.checkpoint_dir else "")
            raise TrainingDiverged(
                f"The training loss became {sums.loss / len(step_indices)} at epoch {epoch + 1}, "
                f"step {self.result.steps + 1}. " + kept
                + "Lower --lr, or use --dtype bf16 or fp32 (fp16 overflows; the paper saw NaN with it)."
            )
        self.result.train_tokens += int(sums.tokens)
        grad_norm = None
        if self.options.max_grad_norm > 0:
            # All of the model's parameters (frozen ones have no gradient): under FSDP accelerate only
            # computes the global norm when it is handed exactly the prepared model's parameters.
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.options.max_grad_norm)
        self.accelerator.log(tracking.step_values(
            sums.loss / sums.n, sums.mean("kl"), sums.mean("ce"), self.scheduler.get_last_lr()[0],
            float(grad_norm) if grad_norm is not None else None), step=self.result.steps + 1)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.result.steps += 1
        self.result.train_examples_seen += len(step_indices)
        self.result.train_seconds += time.perf_counter() - step_start
        return sums

    def evaluate(self, epoch: int, extra: dict[str, Any]) -> None:
        """A history entry for ``epoch``; with an ``evaluate`` function, the dev metrics and the selection.

        The callback ``on_evaluate`` runs last and may raise :class:`StopTraining`.
        """
        result = self.result
        if self.evaluate_fn is None:
            result.history.append({"epoch": epoch, "step": result.steps, **extra})
            return
        self.model.eval()
        metrics = self.evaluate_fn(self.accelerator.unwrap_model(self.model))
        self.model.train()
        entry = {"epoch": epoch, "step": result.steps, **extra, "dev_accuracy": metrics.get("accuracy"),
                 "dev_loss": metrics.get("loss"), "dev": metrics}
        result.history.append(entry)
        value = entry["dev_accuracy"] if self.select_metric == "accuracy" else entry["dev_loss"]
        if self.select == "best" and _better(self.select_metric, value, self.best.get("value")):
            self.best = {"value": value, "epoch": epoch, "step": result.steps}
            # Every rank takes part (FSDP gathers collectively); the copy lives on the CPU.
            # (Cloned: on the CPU the "copy" would otherwise share storage with the live parameters.)
            state = gathered_trainable_state(self.accelerator, self.model, self.names)
            self.best_state = {n: t.clone() for n, t in state.items()}
        self.accelerator.log(tracking.eval_values(metrics, prefix="dev"), step=result.steps)
        if self.on_evaluate is not None:
            self.on_evaluate(epoch, metrics)  # may raise StopTraining

    def checkpoint(self) -> None:
        """The end-of-epoch checkpoint, with the best dev state so far (so a resumed run selects the same one)."""
        if self.checkpoint_dir is None or not self.options.save_every_epoch:
            return
        r = self.result
        save_checkpoint(self.accelerator, self.checkpoint_dir, {
            "epochs_done": r.epochs_done, "steps": r.steps, "history": r.history,
            "train_examples_seen": r.train_examples_seen, "train_tokens": r.train_tokens,
            "train_seconds": r.train_seconds, "best": self.best or None, "identity": self.identity,
            "training_cost": self.cost_so_far(),
            "batch_source": self.batch_source.state_dict() if hasattr(self.batch_source, "state_dict") else None,
        }, extra_files={BEST_FILE: self.best_state} if self.best_state is not None else None)

    def cost_so_far(self) -> dict[str, Any]:
        """The training section's wall time and peak memory up to now, over every attempt (what a checkpoint
        keeps for a resumed run's record); {} once an earlier attempt's figures are unknown."""
        before = self.result.before_resume
        if before == {}:
            return {}
        return over_attempts(before, time.perf_counter() - self.started, peak_so_far(self.accelerator.device))

    def epoch(self, epoch: int, n_examples: int, seed: int, make_batch: MakeBatch, loss_fn: LossFn, bar: Any) -> None:
        """One epoch's optimiser steps (in an order that depends only on seed and epoch), then its end."""
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        sums = StepSums()
        evaluated_at = -1
        for start in range(0, n_examples, self.options.train_batch_size):
            if self.result.steps >= self.budget.total:  # the step budget ends part-way through this epoch
                break
            sums.add(self.step(order[start : start + self.options.train_batch_size], make_batch, loss_fn, epoch))
            bar.update(1)
            bar.set_postfix(loss=f"{sums.loss / sums.n:.4f}")
            if self.options.eval_every > 0 and self.result.steps % self.options.eval_every == 0:
                evaluated_at = self.result.steps
                self.evaluate(epoch + 1, {"lr": self.scheduler.get_last_lr()[0]})
        self.end_epoch(epoch, sums, evaluated_at)

    def end_epoch(self, epoch: int, sums: StepSums, evaluated_at: int) -> None:
        """The epoch's log line and history entry (with a dev evaluation where due), then the checkpoint.

        Dev evaluation after every epoch (eval_every 0), and always after the last step, so that the
        selection sees the final state; -1 never evaluates. A :class:`StopTraining` from the evaluation
        still leaves this epoch's checkpoint.
        """
        stats = {"train_loss": sums.mean("loss"), "train_kl": sums.mean("kl"), "train_ce": sums.mean("ce"),
                 "lr": self.scheduler.get_last_lr()[0]}
        parts = ", ".join(f"{t} {stats['train_' + t]:.4f}" for t in ("kl", "ce") if t in sums.terms)
        logger.info("epoch %d/%d: loss %.4f (%s)", epoch + 1, self.budget.epochs, stats["train_loss"], parts)
        self.result.epochs_done = epoch + 1
        last = self.result.steps >= self.budget.total
        eval_every = self.options.eval_every
        stopped: StopTraining | None = None
        if eval_every == 0 or (eval_every > 0 and last and evaluated_at != self.result.steps):
            try:
                self.evaluate(epoch + 1, stats)
            except StopTraining as exc:
                stopped = exc
        else:
            self.result.history.append({"epoch": epoch + 1, "step": self.result.steps, **stats})
        self.checkpoint()
        if stopped is not None:
            raise stopped

    def finish(self) -> TrainResult:
        """Close the trackers, put the selected state in the model, and free the training memory."""
        # Flush and close the trackers; not accelerator.end_training(), which also destroys the process group
        # that the final evaluation and the teacher pass of the next seed still need.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        result, metric = self.result, self.select_metric
        if self.select == "best" and self.best_state is not None:
            load_trainable(self.accelerator.unwrap_model(self.model), self.best_state)
            result.selected = {"rule": "best", "metric": f"dev_{metric}", **self.best}
        else:
            last_dev = next((h for h in reversed(result.history) if "dev_accuracy" in h), None)
            result.selected = {"rule": "last", "metric": f"dev_{metric}", "epoch": result.epochs_done,
                               "step": result.steps,
                               "value": None if last_dev is None or last_dev["step"] != result.steps
                               else last_dev[f"dev_{metric}"]}
        if shards_parameters(self.accelerator):
            result.final_trainable_state = gathered_trainable_state(self.accelerator, self.model, self.names)
        self.accelerator.unwrap_model(self.model).eval()
        # Drop the optimiser state and the accelerator's references, so that what follows (the final
        # evaluation, measured as the inference cost) does not carry the training memory.
        self.optimizer = self.scheduler = None
        self.accelerator.free_memory()
        return result


def fit(
    model: torch.nn.Module,
    n_examples: int,
    make_batch: MakeBatch,
    loss_fn: LossFn,
    options: TrainOptions,
    *,
    seed: int,
    mixed_precision: str = "no",
    cpu: bool = True,
    checkpoint_dir: Path | None = None,
    evaluate: Evaluate | None = None,
    on_evaluate: OnEvaluate | None = None,
    progress: bool = True,
    identity: str | None = None,
) -> TrainResult:
    """Train ``model`` on examples ``0..n_examples-1`` for ``options.epochs`` epochs or ``options.max_steps`` steps.

    ``make_batch(indices)`` builds a micro-batch; ``loss_fn(model, batch)`` returns the loss SUMMED
    over the micro-batch (``LossOutput`` with reduction "sum"). ``evaluate(model)`` returns dev metrics
    (``accuracy``, ``loss``), recorded in the history after every epoch (or every ``options.eval_every``
    steps, and after the last step); ``on_evaluate(epoch, metrics)`` is called after each and may raise
    :class:`StopTraining`. With ``options.select == "best"`` the model ends in the evaluated state with
    the best dev ``options.select_metric`` (its trainable tensors are kept, also across a resume);
    otherwise in the last state. ``identity`` (the run's) is recorded in every checkpoint, and a resume
    refuses a checkpoint that records another.
    The example order of epoch e depends only on (seed, e), so a resumed run sees the same batches,
    and so does every rank of a distributed run (each takes its share of each step). A ``make_batch``
    that keeps state across steps (the on-policy signal's samples) offers ``state_dict()`` (JSON-able) and
    ``load_state_dict(state)``: its state travels in every checkpoint (rank 0's), so a resumed run trains
    on what the uninterrupted one would. ``options.gradient_checkpointing`` recomputes activations in the
    backward pass (:func:`activation_checkpointing`) for the whole of training.
    """
    if n_examples < 1:
        raise IcldError("No training examples: check --shots / --train-queries.")
    with activation_checkpointing(model, getattr(options, "gradient_checkpointing", False)):
        loop = _Loop.start(model, n_examples, options, mixed_precision=mixed_precision, cpu=cpu,
                           checkpoint_dir=checkpoint_dir, evaluate=evaluate, on_evaluate=on_evaluate)
        loop.identity, loop.batch_source = identity, make_batch
        start_epoch = loop.resume()
        bar = tqdm(total=loop.budget.total, initial=loop.result.steps, desc="train", unit="step",
                   disable=not progress or not distributed.is_main(), leave=False)
        loop.model.train()
        try:
            for epoch in range(start_epoch, loop.budget.epochs):
                if loop.result.steps >= loop.budget.total:
                    break
                loop.epoch(epoch, n_examples, seed, make_batch, loss_fn, bar)
        except StopTraining:
            loop.result.stopped_early = True
            logger.info("training stopped by on_evaluate after step %d", loop.result.steps)
        bar.close()
        return loop.finish()


@contextlib.contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Train with transformers' activation (gradient) checkpointing when ``enabled``; off again afterwards.

    Each layer keeps only its input and recomputes the rest in the backward pass: the same numbers (dropout
    replays its random state) for a second forward through the layers. Non-reentrant checkpointing, so a
    LoRA model whose embeddings are frozen still gets gradients without ``enable_input_require_grads``. It
    only acts in train mode: on-policy sampling and dev evaluation (eval mode, no gradients) run as before.
    """
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--gradient-checkpointing: {type(model).__name__} does not support activation "
                          "checkpointing in transformers; train without it (or with a smaller --train-batch-size "
                          "or a larger --grad-accum).")
    # transformers 5.25 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn).
    on = getattr(model, "activation_checkpointing_enable", None)
    if on is not None:
        on(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        off()
