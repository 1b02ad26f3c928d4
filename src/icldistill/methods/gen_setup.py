"""What every generation method shares: the task and its rows, the seed's context, prompts, and the scored answers.

The generation counterpart of ``methods.common``: resolved before any model loads (bad options and data
fail first), then prompts are rendered for a model's tokenizer (chat template or plain), answers are
decoded through the shared-prefix cache (``scoring.generation``) and scored (``scoring.generation_metrics``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from icldistill.config import GenerationOptions, to_dict
from icldistill.errors import ConfigError
from icldistill.methods.common import output_dir
from icldistill.models.loading import LoadedModel
from icldistill.runtime import distributed
from icldistill.runtime.records import environment
from icldistill.runtime.rundir import RECORD_VERSION, RunDir, probe_writable, run_identity
from icldistill.scoring.answer_journal import AnswerJournal, journal_key
from icldistill.scoring.encoding import encode_text
from icldistill.scoring.generation import DecodeSettings, Generated, generate
from icldistill.scoring.generation_metrics import Extractor, generation_metrics, score_answer
from icldistill.tasks.data import subsample
from icldistill.tasks.generation import (
    GenerationRow,
    GenerationTask,
    draw_demonstrations,
    get_generation_task,
    load_rows,
    render_prompt,
    uses_chat_template,
)


@dataclass
class GenSetup:
    """A generation run's task (with the options' overrides applied), its rows, and the evaluation queries."""

    task: GenerationTask
    train: list[GenerationRow]
    eval_rows: dict[str, list[GenerationRow]]
    query_texts: frozenset[str]

    def demonstrations(self, seed: int) -> list[GenerationRow]:
        """The seed's context demonstrations (none of them an evaluation query); [] for an instruction alone."""
        if not self.task.shots:
            return []
        return draw_demonstrations(self.task, self.train, seed, exclude=self.query_texts)

    def decode_settings(self, batch_size: int, **changes: Any) -> DecodeSettings:
        return DecodeSettings(max_new_tokens=self.task.max_new_tokens, stop=self.task.stop, batch_size=batch_size,
                              **changes)


def prepare_generation(config: GenerationOptions) -> GenSetup:
    """Resolve the task, apply the options' overrides, read the rows; fails before any model is loaded."""
    task = get_generation_task(config.task)
    overrides = {k: v for k, v in (("shots", config.shots), ("max_new_tokens", config.max_new_tokens),
                                   ("chat_template", config.chat_template)) if v is not None}
    task = dataclasses.replace(task, **overrides)
    names = config.eval or list(task.eval)
    unknown = [n for n in names if n not in task.eval]
    if unknown:
        raise ConfigError(f"--eval {unknown[0]}: task '{task.name}' has the evaluation sets {', '.join(task.eval)}.")
    eval_rows = {}
    for name in names:
        # The same seeded sample for every seed, as classification's --limit (tasks.data.subsample).
        eval_rows[name] = subsample(load_rows(task, task.eval[name], config.data_dir), config.limit)
    needs_train = task.shots > 0 or getattr(config, "train_queries", 0)
    if needs_train and task.train is None:
        raise ConfigError(f"task '{task.name}' has no train split: demonstrations and training queries need one.")
    train = load_rows(task, task.train, config.data_dir) if needs_train and task.train else []
    queries = frozenset(task.query_text(r) for rows in eval_rows.values() for r in rows)
    return GenSetup(task, train, eval_rows, queries)


def encode_prompts(model: LoadedModel, task: GenerationTask, rows: Sequence[GenerationRow],
                   demonstrations: Sequence[GenerationRow], *, with_instruction: bool) -> list[list[int]]:
    """Token ids of each row's prompt for this model: a chat template writes its own start tokens."""
    tokenizer = model.tokenizer
    chat = uses_chat_template(task, tokenizer)
    texts = [render_prompt(task, r, demonstrations, tokenizer, with_instruction=with_instruction) for r in rows]
    if chat:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [encode_text(tokenizer, t) for t in texts]


def answer_rows(task: GenerationTask, rows: Sequence[GenerationRow], answers: Sequence[Generated], seed: int,
                eval_name: str) -> list[dict[str, Any]]:
    """The per-query rows of ``predictions.jsonl`` for generation: the answer, its extraction and its scores."""
    extractor = Extractor(task.extractor, task.answer_pattern)
    out = []
    for row, answer in zip(rows, answers):
        scored = score_answer(answer.text, row.reference, extractor)
        out.append({"seed": seed, "eval": eval_name, "id": row.id, "text": answer.text, **scored,
                    "tokens": len(answer.tokens), "finish": answer.finish})
    return out


@dataclass(frozen=True)
class RunJournals:
    """Where a run journals its decode batches (``scoring.answer_journal``): its directory, one journal per
    seed and evaluation set, each keyed by the run's identity so that another run's answers are never used."""

    run_dir: RunDir
    identity: str

    def of(self, seed: int, name: str, prompts: Sequence[Sequence[int]], settings: DecodeSettings
           ) -> AnswerJournal | None:
        """The journal of one seed's answers to set ``name``; rank 0 alone keeps one."""
        if not distributed.is_main():
            return None
        key = journal_key(prompts, settings, self.identity, seed, name)
        return AnswerJournal(self.run_dir.journal_path(seed, name), key)


def evaluate_generation(model: LoadedModel, setup: GenSetup, demonstrations: Sequence[GenerationRow], *, seed: int,
                        batch_size: int, with_context: bool, use_prefix_cache: bool = True,
                        journal: RunJournals | None = None
                        ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Greedy answers on every evaluation set; (metrics per set, prediction rows).

    With ``journal`` each finished decode batch is journalled in the run directory, so that a killed run
    resumes at its next batch (the caller clears the journals once the answers are in its records:
    ``RunDir.clear_journals``).
    """
    metrics, predictions = {}, []
    settings = setup.decode_settings(batch_size)
    demos = demonstrations if with_context else ()
    for name, rows in setup.eval_rows.items():
        prompts = encode_prompts(model, setup.task, rows, demos, with_instruction=with_context)
        answers = generate(model.model, model.tokenizer, prompts, settings, use_prefix_cache=use_prefix_cache,
                           journal=journal.of(seed, name, prompts, settings) if journal else None)
        scored = answer_rows(setup.task, rows, answers, seed, name)
        metrics[name] = generation_metrics(scored, seed=seed)
        predictions += scored
    return metrics, predictions


def claim_generation_run(method: str, config: GenerationOptions, setup: GenSetup) -> tuple[dict[str, Any], RunDir]:
    """The run's first record (what ran, on what, its identity), its directory claimed before any model loads."""
    if config.cache_dir:
        probe_writable(config.cache_dir, "--cache-dir")
    options = json.loads(json.dumps(to_dict(config), default=str))
    task = setup.task
    record = {"version": RECORD_VERSION, "method": method, "status": "running", "kind": "generation",
              "identity": run_identity(method, options), "planned_seeds": list(config.seeds), "started": time.time(),
              "config": options, "task": task.name,
              "generation": {"template": task.template, "instruction": task.instruction, "shots": task.shots,
                             "stop": list(task.stop), "max_new_tokens": task.max_new_tokens,
                             "chat_template": task.chat_template, "extractor": task.extractor},
              "data": {name: len(rows) for name, rows in setup.eval_rows.items()}, "environment": environment()}
    run_dir = RunDir(output_dir(config))
    run_dir.claim(record, overwrite=config.overwrite)
    return record, run_dir
