"""Pattern-based fine-tuning (PBFT): fine-tune a model on the k support examples, CE on the label word.

The baseline that context distillation must beat (Mosbach et al. 2023). The support examples of a seed
are exactly the demonstrations ICL shows for that seed; the trained model is evaluated without any.
"""

from __future__ import annotations

from typing import Any

from icldistill.config import PbftOptions
from icldistill.methods.common import dev_split, finish_record, prepare, start_record
from icldistill.methods.finetune import SeedJob, ce_only, train_and_evaluate
from icldistill.training.loop import OnEvaluate


def run_pbft(config: PbftOptions, *, progress: bool = True, on_evaluate: OnEvaluate | None = None,
             score_eval_sets: bool = True) -> dict[str, Any]:
    """Fine-tune ``config.model`` on each seed's k support examples; write and return the results record.

    ``on_evaluate`` and ``score_eval_sets`` are for tuning trials (see ``finetune.train_and_evaluate``)."""
    setup = prepare(config)
    record, out = start_record("pbft", config, setup)
    for seed in config.seeds:
        support = setup.demonstrations(seed, config.shots)
        job = SeedJob("pbft", seed, out / f"seed-{seed}", config.model, support, ce_only(setup.label_score),
                      dev_examples=dev_split(setup, seed, config.dev_queries, support), labelled_examples=len(support))
        record["seeds"][str(seed)] = train_and_evaluate(config, setup, job, on_evaluate=on_evaluate,
                                                        score_eval_sets=score_eval_sets, progress=progress)
    return finish_record(record, out)
