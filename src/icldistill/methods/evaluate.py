"""``icld eval``: evaluate a trained student (or any model) on evaluation sets, without training.

The same metrics, ``results.json`` and ``predictions.jsonl`` as ``icld icl``; a trained run is
evaluated seed by seed with its own trained parameters (its seed numbers kept, so ``icld compare``
pairs it with other runs by seed), a plain model with ``--shots`` demonstrations per ``--seeds``.
Each evaluation set's scoring is measured as the inference cost (latency per query, peak memory).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icldistill.config import EvalOptions
from icldistill.errors import ConfigError
from icldistill.methods.common import (
    Setup,
    aggregate,
    base_record,
    evaluate_on_sets,
    inference_record,
    model_record,
    prediction_rows,
    prepare,
)
from icldistill.methods.gen_evaluate import run_gen_eval
from icldistill.methods.gen_predict import answers_generation
from icldistill.methods.gen_source import task_of
from icldistill.methods.predict import require_data, resolve_prompting
from icldistill.methods.registry import METHODS
from icldistill.methods.trained import ModelSource, load_source, resolve_source
from icldistill.runtime.records import measure
from icldistill.runtime.rundir import SEED_RESULT_FILE, RunDir, probe_writable
from icldistill.scoring.evalsets import ContextTooLong

logger = logging.getLogger(__name__)


def sources_of(name: str) -> list[ModelSource]:
    """Every model ``name`` stands for: each finished seed of a training run, or the one model/seed/export."""
    path = Path(name).expanduser()
    run_dir = RunDir(path)
    if path.is_dir() and not (path / SEED_RESULT_FILE).is_file():
        record = run_dir.read()
        if record is not None and record.method in METHODS and METHODS[record.method].trains:
            # The seeds the run's record holds, never a seed directory another run left behind.
            seeds = [s.directory for s in run_dir.held_seeds(record) if s.directory is not None]
            return [resolve_source(str(p)) for p in seeds] or [resolve_source(name)]
    return [resolve_source(name)]


def eval_setup(config: EvalOptions, source: ModelSource) -> tuple[EvalOptions, Setup]:
    """The config with task and evaluation sets resolved from the model's record, and its setup."""
    task, _, pattern = resolve_prompting(source, config.task, config.pattern, config.label_words)
    require_data(task, config.model, "icld eval reads its evaluation sets")
    resolved = dataclasses.replace(config, task=task.ref, eval=list(config.eval or task.default_eval))
    setup = prepare(resolved)
    return resolved, dataclasses.replace(setup, pattern=pattern)


def output_dir_for(config: EvalOptions, source: ModelSource) -> Path:
    """``--output-dir``, else ``RUN/eval-SETS`` beside a training run, else ``runs/eval-SETS``; never another run's."""
    name = "eval-" + "+".join(config.eval or [])
    if config.output_dir:
        out = Path(config.output_dir).expanduser()
    elif source.seed_dir is not None:
        out = source.seed_dir.parent / name
    else:
        out = Path("runs") / name
    existing = RunDir(out).read()
    if existing is not None and existing.method != "eval":
        raise ConfigError(f"{out} holds a {existing.method!r} run's results; icld eval would "
                          "overwrite them. Choose another --output-dir.")
    return out


