"""Setup shared by every method: the task, the pattern, the data, the evaluation sets, the output record."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icldistill.config import CommonOptions, to_dict
from icldistill.errors import ConfigError
from icldistill.models.loading import LoadedModel
from icldistill.runtime.paths import PREDICTIONS_FILE  # noqa: F401  (re-exported for the methods)
from icldistill.runtime.records import environment, over_attempts
from icldistill.runtime.rundir import RECORD_VERSION, PredictionRow, RunDir, probe_writable, run_identity
from icldistill.scoring.evalsets import evaluate_sets
from icldistill.scoring.metrics import aggregate_seeds, hans_ood_accuracy
from icldistill.tasks import data as data_mod
from icldistill.tasks.data import Example, LoadedData
from icldistill.tasks.prompts import (
    Pattern,
    check_label_words_tokenize_apart,
    context_rng,
    resolve_pattern,
    sample_demonstrations,
)
from icldistill.tasks.registry import DATA_SUFFIXES, DataSpec, Family, Task, family_of, get_eval_set, get_task

logger = logging.getLogger(__name__)


def prediction_rows(seed: int, predictions: dict[str, list[dict[str, Any]]]) -> list[PredictionRow]:
    """The rows of ``predictions.jsonl``: one per (seed, evaluation set, query), the same for every method."""
    return [PredictionRow(seed=seed, eval=name, **p) for name, rows in predictions.items() for p in rows]


@dataclass
class Setup:
    """Everything a method needs before it touches a model."""

    task: Task
    family: Family
    pattern: Pattern
    train: LoadedData
    eval_specs: dict[str, DataSpec]
    eval_data: dict[str, LoadedData]
    eval_examples: dict[str, list[Example]]  # after --limit
    query_texts: frozenset[tuple[str, ...]]  # every evaluation query, never drawn as a demonstration
    demo_sampling: str = "balanced"
    fixed_demonstrations: LoadedData | None = None  # --demonstrations FILE: the same context for every seed
    label_score: str = "sum"  # a class's score from its label word's tokens: sum or mean (--label-score)

    def demonstrations(self, seed: int, shots: int, context: int = 0,
                       exclude: frozenset[tuple[str, ...]] = frozenset()) -> list[Example]:
        """The seed's demonstration set (context 0 is the ICL context of the seed), or the fixed file's rows."""
        if self.fixed_demonstrations is not None:
            if context:
                raise ConfigError("--demonstrations fixes one context; several teacher contexts need drawn "
                                  "demonstrations (use --teacher-contexts 1).")
            return list(self.fixed_demonstrations.examples)
        return sample_demonstrations(self.train.examples, shots, len(self.family.classes),
                                     context_rng(seed, context), exclude=self.query_texts | exclude,
                                     mode=self.demo_sampling, classes=self.family.classes)

    def check_tokenizer(self, tokenizer: Any, model_name: str) -> None:
        """Checks that need a model's tokenizer: the classes' label words must tokenize apart."""
        check_label_words_tokenize_apart(tokenizer, self.pattern, self.family.classes, model_name)

    def data_record(self) -> dict[str, Any]:
        record = {"train": {"name": self.train.spec.name, "source": self.train.source,
                            "fingerprint": self.train.fingerprint, "rows": len(self.train.examples)}}
        if self.fixed_demonstrations is not None:
            d = self.fixed_demonstrations
            record["demonstrations"] = {
                "source": d.source, "fingerprint": d.fingerprint,
                "rows": [{"id": ex.id, "label": int(ex.label), **dict(ex.fields)} for ex in d.examples]}
        record["eval"] = {
            name: {"source": d.source, "fingerprint": d.fingerprint, "rows": len(d.examples),
                   "evaluated": len(self.eval_examples[name])}
            for name, d in self.eval_data.items()
        }
        return record


def dev_split(setup: Setup, seed: int, n: int, demonstrations: Sequence[Example]) -> list[Example]:
    """n labelled dev rows from the train split, disjoint from the demonstrations and every evaluation query.

    Drawn by a seeded RNG of its own, after the seed's demonstrations, so PBFT and distillation of one seed
    share the dev rows; distillation draws its training queries from what is left. The dev split is what
    evaluations during training and ``--select`` use: an evaluation set never chooses a checkpoint.
    """
    if n == 0:
        return []
    import random

    taken = {ex.text_key() for ex in demonstrations} | setup.query_texts
    pool = [ex for ex in setup.train.examples if ex.text_key() not in taken]
    if len(pool) < n:
        raise ConfigError(f"--dev-queries {n} exceeds the {len(pool)} training rows left after the demonstrations.")
    return random.Random(f"icldistill-dev-{seed}").sample(pool, n)


def prepare(config: CommonOptions) -> Setup:
    """Resolve the task, pattern and data of ``config``; fails early, before any model is loaded."""
    task = get_task(config.task)
    family = family_of(task)
    pattern = resolve_pattern(family, config.pattern or task.default_pattern, config.label_words)
    train = data_mod.load(task.train, config.data_dir, config.data_source)
    eval_specs = {name: get_eval_set(name, task) for name in (config.eval or task.default_eval)}
    eval_data = {name: data_mod.load(spec, config.data_dir, config.data_source) for name, spec in eval_specs.items()}
    eval_examples = {name: data_mod.subsample(d.examples, config.limit) for name, d in eval_data.items()}
    fixed = None
    if getattr(config, "demonstrations", None):
        fixed = load_demonstrations(task, config.demonstrations)
        if config.shots != len(fixed.examples):
            logger.info("--demonstrations %s holds %d rows; they replace --shots %d",
                        config.demonstrations, len(fixed.examples), config.shots)
        # Fixed demonstrations are kept out of the evaluation sets, as drawn ones are kept out of the queries.
        taken = {ex.text_key() for ex in fixed.examples}
        for name, examples in eval_examples.items():
            kept = [ex for ex in examples if ex.text_key() not in taken]
            if len(kept) < len(examples):
                logger.warning("%s: %d queries equal a demonstration and are left out", name, len(examples) - len(kept))
            eval_examples[name] = kept
    query_texts = frozenset(ex.text_key() for exs in eval_examples.values() for ex in exs)
    return Setup(task, family, pattern, train, eval_specs, eval_data, eval_examples, query_texts,
                 getattr(config, "demo_sampling", "balanced"), fixed, label_score=getattr(config, "label_score", "sum"))


def load_demonstrations(task: Task, path: str) -> LoadedData:
    """The rows of a ``--demonstrations`` file, read with the columns and classes of the task's train data."""
    spec = get_eval_set(path, task) if path.endswith(DATA_SUFFIXES) else None
    if spec is None:
        raise ConfigError(f"--demonstrations {path}: give a data file ({', '.join(DATA_SUFFIXES)}) with the task's "
                          f"columns ({', '.join(family_of(task).fields)}) and label.")
    loaded = data_mod.load(spec, None, "local")
    if not loaded.examples:
        raise ConfigError(f"--demonstrations {path} holds no usable rows.")
    from icldistill.tasks.prompts import check_demonstrations_cover_classes

    check_demonstrations_cover_classes(loaded.examples, family_of(task).classes, f"--demonstrations {path}")
    return loaded


