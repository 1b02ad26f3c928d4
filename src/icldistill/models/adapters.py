"""What trains: LoRA through the ``peft`` library, BitFit (bias terms only), or full fine-tuning.

The embeddings and the LM head stay frozen unless asked for (llmft trains them in its "LoRA" and
"BitFit" runs, which distorts memory comparisons; PROTOCOL.md). Every choice is summarised in a
record: the number of trainable parameters and the names of the trainable groups.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icldistill.config import TrainOptions
from icldistill.errors import ConfigError, IcldError, ModelError

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


@dataclass
class TrainableSummary:
    """How many parameters train, and which groups (layer indices folded into '*')."""

    method: str
    trainable: int
    total: int
    groups: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "trainable_parameters": self.trainable, "total_parameters": self.total,
                "trainable_fraction": self.trainable / self.total if self.total else 0.0,
                "trainable_groups": self.groups, "notes": self.notes}


def summarise(model: nn.Module, method: str, notes: list[str] | None = None) -> TrainableSummary:
    """Count trainable parameters and group their names (``layers.3.self_attn`` -> ``layers.*.self_attn``)."""
    groups: Counter[str] = Counter()
    trainable = total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            groups[re.sub(r"\.\d+\.", ".*.", name)] += p.numel()
    return TrainableSummary(method, trainable, total, dict(sorted(groups.items())), notes or [])


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    mods = [model.get_input_embeddings()]
    out = model.get_output_embeddings()
    if out is not None and out is not mods[0]:
        mods.append(out)
    return mods


def _module_names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    names = []
    for name, m in model.named_modules():
        if any(m is x for x in modules):
            names.append(name.split(".")[-1])
    return sorted(set(names))


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(model: nn.Module, options: TrainOptions) -> nn.Module:
    """Wrap ``model`` with LoRA adapters from ``peft`` on the target modules."""
    from peft import LoraConfig, get_peft_model

    targets = list(options.lora_targets or DEFAULT_LORA_TARGETS)
    available = _linear_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(
            f"LoRA target modules {missing} do not exist in this model; its linear layers are {available}. "
            "Choose others with --lora-targets."
        )
    modules_to_save = _module_names(model, _embedding_modules(model)) if options.train_embeddings else None
    # peft copies each module to save; on a model whose LM head is its input embedding (tied weights) the
    # two copies would train apart, so peft is asked to keep them tied.
    tied = options.train_embeddings and embeddings_tied(model)
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM", modules_to_save=modules_to_save,
                        ensure_weight_tying=tied)
    return get_peft_model(model, config)


def embeddings_tied(model: nn.Module) -> bool:
    """Whether the LM head's weight is the input embedding's (one tensor, e.g. Gemma, SmolLM2)."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _add_zero_biases(model: nn.Module, targets: list[str]) -> int:
    """Give bias-free linear layers named in ``targets`` a zero bias (the function is unchanged at start)."""
    added = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.bias is None and name.split(".")[-1] in targets:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
            added += 1
    return added


def load_trainable(model: nn.Module, path: str | Path,
                   remedy: str = "Train the seed again, or load another file.") -> nn.Module:
    """Load a BitFit or full fine-tuning artefact (``trainable.safetensors``) into a fresh base ``model``.

    BitFit with ``--bitfit-fallback add-bias`` saved biases for layers the base model has none on; they
    are added (as in training) before the tensors are copied, so the artefact loads back into the plain
    base model. Unknown names, and a truncated file, are an error naming the file (``remedy`` says what
    to do). Returns ``model``, modified in place.
    """
    state = _read_tensors(path, remedy)
    modules = dict(model.named_modules())
    for name in state:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if leaf == "bias" and isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                   device=module.weight.device))
    params = dict(model.named_parameters())
    if embeddings_tied(model):  # a tied weight is saved under both names; either finds the one tensor
        params.setdefault("lm_head.weight", model.get_input_embeddings().weight)
    unknown = [n for n in state if n not in params]
    if unknown:
        raise ConfigError(f"{path} does not fit this model: no parameters {unknown[:3]}; load it into the base "
                          "model it was trained from.")
    copy_parameters(params, state)
    return model


# What reading a truncated or corrupt adapter or tensor file raises (json, safetensors, torch.load, peft).
UNREADABLE_ARTEFACT = (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError)


