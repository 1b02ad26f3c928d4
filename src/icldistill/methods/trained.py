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
from icldistill.methods.registry import METHODS
from icldistill.models.loading import LoadedModel, load_model
from icldistill.runtime.records import read_json
from icldistill.runtime.rundir import SEED_RESULT_FILE, RunDir, RunRecord, SeedRecord

logger = logging.getLogger(__name__)

SEED_RESULT = SEED_RESULT_FILE  # kept for importers; the names live in runtime.rundir
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
    record: SeedRecord | None = None
    """The typed seed record (``seed_record`` is its dict form), artefacts found in its seed directory."""
    run: RunRecord | None = None

    @property
    def peft(self) -> str | None:
        return (self.run_record or {}).get("config", {}).get("peft") if self.kind == "run" else None


def resolve_source(name: str) -> ModelSource:
    """Classify ``name`` (a seed directory, a one-seed run, an export, or a model name) without loading weights."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / EXPORT_META).is_file():
        return ModelSource(name, "export", str(path), meta=_export_meta(path / EXPORT_META))
    run_dir = RunDir(path)
    if path.is_dir() and not (path / SEED_RESULT).is_file() and run_dir.results_path.is_file():
        record = run_dir.read()
        assert record is not None
        if record.method not in METHODS or not METHODS[record.method].trains:
            raise ConfigError(f"{path} holds a {record.method!r} run, which trains nothing; give the model it "
                              f"evaluated ({record.fields.get('model', {}).get('name', '?')}) with --model instead.")
        seeds = [s.directory for s in run_dir.held_seeds(record) if s.directory is not None]
        if len(seeds) != 1:
            listed = ", ".join(p.name for p in seeds) or "none finished"
            raise ConfigError(f"{path} holds the run's seeds ({listed}); name one of them, e.g. {path / 'seed-0'}.")
        path = seeds[0]
    if path.is_dir() and (path / SEED_RESULT).is_file():
        return _run_source(name, path)
    return ModelSource(name, "model", name)


def _export_meta(path: Path) -> dict[str, Any]:
    """An export's ``icldistill.json``; a truncated or corrupt one is one line naming it."""
    try:
        meta = read_json(path)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} cannot be read ({exc}); it was truncated or corrupted. Export the run again "
                         "(icld export RUN/seed-N --output DIR).") from None
    return meta


def _run_source(name: str, seed_dir: Path) -> ModelSource:
    """A trained seed: its record, its run's record, and the base model both name (checked to be one run)."""
    run_dir = RunDir(seed_dir.parent)
    seed = run_dir.read_seed(seed_dir.name.removeprefix("seed-")) if seed_dir.name.startswith("seed-") else None
    if seed is None:
        seed = SeedRecord.from_dict(read_json(seed_dir / SEED_RESULT), seed_dir)
    run = run_dir.read()
    if run is None:
        raise ModelError(f"{seed_dir} has {SEED_RESULT} but its run directory {seed_dir.parent} has no "
                         f"{run_dir.results_path.name}; point at a seed directory inside a complete run.")
    if seed.identity is not None and run.identity is not None and seed.identity != run.identity:
        raise ModelError(f"{seed_dir} was trained by another run than the one {run_dir.results_path} records "
                         f"(identity {seed.identity} vs {run.identity}); rerun that run, or delete {seed_dir}.")
    student = seed.fields.get("student") or {}
    # A local directory or GGUF file is recorded by its resolved path; packaged names and hub ids by name.
    base = student.get("path") if student.get("source") in ("local", "gguf") else student.get("name")
    meta = {k: run.fields.get(k) for k in ("task", "pattern", "classes")}
    meta["label_score"] = run.config.get("label_score")
    run_dict = run.to_dict()
    return ModelSource(name, "run", str(base), seed.seed, seed_dir, seed.to_dict(), run_dict, meta, seed, run)


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
    record = source.record or SeedRecord.from_dict(source.seed_record or {"seed": source.seed}, source.seed_dir)
    adapter, trainable = record.artefact("adapter"), record.artefact("trainable")
    # A damaged artefact: the seed's record goes, and a resume saves it again from the last checkpoint.
    remedy = (f"Delete {Path(source.seed_dir or '.') / SEED_RESULT} and rerun the training command with --resume "
              "(it saves the seed again from its last checkpoint), or give another model.")
    if adapter is not None:
        from icldistill.models.adapters import load_adapter

        return load_adapter(model, adapter, remedy)
    if trainable is not None:  # BitFit or full fine-tuning: the one loader training's own tests check
        from icldistill.models.adapters import load_trainable

        try:
            return load_trainable(model, str(trainable), remedy)
        except ConfigError as exc:
            raise ModelError(f"{exc} (base model {source.base})") from None
    raise ModelError(f"{source.seed_dir}: the seed record names no adapter or trained parameters to load.")
