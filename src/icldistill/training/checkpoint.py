"""The loop's checkpoints: what is saved (the trainable tensors only), how it is swapped in, and how it is found.

Checkpoints use ``Accelerator.save_state`` with a pre-hook that stores only the trainable parameters:
the frozen base model is already on disk, and a LoRA checkpoint is then megabytes, not the model.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from safetensors.torch import load_file

from icldistill.errors import ConfigError, IcldError
from icldistill.models.adapters import copy_parameters, save_tensors, writing
from icldistill.runtime.records import atomic_write_json, read_json

CHECKPOINT = "checkpoint"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
BEST_FILE = "best.safetensors"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def shards_parameters(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def gathered_trainable_state(accelerator: Accelerator, model: torch.nn.Module,
                             names: set[str]) -> dict[str, torch.Tensor]:
    """The trainable tensors of the prepared ``model``, whole, on rank 0 (other ranks may get an empty dict).

    With sharded parameters (FSDP, DeepSpeed) every rank must call this: accelerate gathers the state
    dict collectively. Otherwise the unwrapped model's parameters are read directly.
    """
    if shards_parameters(accelerator):
        full = accelerator.get_state_dict(model)
        return {n: t.detach().cpu().contiguous() for n, t in full.items() if n in names}
    return trainable_state(accelerator.unwrap_model(model))


def register_checkpoint_hooks(accelerator: Accelerator, names: set[str]) -> None:
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


def save_checkpoint(accelerator: Accelerator, directory: Path, state: dict[str, Any],
                    extra_files: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write the checkpoint next to the old one, then swap, so a kill leaves one complete checkpoint.

    Every rank takes part in ``save_state``; the clean-up, the state file and the swap are rank 0's,
    between barriers, so no rank writes into a directory that is being renamed. A failed write (disk
    full) removes the partial checkpoint and is one line naming it: the previous checkpoint is kept.
    """
    final, tmp, old = directory / CHECKPOINT, directory / f"{CHECKPOINT}.tmp", directory / f"{CHECKPOINT}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with writing(tmp, "a checkpoint", resumable=True):
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                for name, tensors in (extra_files or {}).items():
                    save_tensors(tensors, tmp / name)
                atomic_write_json(tmp / STATE_FILE, state)  # written last: marks the checkpoint complete
    except IcldError:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial checkpoint took
        raise
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def check_identity(checkpoint: Path, identity: str | None) -> None:
    """Refuse to resume ``checkpoint`` when another run made it (its recorded run identity differs).

    The identity (``runtime.rundir.identity_of``: a hash of the options that shape the result) is
    recorded in the state file. A checkpoint written before identities, or a loop run without one,
    is accepted. An unreadable state file raises what reading it raises (the caller falls back).
    """
    state = read_json(checkpoint / STATE_FILE)
    recorded = state.get("identity") if isinstance(state, dict) else None
    if identity is None or recorded is None or recorded == identity:
        return
    raise ConfigError(f"Cannot resume from {checkpoint}: it was made by another run (identity {recorded}, this run "
                      f"is {identity}: other options). Run again with that run's options, or delete {checkpoint} "
                      "(or rerun with --overwrite) to train this seed from the start.")


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors back into ``model`` (the selected checkpoint)."""
    copy_parameters(dict(model.named_parameters()), state)


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory``, latest first: the checkpoint, and one left mid-swap by a kill."""
    paths = [directory / name for name in (CHECKPOINT, f"{CHECKPOINT}.old")]
    return [p for p in paths if (p / STATE_FILE).exists() and (p / TRAINABLE_FILE).exists()]


def find_checkpoint(directory: Path) -> Path | None:
    """The latest complete checkpoint in ``directory`` (also one left mid-swap by a kill), or None."""
    found = complete_checkpoints(directory)
    return found[0] if found else None


# What reading a truncated or corrupt checkpoint file raises (json, safetensors, torch.load / pickle).
UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, pickle.UnpicklingError,
              SafetensorError)


def unreadable_file(checkpoint: Path) -> Path:
    """The first file of ``checkpoint`` that cannot be read back (the directory itself when each file reads).

    Called after loading failed, to name the file: accelerate's own errors often name none.
    """
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix in (".bin", ".pkl", ".pt"):
                torch.load(path, map_location="cpu", weights_only=False)
        except UNREADABLE:
            return path
    return checkpoint