def _read_tensors(path: str | Path, remedy: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` of ``path``; a truncated or corrupt file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, *UNREADABLE_ARTEFACT) as exc:
        raise ModelError(f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); it was truncated or "
                         f"corrupted. {remedy}") from None


def load_adapter(model: nn.Module, adapter: str | Path, remedy: str) -> nn.Module:
    """``PeftModel.from_pretrained(model, adapter)``, with a missing, truncated or corrupt file named.

    peft's own errors (a JSONDecodeError, a SafetensorError, a TypeError on ``[]``) name no file.
    ``remedy`` says what to do (the caller knows where the adapter came from).
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    adapter = Path(adapter)
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise ModelError(f"{config} is missing: the adapter is incomplete. {remedy}")
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config} cannot be read ({exc}); it was truncated or corrupted. {remedy}") from None
    weights = sorted(adapter.glob("adapter_model.*"))
    for path in weights:
        if path.suffix == ".safetensors":
            _read_tensors(path, remedy)  # names the file before peft reads it
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (SafetensorError, *UNREADABLE_ARTEFACT) as exc:
        where = weights[0] if weights else adapter
        raise ModelError(f"{where} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}). {remedy}") from None


def copy_parameters(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the named parameters, in each parameter's device and dtype."""
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def prepare_trainable(model: nn.Module, options: TrainOptions) -> tuple[nn.Module, TrainableSummary]:
    """Freeze and wrap ``model`` for ``options.peft``; returns the model to train and what trains."""
    notes: list[str] = []
    if options.peft == "lora":
        model = apply_lora(model, options)
        targets = ",".join(options.lora_targets or DEFAULT_LORA_TARGETS)
        method = f"lora(r={options.lora_r}, alpha={options.lora_alpha}, targets={targets})"
    elif options.peft == "bitfit":
        for p in model.parameters():
            p.requires_grad_(False)
        biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
        if not biases:
            if options.bitfit_fallback != "add-bias":
                raise ConfigError(
                    "BitFit trains bias terms, and this model has none (Llama and Gemma layers have no biases). "
                    "Use --bitfit-fallback add-bias to add zero-initialised biases to the target layers "
                    f"({','.join(options.lora_targets or DEFAULT_LORA_TARGETS)}, see --lora-targets), or --peft lora."
                )
            targets = list(options.lora_targets or DEFAULT_LORA_TARGETS)
            added = _add_zero_biases(model, targets)
            if not added:
                raise ConfigError(f"No linear layer named {targets} to add biases to; set --lora-targets.")
            notes.append(f"model had no biases: added zero-initialised biases to {added} {','.join(targets)} layers")
            biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
        for p in biases:
            p.requires_grad_(True)
        method = "bitfit"
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        method = "full"
    if options.peft != "lora":
        for m in _embedding_modules(model):
            for p in m.parameters():
                p.requires_grad_(options.train_embeddings)
    if options.train_embeddings:
        notes.append("input embeddings and LM head train too (--train-embeddings)")
    summary = summarise(model, method, notes)
    if summary.trainable == 0:
        raise ConfigError(f"Nothing would train with --peft {options.peft}; check the options.")
    logger.info("%s: %d of %d parameters train (%.3f%%)", method, summary.trainable, summary.total,
                100 * summary.trainable / summary.total)
    return model, summary


def shared_mode() -> int:
    """The mode every other result file gets (0644 under the usual umask 022): readable by a serving user."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def share_files(path: str | Path) -> None:
    """Give ``path`` (a file, or every file below a directory) the umask's mode.

    safetensors writes its files 0600, so an export, adapter or checkpoint written by one user would be
    unreadable to another (a serving user, a group sharing a cache); every other file follows the umask.
    """
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    mode = shared_mode()
    for file in files:
        if file.suffix == ".safetensors" and (file.stat().st_mode & 0o777) != mode:
            file.chmod(mode)


# Set by an outer ``writing(..., resumable=True)`` (a checkpoint, a seed's artefacts): every failed write
# inside it, also one of a nested helper, then tells the user that a resume loses nothing.
_RESUMABLE: ContextVar[bool] = ContextVar("icldistill_resumable_writes", default=False)


def _after_failed_write(full: bool) -> str:
    """What to do after a failed write: free space (and resume, where the run can), or check the directory."""
    space = "Free disk space" if full else "Free disk space or check that the directory is writable"
    if _RESUMABLE.get():
        return (f"Nothing written before is lost (earlier checkpoints and results are kept): {space.lower()}, "
                "then run the same command again with --resume.")
    return f"{space} and run the command again." if full else \
        "Check that the directory is writable, or choose another output directory."


@contextmanager
def writing(path: str | Path, what: str = "model files", *, resumable: bool | None = None) -> Iterator[None]:
    """Turn a failed write of ``path`` (disk full, read-only, missing directory) into one line naming it.

    safetensors raises ``SafetensorError`` and torch a ``RuntimeError`` from its C++ writer
    (``[enforce fail at inline_container.cc]``); both hide which file and which condition. Other errors
    pass through unchanged. ``resumable=True`` (a training run's writes) makes the line say that nothing
    is lost and to resume; it holds for every ``writing`` nested inside, which names its own file.
    """
    token = _RESUMABLE.set(resumable) if resumable is not None else None
    try:
        yield
    except IcldError:
        raise
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        file = f" ({exc.filename})" if isinstance(exc.filename, str) and exc.filename != str(path) else ""
        raise IcldError(f"Writing {what} to {path}{file} failed: {exc.strerror or exc}. "
                        + _after_failed_write(full)) from None
    except Exception as exc:  # SafetensorError, RuntimeError from torch's writer: only the I/O ones
        text = str(exc)
        if type(exc).__name__ == "SafetensorError" or "No space left" in text or "inline_container" in text \
                or "StorageFull" in text:
            full = "No space left" in text or "StorageFull" in text
            raise IcldError(f"Writing {what} to {path} failed ({text.strip()[:200]}). "
                            + _after_failed_write(full)) from None
        raise
    finally:
        if token is not None:
            _RESUMABLE.reset(token)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """``safetensors.torch.save_file`` with the umask's mode and a failed write named by its path."""
    from safetensors.torch import save_file

    with writing(path, "tensors"):
        save_file(tensors, str(path))
    share_files(path)
