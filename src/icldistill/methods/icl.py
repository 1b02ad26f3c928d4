"""In-context learning evaluation: k demonstrations + query, label-word scoring, over seeds.

Each seed draws one fixed demonstration context, shared by every query; the context goes through the
model once and its key/value cache serves all queries (``--no-prefix-cache`` disables that).
"""

from __future__ import annotations

import logging
from typing import Any

from icldistill.config import IclOptions
from icldistill.methods.common import (
    aggregate,
    claim_run,
    evaluate_on_sets,
    inference_record,
    model_record,
    prediction_rows,
    prepare,
)
from icldistill.models.loading import load_model
from icldistill.runtime.records import measure
from icldistill.scoring.evalsets import ContextTooLong

logger = logging.getLogger(__name__)


def run_icl(config: IclOptions, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``config.model`` with ``config.shots`` demonstrations on every evaluation set and seed.

    Writes ``results.json`` and ``predictions.jsonl`` to ``config.output_dir`` (atomically) and
    returns the results record.
    """
    setup = prepare(config)
    record, run_dir = claim_run("icl", config, setup)
    with measure(config.device) as total:
        model = load_model(config.model, dtype=config.dtype, device=config.device, cache_dir=config.cache_dir,
                           revision=config.revision, trust_remote_code=config.trust_remote_code)
        setup.check_tokenizer(model.tokenizer, model.name)
        record["model"] = model_record(model)
        seeds: dict[str, Any] = {}
        per_seed_metrics: dict[str, Any] = {}
        predictions: list[dict[str, Any]] = []
        prompt_tokens = queries = 0
        with measure(model.device) as scoring:
            for seed in config.seeds:
                demos = setup.demonstrations(seed, config.shots)
                # ICL's label budget: the k demonstrations, nothing else.
                entry: dict[str, Any] = {"demonstrations": [d.id for d in demos], "labelled_examples": len(demos)}
                try:
                    metrics, preds, tokens = evaluate_on_sets(
                        model, setup, demos, batch_size=config.batch_size, use_prefix_cache=config.prefix_cache,
                        progress=progress, label=f"seed {seed} ",
                    )
                except ContextTooLong as exc:
                    logger.warning("seed %d skipped: %s", seed, exc)
                    entry["skipped"] = str(exc)
                    seeds[str(seed)] = entry
                    continue
                entry["eval"] = metrics
                seeds[str(seed)] = entry
                per_seed_metrics[str(seed)] = metrics
                prompt_tokens += tokens
                queries += sum(m["n"] for m in metrics.values())
                predictions += prediction_rows(seed, preds)
    record["seeds"] = seeds
    record["labelled_examples"] = config.shots
    record["aggregate"] = aggregate(per_seed_metrics)
    record["resources"] = {
        "total": total.as_dict(),
        "scoring": scoring.as_dict(),
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_per_s": prompt_tokens / scoring.wall_time_s if scoring.wall_time_s else None,
        "queries": queries,
        # What answering costs with the demonstrations in the prompt (set against a distilled student's).
        "inference": inference_record([{**scoring.as_dict(), "queries": queries}]),
        "prefix_cache": config.prefix_cache,
    }
    record["status"] = "complete" if per_seed_metrics else "skipped"
    record["resources"]["total"]["wall_time_s"] = round(run_dir.elapsed_s(), 4)  # the whole run, setup included
    run_dir.write_predictions(predictions)  # every rank holds the gathered predictions and metrics; rank 0 writes
    run_dir.write(record)
    return record