def evaluate_on_sets(
    model: LoadedModel,
    setup: Setup,
    demonstrations: Sequence[Example],
    *,
    batch_size: int,
    use_prefix_cache: bool = True,
    progress: bool = True,
    label: str = "",
    limit: int | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]], int]:
    """Metrics and predictions of ``model`` on every evaluation set, with the given demonstrations.

    ``limit`` evaluates a seeded sample of each set (the quick evaluations during training).
    """
    metrics, predictions, tokens = {}, {}, 0
    sets = {name: (data_mod.subsample(examples, limit), setup.eval_specs[name].meta_fields)
            for name, examples in setup.eval_examples.items()}
    # One prefix cache per context, shared by every set (scoring.evalsets.evaluate_sets).
    results = evaluate_sets(model, setup.family, setup.pattern, demonstrations, sets, batch_size=batch_size,
                            use_prefix_cache=use_prefix_cache, label_score=setup.label_score,
                            desc=label if progress else None)
    for name, (m, preds, t) in results.items():
        if name.startswith("hans"):
            m.update(hans_ood_accuracy(m))
        metrics[name], predictions[name], tokens = m, preds, tokens + t
    return metrics, predictions, tokens


def aggregate(per_seed: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Mean, spread and 95% interval over seeds of each evaluation set's metrics (skipped seeds left out)."""
    names: list[str] = []
    for metrics in per_seed.values():
        names += [n for n in metrics if n not in names]
    return {name: aggregate_seeds([m[name] for m in per_seed.values() if name in m]) for name in names}


def base_record(method: str, config: Any, setup: Setup) -> dict[str, Any]:
    """The fields every results.json starts with: what ran (and its identity), on what, with which code."""
    options = json.loads(json.dumps(to_dict(config), default=str))
    return {"version": RECORD_VERSION, "method": method, "status": "running",
            "identity": run_identity(method, options), "planned_seeds": list(getattr(config, "seeds", [])),
            "started": time.time(), "config": options, "task": setup.task.ref,
            "pattern": {"name": setup.pattern.name, "template": setup.pattern.template,
                        "label_words": list(setup.pattern.label_words)},
            "classes": list(setup.family.classes), "data": setup.data_record(), "environment": environment()}


def model_record(model: LoadedModel) -> dict[str, Any]:
    return {"name": model.name, "source": model.source, "path": str(model.path), "fingerprint": model.fingerprint,
            "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
            "max_length": model.max_length, "parameters": sum(p.numel() for p in model.model.parameters()),
            "commit": getattr(model, "commit", None)}


def output_dir(config: CommonOptions) -> Path:
    return Path(config.output_dir).expanduser()


def claim_run(method: str, config: Any, setup: Setup) -> tuple[dict[str, Any], RunDir]:
    """The run's record, its output directory claimed (``RunDir.claim``) and its cache probed, before any model.

    A directory holding another run is refused unless ``--overwrite``; an unwritable ``--output-dir`` or
    ``--cache-dir`` fails here, not after the teacher pass.
    """
    if getattr(config, "cache_dir", None):
        probe_writable(config.cache_dir, "--cache-dir")
    record = base_record(method, config, setup)
    run_dir = RunDir(output_dir(config))
    run_dir.claim(record, overwrite=getattr(config, "overwrite", False))
    return record, run_dir


def start_record(method: str, config: Any, setup: Setup) -> tuple[dict[str, Any], Path]:
    """The results record of a training method, before its first seed, and its (claimed) output directory."""
    record, run_dir = claim_run(method, config, setup)
    record["seeds"] = {}
    return record, run_dir.path


def _total_resources(record: dict[str, Any], training: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's cost: its whole wall time (this invocation, from the claim), the largest peak of its parts."""
    teacher = record.get("teacher_pass", {})
    peaks = [r["training"]["peak_memory_mb"] for r in training]
    overall = [r["peak_memory_mb"]["overall"] for r in training if isinstance(r.get("peak_memory_mb"), dict)]
    return {
        "wall_time_s": round(time.time() - record.get("started", time.time()), 4),
        "training_wall_time_s": sum(r["training"]["wall_time_s"] for r in training) + teacher.get("wall_time_s", 0.0),
        # What the run cost at its largest: teacher pass, training or final evaluation.
        "peak_memory_mb": max(peaks + overall + [teacher.get("peak_memory_mb", 0.0)]),
        "memory_kind": training[0]["training"]["memory_kind"] if training else "",
    }


def training_cost(measured: dict[str, Any], result: Any) -> dict[str, Any]:
    """The training section's cost over every attempt: this attempt's measurement (``measure``'s dict) merged
    with what the checkpoint recorded before a resume (wall times add up, the peak is the larger). Where the
    earlier attempts' figures are unknown (a checkpoint that predates them), ``measured`` says the figures
    cover only the epochs after the resume, so that no one reads them as the whole training's."""
    before = result.before_resume
    if before is None:
        return {**measured, "measured": "whole"}
    if not before:
        return {**measured, "measured": f"after epoch {result.resumed_from_epoch} (resumed)"}
    whole = over_attempts(before, measured["wall_time_s"], measured["peak_memory_mb"])
    return {**measured, "wall_time_s": round(whole["wall_time_s"], 4),
            "peak_memory_mb": round(whole["peak_memory_mb"], 1), "measured": "whole"}


def seed_resources(result: Any, training: dict[str, Any], inference: dict[str, Any],
                   other_peaks_mb: dict[str, float | None] | None) -> dict[str, Any]:
    """A trained seed's cost (PBFT, CD, generation): steps, tokens and time of training (a ``TrainResult``),
    the inference pass, and the peaks of each part; ``training`` is this attempt's measurement."""
    training = training_cost(training, result)
    peaks = {"training": training["peak_memory_mb"], "inference": inference["peak_memory_mb"],
             **{k: v for k, v in (other_peaks_mb or {}).items() if v is not None}}
    seconds = result.train_seconds
    return {"training": training, "steps": result.steps, "planned_steps": result.planned_steps,
            "epochs_done": result.epochs_done, "examples_seen": result.train_examples_seen,
            "train_tokens": result.train_tokens, "train_seconds": round(seconds, 4),
            "train_tokens_per_s": result.train_tokens / seconds if seconds > 0 else None,
            "seconds_per_step": seconds / max(result.steps, 1), "resumed_from_epoch": result.resumed_from_epoch,
            "inference": inference,
            # What a user pays: the largest of the run's parts, each also given on its own.
            "peak_memory_mb": {"overall": max(peaks.values()), **peaks},
            "memory_kind": training["memory_kind"]}


def finish_record(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """Aggregate the seeds' final metrics and resources, write results.json (rank 0, atomically), return it."""
    seeds = record["seeds"]
    record["aggregate"] = aggregate({s: r["eval"] for s, r in seeds.items() if r.get("eval")})
    training = [r["resources"] for r in seeds.values() if "resources" in r]
    teacher = record.get("teacher_pass", {})
    labelled = [r.get("labelled_examples") for r in seeds.values() if r.get("labelled_examples") is not None]
    if labelled:
        record["labelled_examples"] = max(labelled)
    record["resources"] = {
        "total": _total_resources(record, training),
        "training_peak_memory_mb": max([r["training"]["peak_memory_mb"] for r in training] or [0.0]),
        "teacher_pass_peak_memory_mb": teacher.get("peak_memory_mb"),
        "seconds_per_step": sum(r["seconds_per_step"] for r in training) / len(training) if training else None,
        "train_tokens_per_s": sum(r["train_tokens_per_s"] or 0 for r in training) / len(training) if training else None,
        "trainable_parameters": next(iter(seeds.values()))["trainable"]["trainable_parameters"] if seeds else None,
        "teacher_pass": teacher or None,
        "inference": inference_record([r["inference"] for r in training if r.get("inference")]),
    }
    complete = bool(seeds) and all(r.get("status") == "complete" for r in seeds.values())
    record["status"] = "complete" if complete else "incomplete"
    run_dir = RunDir(out)
    rows = run_dir.gather_seed_predictions(seeds)  # each seed's final evaluation, written by train_and_evaluate
    if rows:
        run_dir.write_predictions(rows)
    run_dir.write(record)  # every rank holds the same record; rank 0 writes it
    return record


def inference_record(parts: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """What answering costs, over measured parts (seeds or evaluation sets): the one ``resources.inference``.

    Each part holds ``wall_time_s``, ``queries``, ``peak_memory_mb`` and ``memory_kind`` (a measurement
    plus its query count); the result adds ``latency_ms_per_query``. ICL, eval and trained runs alike.
    """
    if not parts:
        return None
    wall = sum(p["wall_time_s"] for p in parts)
    queries = sum(p["queries"] for p in parts)
    return {"wall_time_s": round(wall, 4), "queries": queries,
            "peak_memory_mb": max(p["peak_memory_mb"] for p in parts),
            "memory_kind": next((p["memory_kind"] for p in parts if p.get("memory_kind")), ""),
            "latency_ms_per_query": 1000 * wall / queries if queries else None}
