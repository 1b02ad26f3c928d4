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

Checkpoints use ``Accelerator.save_state`` with a pre-hook that stores only the trainable parameters:
the frozen base model is already on disk, and a LoRA checkpoint is then megabytes, not the model.

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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from icldistill.runtime import distributed
from icldistill.config import TrainOptions
from icldistill.errors import IcldError
from icldistill.models.adapters import copy_parameters, save_tensors
from icldistill.training import tracking
from icldistill.training.losses import LossOutput
from icldistill.runtime.records import atomic_write_json, read_json

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"


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
    planned_steps: int = 0  # the step budget: max_steps, or steps per epoch x epochs
    stopped_early: bool = False  # an on_evaluate callback raised StopTraining
    # Which evaluated state the model holds on return: {"rule", "metric", "epoch", "step", "value"}.
    selected: dict[str, Any] | None = None
    # The trained tensors, gathered, where the model's parameters are sharded across ranks (FSDP,
    # DeepSpeed) and cannot be read from the model on rank 0 alone; None otherwise.
    final_trainable_state: dict[str, torch.Tensor] | None = None


# A batch is whatever the method's ``make_batch`` returns; ``loss_fn`` must return SUMMED losses.
MakeBatch = Callable[[Sequence[int]], dict[str, Any]]
LossFn = Callable[[torch.nn.Module, dict[str, Any]], LossOutput]
Evaluate = Callable[[torch.nn.Module], dict[str, Any]]
"""Dev metrics of the model; must hold ``accuracy`` and ``loss`` (mean log-loss) for selection."""
OnEvaluate = Callable[[int, dict[str, Any]], None]
BEST_FILE = "best.safetensors"


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _shards_parameters(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def gathered_trainable_state(accelerator: Accelerator, model: torch.nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The trainable tensors of the prepared ``model``, whole, on rank 0 (other ranks may get an empty dict).

    With sharded parameters (FSDP, DeepSpeed) every rank must call this: accelerate gathers the state
    dict collectively. Otherwise the unwrapped model's parameters are read directly.
    """
    if _shards_parameters(accelerator):
        full = accelerator.get_state_dict(model)
        return {n: t.detach().cpu().contiguous() for n, t in full.items() if n in names}
    return trainable_state(accelerator.unwrap_model(model))


def _register_checkpoint_hooks(accelerator: Accelerator, names: set[str]) -> None:
    """Make save_state/load_state store only the trainable parameters of the (single) model.

    ``save_state`` runs on every rank (it writes per-rank RNG states, and FSDP shards); the trainable
    file is written by rank 0 alone. Under FSDP accelerate restores the model itself and hands the
    load hook no models.
    """

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            state = gathered_trainable_state(accelerator, model, names)
            if accelerator.is_main_process:
                save_tensors(state, Path(output_dir) / TRAINABLE_FILE)
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            state = load_file(str(Path(input_dir) / TRAINABLE_FILE))
            params = dict(model.named_parameters())
            unknown = [n for n in state if n not in params]
            if unknown:
                raise IcldError(f"Checkpoint {input_dir} does not match the model (unknown {unknown[:3]}); "
                                "start without --resume or use another --output-dir.")
            copy_parameters(params, state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _save_checkpoint(accelerator: Accelerator, directory: Path, state: dict[str, Any],
                     extra_files: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write the checkpoint next to the old one, then swap, so a kill leaves one complete checkpoint.

    Every rank takes part in ``save_state``; the clean-up, the state file and the swap are rank 0's,
    between barriers, so no rank writes into a directory that is being renamed.
    """
    final, tmp, old = directory / CHECKPOINT, directory / f"{CHECKPOINT}.tmp", directory / f"{CHECKPOINT}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, tensors in (extra_files or {}).items():
            save_tensors(tensors, tmp / name)
        atomic_write_json(tmp / STATE_FILE, state)  # written last: marks the checkpoint complete
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _maybe_checkpoint(accelerator: Accelerator, checkpoint_dir: Path | None, options: TrainOptions, result: TrainResult,
                      best: dict[str, Any], best_state: dict[str, torch.Tensor] | None) -> None:
    """The end-of-epoch checkpoint, with the best dev state so far (so a resumed run selects the same one)."""
    if checkpoint_dir is None or not options.save_every_epoch:
        return
    _save_checkpoint(accelerator, checkpoint_dir, {
        "epochs_done": result.epochs_done, "steps": result.steps, "history": result.history,
        "train_examples_seen": result.train_examples_seen, "train_tokens": result.train_tokens,
        "train_seconds": result.train_seconds, "best": best or None,
    }, extra_files={BEST_FILE: best_state} if best_state is not None else None)


def _load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors back into ``model`` (the selected checkpoint)."""
    copy_parameters(dict(model.named_parameters()), state)


def find_checkpoint(directory: Path) -> Path | None:
    """The latest complete checkpoint in ``directory`` (also one left mid-swap by a kill), or None."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        path = directory / name
        if (path / STATE_FILE).exists() and (path / TRAINABLE_FILE).exists():
            return path
    return None


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
) -> TrainResult:
    """Train ``model`` on examples ``0..n_examples-1`` for ``options.epochs`` epochs or ``options.max_steps`` steps.

    ``make_batch(indices)`` builds a micro-batch; ``loss_fn(model, batch)`` returns the loss SUMMED
    over the micro-batch (``LossOutput`` with reduction "sum"). ``evaluate(model)`` returns dev metrics
    (``accuracy``, ``loss``), recorded in the history after every epoch (or every ``options.eval_every``
    steps, and after the last step); ``on_evaluate(epoch, metrics)`` is called after each and may raise
    :class:`StopTraining`. With ``options.select == "best"`` the model ends in the evaluated state with
    the best dev ``options.select_metric`` (its trainable tensors are kept, also across a resume);
    otherwise in the last state.
    The example order of epoch e depends only on (seed, e), so a resumed run sees the same batches,
    and so does every rank of a distributed run (each takes its share of each step).
    """
    if n_examples < 1:
        raise IcldError("No training examples: check --shots / --train-queries.")
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
    _register_checkpoint_hooks(accelerator, names)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = math.ceil(n_examples / options.train_batch_size)
    max_steps = getattr(options, "max_steps", None)
    total_steps = max_steps if max_steps else steps_per_epoch * options.epochs
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    select = getattr(options, "select", "last")
    select_metric = getattr(options, "select_metric", "accuracy")
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(options.warmup_ratio * total_steps), total_steps)
    if select == "best" and _shards_parameters(accelerator):
        raise IcldError("--select best is not available with sharded parameters (FSDP, DeepSpeed): the selected "
                        "state could not be restored into the sharded model; use --select last.")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    micro = options.train_batch_size // options.grad_accum
    world = distributed.num_processes()

    result = TrainResult(planned_steps=total_steps)
    best: dict[str, Any] = {}  # {"value", "epoch", "step"} of the best dev evaluation so far
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch = 0
    # Rank 0 picks the checkpoint and every rank loads that one.
    ckpt = distributed.broadcast(find_checkpoint(checkpoint_dir)) if options.resume and checkpoint_dir else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = read_json(ckpt / STATE_FILE)
        start_epoch = state["epochs_done"]
        result = TrainResult(state["history"], state["steps"], state["epochs_done"], state["train_examples_seen"],
                             state["train_tokens"], resumed_from_epoch=start_epoch, train_seconds=state["train_seconds"],
                             planned_steps=total_steps)
        best = state.get("best") or {}
        if best and (ckpt / BEST_FILE).exists():
            best_state = load_file(str(ckpt / BEST_FILE))
        logger.info("resumed from %s after epoch %d", ckpt, start_epoch)

    def run_eval(epoch: int, extra: dict[str, Any]) -> None:
        nonlocal best, best_state
        if evaluate is None:
            result.history.append({"epoch": epoch, "step": result.steps, **extra})
            return
        model.eval()
        metrics = evaluate(accelerator.unwrap_model(model))
        model.train()
        entry = {"epoch": epoch, "step": result.steps, **extra, "dev_accuracy": metrics.get("accuracy"),
                 "dev_loss": metrics.get("loss"), "dev": metrics}
        result.history.append(entry)
        value = entry["dev_accuracy"] if select_metric == "accuracy" else entry["dev_loss"]
        if select == "best" and _better(select_metric, value, best.get("value")):
            best = {"value": value, "epoch": epoch, "step": result.steps}
            # Every rank takes part (FSDP gathers collectively); the copy lives on the CPU.
            # (Cloned: on the CPU the "copy" would otherwise share storage with the live parameters.)
            best_state = {n: t.clone() for n, t in gathered_trainable_state(accelerator, model, names).items()}
        accelerator.log(tracking.eval_values(metrics, prefix="dev"), step=result.steps)
        if on_evaluate is not None:
            on_evaluate(epoch, metrics)  # may raise StopTraining

    bar = tqdm(total=total_steps, initial=result.steps, desc="train", unit="step",
               disable=not progress or not distributed.is_main(), leave=False)
    model.train()
    try:
        for epoch in range(start_epoch, n_epochs):
            if result.steps >= total_steps:
                break
            order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
            sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "n": 0}
            terms: set[str] = set()  # the loss terms the method computes (PBFT has no KL)
            evaluated_at = -1
            for start in range(0, n_examples, options.train_batch_size):
                if result.steps >= total_steps:  # the step budget ends part-way through this epoch
                    break
                step_start = time.perf_counter()
                step_indices = order[start : start + options.train_batch_size]
                local, share = distributed.split_step(step_indices)
                n_micro = math.ceil(share / micro)  # the same on every rank
                local_sums = [0.0, 0.0, 0.0, 0.0]  # loss, kl, ce, tokens of this rank's examples
                for m in range(n_micro):
                    chunk = local[m * micro : (m + 1) * micro]
                    # A rank whose share runs out still runs every forward/backward the others run (DDP and FSDP
                    # synchronise inside them), on a stand-in example whose loss counts zero.
                    batch = make_batch(chunk or step_indices[:1])
                    # Gradients are all-reduced once per step, in the last micro-batch's backward.
                    with contextlib.nullcontext() if m == n_micro - 1 else accelerator.no_sync(model):
                        out = loss_fn(model, batch)
                        loss = out.loss / len(step_indices) if chunk else out.loss * 0.0
                        if world > 1:
                            loss = loss * world  # DDP averages over ranks; the sum over ranks is what is wanted
                        accelerator.backward(loss)
                    if chunk:
                        local_sums[0] += out.loss.item()
                        local_sums[1] += out.kl.item() if out.kl is not None else 0.0
                        local_sums[2] += out.ce.item() if out.ce is not None else 0.0
                        terms |= {name for name, value in (("kl", out.kl), ("ce", out.ce)) if value is not None}
                        local_sums[3] += int(batch.get("n_tokens", 0))
                loss_sum, kl_sum, ce_sum, tokens = distributed.sum_across(local_sums)
                # Checked on the sum over ranks, so every rank stops at the same step (a rank raising alone
                # would leave the others waiting in a collective); the optimiser has not stepped yet.
                if not math.isfinite(loss_sum):
                    raise TrainingDiverged(
                        f"The training loss became {loss_sum / len(step_indices)} at epoch {epoch + 1}, "
                        f"step {result.steps + 1}. "
                        + (f"The last good checkpoint is kept in {checkpoint_dir / CHECKPOINT}. " if checkpoint_dir else "")
                        + "Lower --lr, or use --dtype bf16 or fp32 (fp16 overflows; the paper saw NaN with it)."
                    )
                sums["loss"] += loss_sum
                sums["kl"] += kl_sum
                sums["ce"] += ce_sum
                result.train_tokens += int(tokens)
                sums["n"] += len(step_indices)
                grad_norm = None
                if options.max_grad_norm > 0:
                    # All of the model's parameters (frozen ones have no gradient): under FSDP accelerate only
                    # computes the global norm when it is handed exactly the prepared model's parameters.
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm)
                n_step = len(step_indices)
                accelerator.log(tracking.step_values(
                    loss_sum / n_step, kl_sum / n_step if out.kl is not None else None,
                    ce_sum / n_step if out.ce is not None else None, scheduler.get_last_lr()[0],
                    float(grad_norm) if grad_norm is not None else None), step=result.steps + 1)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                result.train_examples_seen += len(step_indices)
                result.train_seconds += time.perf_counter() - step_start
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}")
                if options.eval_every > 0 and result.steps % options.eval_every == 0:
                    evaluated_at = result.steps
                    run_eval(epoch + 1, {"lr": scheduler.get_last_lr()[0]})
            n = max(sums["n"], 1)
            epoch_stats = {"train_loss": sums["loss"] / n,
                           "train_kl": sums["kl"] / n if "kl" in terms else None,
                           "train_ce": sums["ce"] / n if "ce" in terms else None,
                           "lr": scheduler.get_last_lr()[0]}
            parts = ", ".join(f"{t} {epoch_stats['train_' + t]:.4f}" for t in ("kl", "ce") if t in terms)
            logger.info("epoch %d/%d: loss %.4f (%s)", epoch + 1, n_epochs, epoch_stats["train_loss"], parts)
            result.epochs_done = epoch + 1
            last = result.steps >= total_steps
            # Dev evaluation after every epoch (eval_every 0), and always after the last step, so that the
            # selection sees the final state; -1 never evaluates.
            if options.eval_every == 0 or (options.eval_every > 0 and last and evaluated_at != result.steps):
                try:
                    run_eval(epoch + 1, epoch_stats)
                except StopTraining:
                    _maybe_checkpoint(accelerator, checkpoint_dir, options, result, best, best_state)
                    raise
                _maybe_checkpoint(accelerator, checkpoint_dir, options, result, best, best_state)
            else:
                result.history.append({"epoch": epoch + 1, "step": result.steps, **epoch_stats})
                _maybe_checkpoint(accelerator, checkpoint_dir, options, result, best, best_state)
    except StopTraining:
        result.stopped_early = True
        logger.info("training stopped by on_evaluate after step %d", result.steps)
    bar.close()
    # Flush and close the trackers; not accelerator.end_training(), which also destroys the process group
    # that the final evaluation and the teacher pass of the next seed still need.
    for tracker in accelerator.trackers:
        tracker.finish()
    if select == "best" and best_state is not None:
        _load_trainable(accelerator.unwrap_model(model), best_state)
        result.selected = {"rule": "best", "metric": f"dev_{select_metric}", **best}
    else:
        last_dev = next((h for h in reversed(result.history) if "dev_accuracy" in h), None)
        result.selected = {"rule": "last", "metric": f"dev_{select_metric}", "epoch": result.epochs_done,
                           "step": result.steps,
                           "value": None if last_dev is None or last_dev["step"] != result.steps
                           else last_dev[f"dev_{select_metric}"]}
    if _shards_parameters(accelerator):
        result.final_trainable_state = gathered_trainable_state(accelerator, model, names)
    accelerator.unwrap_model(model).eval()
    # Drop the optimiser state and the accelerator's references, so that what follows (the final
    # evaluation, measured as the inference cost) does not carry the training memory.
    del optimizer, scheduler
    accelerator.free_memory()
    return result
