"""The one training loop, on ``accelerate``: every method supplies its batches and its loss, not a loop.

AdamW, linear schedule with warm-up, gradient clipping, exact gradient accumulation (each micro-batch's
summed loss is divided by the number of examples in the whole optimiser step, so uneven micro-batches
weigh correctly), evaluation every epoch or every N steps, a non-finite loss stops the run, and a
checkpoint at the end of every epoch that ``resume`` continues from.

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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from icldistill.runtime import distributed
from icldistill.config import TrainOptions
from icldistill.errors import IcldError
from icldistill.training.losses import LossOutput
from icldistill.runtime.records import atomic_write_json, read_json

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"


class TrainingDiverged(IcldError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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
    # The trained tensors, gathered, where the model's parameters are sharded across ranks (FSDP,
    # DeepSpeed) and cannot be read from the model on rank 0 alone; None otherwise.
    final_trainable_state: dict[str, torch.Tensor] | None = None


# A batch is whatever the method's ``make_batch`` returns; ``loss_fn`` must return SUMMED losses.
MakeBatch = Callable[[Sequence[int]], dict[str, Any]]
LossFn = Callable[[torch.nn.Module, dict[str, Any]], LossOutput]
Evaluate = Callable[[torch.nn.Module], dict[str, Any]]


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
                save_file(state, str(Path(output_dir) / TRAINABLE_FILE))
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
            with torch.no_grad():
                for n, t in state.items():
                    params[n].copy_(t.to(params[n].device, params[n].dtype))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _save_checkpoint(accelerator: Accelerator, directory: Path, state: dict[str, Any]) -> None:
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
        atomic_write_json(tmp / STATE_FILE, state)  # written last: marks the checkpoint complete
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


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
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on examples ``0..n_examples-1`` for ``options.epochs`` epochs.

    ``make_batch(indices)`` builds a micro-batch; ``loss_fn(model, batch)`` returns the loss SUMMED
    over the micro-batch (``LossOutput`` with reduction "sum"). ``evaluate(model)`` returns metrics,
    recorded in the history after each epoch but the last (or every ``options.eval_every`` steps);
    the final evaluation is the caller's.
    The example order of epoch e depends only on (seed, e), so a resumed run sees the same batches,
    and so does every rank of a distributed run (each takes its share of each step).
    """
    if n_examples < 1:
        raise IcldError("No training examples: check --shots / --train-queries.")
    # One scheduler step per optimiser step: accelerate would otherwise step it once per process,
    # assuming a dataloader sharded across ranks (here every rank walks the same global steps).
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, step_scheduler_with_optimizer=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    _register_checkpoint_hooks(accelerator, names)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = math.ceil(n_examples / options.train_batch_size)
    total_steps = steps_per_epoch * options.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(options.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    micro = options.train_batch_size // options.grad_accum
    world = distributed.num_processes()

    result = TrainResult()
    start_epoch = 0
    # Rank 0 picks the checkpoint and every rank loads that one.
    ckpt = distributed.broadcast(find_checkpoint(checkpoint_dir)) if options.resume and checkpoint_dir else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = read_json(ckpt / STATE_FILE)
        start_epoch = state["epochs_done"]
        result = TrainResult(state["history"], state["steps"], state["epochs_done"], state["train_examples_seen"],
                             state["train_tokens"], resumed_from_epoch=start_epoch, train_seconds=state["train_seconds"])
        logger.info("resumed from %s after epoch %d", ckpt, start_epoch)

    def run_eval(epoch: int, extra: dict[str, Any]) -> None:
        if evaluate is None:
            return
        model.eval()
        metrics = evaluate(accelerator.unwrap_model(model))
        model.train()
        result.history.append({"epoch": epoch, "step": result.steps, **extra, "eval": metrics})

    bar = tqdm(total=total_steps, initial=result.steps, desc="train", unit="step",
               disable=not progress or not distributed.is_main(), leave=False)
    model.train()
    for epoch in range(start_epoch, options.epochs):
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "n": 0}
        terms: set[str] = set()  # the loss terms the method computes (PBFT has no KL)
        for start in range(0, n_examples, options.train_batch_size):
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
            if options.max_grad_norm > 0:
                # All of the model's parameters (frozen ones have no gradient): under FSDP accelerate only
                # computes the global norm when it is handed exactly the prepared model's parameters.
                accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            result.train_examples_seen += len(step_indices)
            result.train_seconds += time.perf_counter() - step_start
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}")
            last_step = epoch + 1 == options.epochs and start + options.train_batch_size >= n_examples
            if options.eval_every > 0 and result.steps % options.eval_every == 0 and not last_step:
                run_eval(epoch + 1, {"lr": scheduler.get_last_lr()[0]})
        n = max(sums["n"], 1)
        epoch_stats = {"train_loss": sums["loss"] / n,
                       "train_kl": sums["kl"] / n if "kl" in terms else None,
                       "train_ce": sums["ce"] / n if "ce" in terms else None,
                       "lr": scheduler.get_last_lr()[0]}
        parts = ", ".join(f"{t} {epoch_stats['train_' + t]:.4f}" for t in ("kl", "ce") if t in terms)
        logger.info("epoch %d/%d: loss %.4f (%s)", epoch + 1, options.epochs, epoch_stats["train_loss"], parts)
        # After the last epoch the caller runs the final evaluation, on the full evaluation sets.
        if options.eval_every == 0 and epoch + 1 < options.epochs:
            run_eval(epoch + 1, epoch_stats)
        else:
            result.history.append({"epoch": epoch + 1, "step": result.steps, **epoch_stats})
        result.epochs_done = epoch + 1
        if checkpoint_dir is not None and options.save_every_epoch:
            _save_checkpoint(accelerator, checkpoint_dir, {
                "epochs_done": result.epochs_done, "steps": result.steps, "history": result.history,
                "train_examples_seen": result.train_examples_seen, "train_tokens": result.train_tokens,
                "train_seconds": result.train_seconds,
            })
    bar.close()
    if _shards_parameters(accelerator):
        result.final_trainable_state = gathered_trainable_state(accelerator, model, names)
    accelerator.unwrap_model(model).eval()
    # Drop the optimiser state and the accelerator's references, so that what follows (the final
    # evaluation, measured as the inference cost) does not carry the training memory.
    del optimizer, scheduler
    accelerator.free_memory()
    return result
