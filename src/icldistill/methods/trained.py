"""What a training run produced, loaded again: base model + adapter from a seed's record, or an exported model.

``icld predict``, ``icld eval`` and ``icld export`` accept a training run's seed directory (``RUN/seed-N``),
a run directory with one seed, an exported directory (``icldistill.json`` beside the weights), or any
name :func:`icldistill.models.loading.load_model` resolves. The first three also carry the task, the
pattern and the label words the model was trained with, so no other flag is needed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icldistill.errors import ConfigError, ModelError
from icldistill.methods.finetune import SEED_RESULT
from icldistill.models.loading import LoadedModel, load_model
from icldistill.runtime.records import read_json

logger = logging.getLogger(__name__)

RESULTS = "results.json"
EXPORT_META = "icldistill.json"  # the machine-readable file of an exported model


@dataclass
class ModelSource:
    """Where a model comes from, and what it was trained for (``None`` for a plain model)."""

    name: str
    """What the user gave."""
    kind: str
    """``'run'`` (base + trained parameters), ``'export'`` (merged directory) or ``'model'`` (anything else)."""
    base: str
    """The model to load: the base of a run, the exported directory, or ``name``."""
    seed: int | None = None
    seed_dir: Path | None = None
    seed_record: dict[str, Any] | None = None
    run_record: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    """task, pattern {name, template, label_words}, classes: from the run's or the export's record."""

    @property
    def peft(self) -> str | None:
        return (self.run_record or {}).get("config", {}).get("peft") if self.kind == "run" else None


def _seed_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("seed-*") if (p / SEED_RESULT).is_file())


def resolve_source(name: str) -> ModelSource:
    """Classify ``name`` (a seed directory, a one-seed run, an export, or a model name) without loading weights."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / EXPORT_META).is_file():
        return ModelSource(name, "export", str(path), meta=read_json(path / EXPORT_META))
    if path.is_dir() and not (path / SEED_RESULT).is_file() and (path / RESULTS).is_file():
        seeds = _seed_dirs(path)
        record = read_json(path / RESULTS)
        if record.get("method") not in ("pbft", "distill"):
            raise ConfigError(f"{path} holds a {record.get('method')!r} run, which trains nothing; give the model it "
                              f"evaluated ({(record.get('model') or {}).get('name', '?')}) with --model instead.")
        if len(seeds) != 1:
            listed = ", ".join(p.name for p in seeds) or "none finished"
            raise ConfigError(f"{path} holds the run's seeds ({listed}); name one of them, e.g. {path / 'seed-0'}.")
        path = seeds[0]
    if path.is_dir() and (path / SEED_RESULT).is_file():
        seed_record = read_json(path / SEED_RESULT)
        run_file = path.parent / RESULTS
        if not run_file.is_file():
            raise ModelError(f"{path} has {SEED_RESULT} but its run directory {path.parent} has no {RESULTS}; "
                             "point at a seed directory inside a complete run.")
        run_record = read_json(run_file)
        student = seed_record.get("student") or {}
        # A local directory or GGUF file is recorded by its resolved path; packaged names and hub ids by name.
        base = student.get("path") if student.get("source") in ("local", "gguf") else student.get("name")
        meta = {k: run_record.get(k) for k in ("task", "pattern", "classes")}
        meta["label_score"] = (run_record.get("config") or {}).get("label_score")
        return ModelSource(name, "run", str(base), int(seed_record["seed"]), path, seed_record, run_record, meta)
    return ModelSource(name, "model", name)


def load_source(source: ModelSource, *, dtype: str = "auto", device: str = "auto",
                cache_dir: str | None = None) -> LoadedModel:
    """The model of ``source`` with its trained parameters applied (LoRA left unmerged: exactly as trained)."""
    if source.kind != "run":
        return load_model(source.base, dtype=dtype, device=device, cache_dir=cache_dir)
    # Trained parameters are applied in fp32 and the result cast, as training kept them.
    loaded = load_model(source.base, dtype="fp32", device=device, cache_dir=cache_dir)
    model = apply_trained(loaded.model, source)
    from icldistill.models.loading import resolve_dtype

    torch_dtype = resolve_dtype(dtype, loaded.device)
    model.to(dtype=torch_dtype).eval()
    return dataclasses.replace(loaded, model=model, name=source.name, dtype=torch_dtype,
                               fingerprint=f"{loaded.fingerprint}+{source.seed_dir.name}")


def apply_trained(model: Any, source: ModelSource) -> Any:
    """``model`` (the run's base) with the run's adapter (peft) or trained tensors (BitFit, full) loaded."""
    artefacts = source.seed_record.get("artefacts") or {}
    if "adapter" in artefacts:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, artefacts["adapter"])
    if "trainable" in artefacts:  # BitFit or full fine-tuning: the one loader training's own tests check
        from icldistill.models.adapters import load_trainable

        try:
            return load_trainable(model, artefacts["trainable"])
        except ConfigError as exc:
            raise ModelError(f"{exc} (base model {source.base})") from None
    raise ModelError(f"{source.seed_dir}: the seed record names no adapter or trained parameters to load.")