def run_eval(config: EvalOptions, *, progress: bool = True, write: bool = True) -> dict[str, Any]:
    """Evaluate ``config.model`` on ``config.eval``; write ``results.json`` and ``predictions.jsonl``;
    return the record.

    With ``write=False`` nothing is written and the record carries its rows under ``"predictions"``.
    """
    sources = sources_of(config.model)
    if answers_generation(sources[0], config.task):  # a generation student: methods.gen_evaluate
        return _run_gen_eval(config, sources, write)
    config, setup = eval_setup(config, sources[0])
    out = output_dir_for(config, sources[0])
    if write:
        probe_writable(out, "--output-dir")
    run_dir = RunDir(out)
    record = base_record("eval", config, setup)
    record["source"] = {"kind": sources[0].kind, "model": config.model,
                        "run": str(sources[0].seed_dir.parent) if sources[0].seed_dir else None,
                        "method": (sources[0].run_record or {}).get("method")}
    seeds: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    inference: dict[str, dict[str, float]] = {}
    with measure(config.device) as total:
        for source in sources:
            model = load_source(source, dtype=config.dtype, device=config.device, cache_dir=config.cache_dir)
            record.setdefault("model", model_record(model))
            for seed in [source.seed] if source.seed is not None else config.seeds:
                entry, preds = _evaluate_seed(model, setup, config, seed, progress, inference)
                seeds[str(seed)] = entry
                predictions += preds
            del model
    record["seeds"] = seeds
    record["aggregate"] = aggregate({s: e["eval"] for s, e in seeds.items() if e.get("eval")})
    record["resources"] = {
        "total": {**total.as_dict(), "wall_time_s": round(run_dir.elapsed_s(), 4)},
        # What answering costs (the report sets a student's against the ICL teacher's on the same rows).
        "inference": inference_record(list(inference.values())) or inference_record(
            [{"wall_time_s": 0.0, "queries": 0, "peak_memory_mb": 0.0, "memory_kind": ""}]),
        "inference_by_eval": inference,
    }
    record["status"] = "complete" if any(e.get("eval") for e in seeds.values()) else "skipped"
    record["output_dir"] = str(out)
    if not write:
        return {**record, "predictions": predictions}
    run_dir.write_predictions(predictions)
    run_dir.write(record)
    return record


def _run_gen_eval(config: EvalOptions, sources: list[ModelSource], write: bool) -> dict[str, Any]:
    """The generation counterpart of :func:`run_eval`'s body: the same output directory and files."""
    config = dataclasses.replace(config, eval=list(config.eval or task_of(sources[0], config.task).eval))
    out = output_dir_for(config, sources[0])
    if write:
        probe_writable(out, "--output-dir")
    record, predictions = run_gen_eval(config, sources)
    record["output_dir"] = str(out)
    if not write:
        return {**record, "predictions": predictions}
    RunDir(out).write_predictions(predictions)
    RunDir(out).write(record)
    return record


def _evaluate_seed(model: Any, setup: Setup, config: EvalOptions, seed: int, progress: bool,
                   inference: dict[str, dict[str, float]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One seed on every set, each set measured on its own (its latency per query and peak memory)."""
    demos = setup.demonstrations(seed, config.shots)
    entry: dict[str, Any] = {"demonstrations": [d.id for d in demos], "eval": {}}
    rows: list[dict[str, Any]] = []
    for name, examples in setup.eval_examples.items():
        one = dataclasses.replace(setup, eval_examples={name: examples})
        try:
            with measure(model.device) as cost:
                metrics, preds, _ = evaluate_on_sets(model, one, demos, batch_size=config.batch_size,
                                                     use_prefix_cache=config.prefix_cache, progress=progress,
                                                     label=f"seed {seed} ")
        except ContextTooLong as exc:
            logger.warning("seed %d skipped: %s", seed, exc)
            return {**entry, "eval": {}, "skipped": str(exc)}, []
        entry["eval"][name] = metrics[name]
        n = metrics[name]["n"]
        previous = inference.get(name, {"wall_time_s": 0.0, "queries": 0, "peak_memory_mb": 0.0})
        inference[name] = {"wall_time_s": previous["wall_time_s"] + cost.wall_time_s,
                           "queries": previous["queries"] + n,
                           "peak_memory_mb": max(previous["peak_memory_mb"], cost.peak_memory_mb),
                           "memory_kind": cost.memory_kind}
        inference[name] = inference_record([inference[name]])
        rows += prediction_rows(seed, preds)
    return entry, rows


def split_by_eval(record: dict[str, Any], predictions: Sequence[dict[str, Any]],
                  name: str) -> tuple[dict[str, Any], list]:
    """The part of an eval record (and its predictions) that concerns one evaluation set."""
    part = {**record, "config": {**record["config"], "eval": [name]},
            "seeds": {s: {**e, "eval": {k: v for k, v in (e.get("eval") or {}).items() if k == name}}
                      for s, e in record["seeds"].items()},
            "aggregate": {k: v for k, v in record["aggregate"].items() if k == name}}
    by_eval = record["resources"].get("inference_by_eval", {}).get(name)
    if by_eval:
        part["resources"] = {**record["resources"], "inference": by_eval}
    return part, [p for p in predictions if p["eval"] == name]
