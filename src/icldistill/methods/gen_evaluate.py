"""``icld eval`` of a generation student (a ``gen-distill`` run, one of its seeds, or its export) on evaluation sets.

The student answers each set's queries alone, greedily, through the one decoding path
(``methods.gen_setup.evaluate_generation`` -> ``scoring.generation``), and its answers are scored as during
the run (exact match of the extracted answer, token F1, bootstrap intervals: ``scoring.generation_metrics``).
A run is evaluated seed by seed with its own trained parameters (seed numbers kept, so ``icld compare``
pairs it with other runs); ``results.json`` and ``predictions.jsonl`` have the layout of a ``generate`` run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from icldistill.config import EvalOptions, to_dict
from icldistill.errors import ConfigError
from icldistill.methods.common import aggregate, inference_record, model_record
from icldistill.methods.gen_setup import GenSetup, evaluate_generation
from icldistill.methods.gen_source import KIND, require_eval_data, task_of
from icldistill.methods.trained import ModelSource, load_source
from icldistill.runtime.records import environment, measure
from icldistill.runtime.rundir import RECORD_VERSION, run_identity
from icldistill.tasks.data import subsample
from icldistill.tasks.generation import load_rows

logger = logging.getLogger(__name__)


def generation_eval_setup(config: EvalOptions, source: ModelSource) -> GenSetup:
    """The task the student answers (as it ran) and the rows of ``--eval`` (default: every set of the task)."""
    task = task_of(source, config.task)
    require_eval_data(task, config.model)
    names = list(config.eval or task.eval)
    unknown = [n for n in names if n not in task.eval]
    if unknown:
        raise ConfigError(f"--eval {unknown[0]}: generation task '{task.name}' has the evaluation sets "
                          f"{', '.join(task.eval)}.")
    if config.shots:
        raise ConfigError(f"--shots {config.shots}: a generation student is evaluated on the query alone; evaluate a "
                          "model with the task's context with `icld generate --model M`.")
    rows = {name: subsample(load_rows(task, task.eval[name], config.data_dir), config.limit) for name in names}
    return GenSetup(task, [], rows, frozenset(task.query_text(r) for part in rows.values() for r in part))


def _record(config: EvalOptions, setup: GenSetup, source: ModelSource) -> dict[str, Any]:
    options = json.loads(json.dumps(to_dict(config), default=str))
    task = setup.task
    return {"version": RECORD_VERSION, "method": "eval", "kind": KIND, "status": "running",
            "identity": run_identity("eval", options), "planned_seeds": list(config.seeds), "started": time.time(),
            "config": options, "task": task.name,
            "generation": {"template": task.template, "instruction": task.instruction, "shots": 0,
                           "stop": list(task.stop), "max_new_tokens": task.max_new_tokens,
                           "chat_template": task.chat_template, "extractor": task.extractor},
            "data": {name: len(rows) for name, rows in setup.eval_rows.items()}, "environment": environment(),
            "source": {"kind": source.kind, "model": config.model,
                       "run": str(source.seed_dir.parent) if source.seed_dir else None,
                       "method": (source.run_record or {}).get("method") or (source.meta or {}).get("method"),
                       "signal": (source.run_record or {}).get("signal") or (source.meta or {}).get("signal")}}


def run_gen_eval(config: EvalOptions, sources: Sequence[ModelSource]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every source (a run's seeds, or one model) on every set: (the record, its prediction rows); not written."""
    setup = generation_eval_setup(config, sources[0])
    record = _record(config, setup, sources[0])
    seeds: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    with measure(config.device) as total:
        for source in sources:
            model = load_source(source, dtype=config.dtype, device=config.device, cache_dir=config.cache_dir)
            record.setdefault("model", model_record(model))
            for seed in [source.seed] if source.seed is not None else config.seeds:
                with measure(model.device) as cost:
                    metrics, rows = evaluate_generation(model, setup, [], seed=seed, batch_size=config.batch_size,
                                                        with_context=False, use_prefix_cache=config.prefix_cache)
                parts.append({**cost.as_dict(), "queries": sum(m["n"] for m in metrics.values())})
                seeds[str(seed)] = {"demonstrations": [], "labelled_examples": 0, "eval": metrics,
                                    "status": "complete"}
                predictions += rows
            del model
    record["seeds"] = seeds
    record["aggregate"] = aggregate({s: e["eval"] for s, e in seeds.items()})
    record["resources"] = {"total": total.as_dict(), "inference": inference_record(parts),
                           "prefix_cache": config.prefix_cache}
    record["status"] = "complete"
    return record, predictions
