"""ICL for generation: a model answers each query greedily, with the task's context (instruction and k
demonstrations, prefilled once per seed and shared through the KV cache) or without it (``--no-context``,
the student's zero-shot baseline); answers are scored against the references (exact match, token F1).
"""

from __future__ import annotations

import logging
from typing import Any

from icldistill.config import GenerateOptions
from icldistill.methods.common import aggregate, inference_record, model_record
from icldistill.methods.gen_setup import (
    GenSetup,
    RunJournals,
    claim_generation_run,
    evaluate_generation,
    prepare_generation,
)
from icldistill.models.loading import LoadedModel, load_model
from icldistill.runtime.records import measure

logger = logging.getLogger(__name__)


def run_generate(config: GenerateOptions, *, progress: bool = True) -> dict[str, Any]:
    """Answer every evaluation set for every seed; write ``results.json`` and ``predictions.jsonl``."""
    setup = prepare_generation(config)
    record, run_dir = claim_generation_run("generate", config, setup)
    with measure(config.device) as total:
        model = load_model(config.model, dtype=config.dtype, device=config.device, cache_dir=config.cache_dir,
                           revision=config.revision, trust_remote_code=config.trust_remote_code)
        record["model"] = model_record(model)
        journals = RunJournals(run_dir, record["identity"])
        seeds, predictions, parts = _answer_seeds(config, setup, model, journals, progress)
    record["seeds"] = seeds
    record["labelled_examples"] = setup.task.shots if config.context else 0
    record["aggregate"] = aggregate({s: e["eval"] for s, e in seeds.items()})
    record["resources"] = {"total": {**total.as_dict(), "wall_time_s": round(run_dir.elapsed_s(), 4)},
                           "inference": inference_record(parts), "prefix_cache": config.prefix_cache}
    record["status"] = "complete"
    run_dir.write_predictions(predictions)
    run_dir.write(record)
    run_dir.clear_journals()
    return record


def _answer_seeds(config: GenerateOptions, setup: GenSetup, model: LoadedModel, journal: RunJournals,
                  progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Each seed's answers: (seed entries, prediction rows, measured parts for the inference cost)."""
    seeds: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    parts = []
    for seed in config.seeds:
        demos = setup.demonstrations(seed) if config.context else []
        with measure(model.device) as cost:
            metrics, rows = evaluate_generation(model, setup, demos, seed=seed, batch_size=config.batch_size,
                                                with_context=config.context, use_prefix_cache=config.prefix_cache,
                                                journal=journal)
        queries = sum(m["n"] for m in metrics.values())
        parts.append({**cost.as_dict(), "queries": queries})
        seeds[str(seed)] = {"demonstrations": [d.id for d in demos], "labelled_examples": len(demos),
                            "eval": metrics, "status": "complete"}
        predictions += rows
        if progress:
            logger.info("seed %d: %s", seed, {n: round(m.get("exact_match", 0.0), 3) for n, m in metrics.items()})
    return seeds, predictions, parts
