"""Every method, once: its name, options, run function, whether it trains, and what its run directory holds.

The command line (one subcommand per entry), experiment grids, sweeps, tuning and ``icld reproduce`` all
read this table, so adding a method is one module in ``methods/`` and one entry here. Run functions are
named as ``module:function`` and imported when first called: reading the table imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from icldistill.config import DistillOptions, GenDistillOptions, GenerateOptions, IclOptions, PbftOptions
from icldistill.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class MethodSpec:
    """One method: what ``icld NAME`` runs and what the run records."""

    name: str
    """The subcommand, and ``method`` in the run's ``results.json``."""
    options: type
    """Its options dataclass in ``config.py``."""
    run: str
    """``module:function`` taking ``(config, *, progress, **hooks)`` and returning the run record (a dict)."""
    trains: bool
    """A trained method writes ``seed-N/`` directories (seed record, artefacts, checkpoints) and can be tuned."""
    records: tuple[str, ...]
    """What its run directory holds, beside ``results.json``: for the README, ``icld results`` and tests."""
    help: str

    def runner(self) -> Callable[..., dict[str, Any]]:
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)

    def __call__(self, config: Any, **kwargs: Any) -> dict[str, Any]:
        """Run the method (the same call the single command makes)."""
        return self.runner()(config, **kwargs)


_TRAINED_FILES = ("predictions.jsonl", "seed-N/seed_result.json", "seed-N/predictions.jsonl",
                  "seed-N/adapter or seed-N/trainable.safetensors")

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("icl", IclOptions, "icldistill.methods.icl:run_icl", False, ("predictions.jsonl",),
               "Evaluate in-context learning (k demonstrations + query)."),
    MethodSpec("pbft", PbftOptions, "icldistill.methods.pbft:run_pbft", True, _TRAINED_FILES,
               "Pattern-based fine-tuning on the k support examples."),
    MethodSpec("distill", DistillOptions, "icldistill.methods.distill:run_distill", True, _TRAINED_FILES,
               "Context distillation: teacher with demonstrations -> student without."),
    MethodSpec("generate", GenerateOptions, "icldistill.methods.generate:run_generate", False, ("predictions.jsonl",),
               "Generation: answers with (or without) the task's context, scored by exact match and token F1."),
    MethodSpec("gen-distill", GenDistillOptions, "icldistill.methods.gen_distill:run_gen_distill", True,
               _TRAINED_FILES, "Generation distillation: the student without the context learns the teacher's "
               "answers with it (--signal sequence, token, on-policy, or reference SFT)."),
)}

TRAINED = tuple(name for name, spec in METHODS.items() if spec.trains)


def get_method(name: str, where: str = "method") -> MethodSpec:
    """The entry for ``name``; an unknown name is a one-line error with the closest names."""
    if name in METHODS:
        return METHODS[name]
    raise ConfigError(f"{where}: unknown method {name!r}; expected one of {', '.join(METHODS)}."
                      f"{did_you_mean(str(name), METHODS, n=1)}")
