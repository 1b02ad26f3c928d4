"""One seed of generation distillation: load and wrap the student, train it on the signal's rows, evaluate it
without the context, save it, and write the seed's record (which ``--resume`` reuses once complete)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from icldistill.config import GenDistillOptions
from icldistill.methods.common import model_record, seed_resources
from icldistill.methods.finetune import mixed_precision_for, save_trained
from icldistill.methods.gen_setup import GenSetup, RunJournals, encode_prompts, evaluate_generation
from icldistill.methods.gen_teacher import TeacherAnswers, context_prefix, end_token
from icldistill.methods.gen_train import (
    FixedAnswers,
    OnPolicyAnswers,
    dev_evaluator,
    make_loss,
    reference_tokens,
    sequence_tokens,
)
from icldistill.models.adapters import prepare_trainable
from icldistill.models.loading import LoadedModel, load_model
from icldistill.runtime.records import measure
from icldistill.runtime.rundir import RunDir
from icldistill.tasks.generation import GenerationRow
from icldistill.training.loop import MakeBatch, OnEvaluate, TrainResult, fit

logger = logging.getLogger(__name__)


@dataclass
class SeedPlan:
    """A seed's rows, all disjoint: the teacher's demonstrations, the dev rows and the training queries."""

    demonstrations: list[GenerationRow]
    dev: list[GenerationRow]
    queries: list[GenerationRow]


def labelled_examples(config: GenDistillOptions, plan: SeedPlan) -> int:
    """The labels a seed uses: the teacher's demonstrations, or for ``reference`` the training queries' references
    (its demonstrations are drawn, so every signal trains on the same queries, but never read); and the dev
    rows' references when ``--select best`` chooses by them."""
    used = len(plan.queries) if config.signal == "reference" else len(plan.demonstrations)
    return used + (len(plan.dev) if config.select == "best" else 0)


def _pad(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@dataclass
class SeedRun:
    """A seed's student through training and its final evaluation."""

    config: GenDistillOptions
    setup: GenSetup
    seed: int
    plan: SeedPlan
    run_dir: RunDir
    identity: str
    same_tokenizer: bool = False

    def load_student(self) -> tuple[LoadedModel, Any]:
        """The student in fp32 (bf16 through autocast), made trainable (LoRA, BitFit or full)."""
        c = self.config
        loaded = load_model(c.student, dtype="fp32", device=c.device, cache_dir=c.cache_dir, revision=c.revision,
                            trust_remote_code=c.trust_remote_code)
        model, trainable = prepare_trainable(loaded.model, c)
        return dataclasses.replace(loaded, model=model), trainable

    def batches(self, student: LoadedModel, answers: TeacherAnswers | None, teacher: LoadedModel | None) -> MakeBatch:
        """The signal's training rows: fixed answers (teacher's or references) or the student's own samples."""
        c, task, tok = self.config, self.setup.task, student.tokenizer
        eos = end_token(student.model, tok)
        prompts = encode_prompts(student, task, self.plan.queries, (), with_instruction=False)
        if c.signal == "reference":
            return FixedAnswers(prompts, reference_tokens(task, tok, eos, self.plan.queries), _pad(tok))
        if c.signal in ("sequence", "token"):
            assert answers is not None
            targets = answers.answers if c.signal == "token" else sequence_tokens(answers, tok, eos,
                                                                                  self.same_tokenizer)
            return FixedAnswers(prompts, [list(a) for a in targets], _pad(tok))
        assert teacher is not None
        teacher_prompts = encode_prompts(teacher, task, self.plan.queries, self.plan.demonstrations,
                                         with_instruction=True)
        settings = self.setup.decode_settings(c.batch_size, temperature=c.sample_temperature)
        return OnPolicyAnswers(student.model, tok, eos, prompts, teacher, teacher_prompts,
                               context_prefix(teacher.model, teacher_prompts), settings, c.resample_every,
                               self.seed, _pad(tok), _pad(teacher.tokenizer))

    def dev(self, student: LoadedModel) -> Any:
        if not self.plan.dev:
            return None
        tok, rows = student.tokenizer, self.plan.dev
        prompts = encode_prompts(student, self.setup.task, rows, (), with_instruction=False)
        refs = reference_tokens(self.setup.task, tok, end_token(student.model, tok), rows)
        return dev_evaluator(self.setup, rows, prompts, refs, tok, _pad(tok), self.seed, self.config.batch_size)

    def train(self, answers: TeacherAnswers | None, teacher_info: dict[str, Any], teacher: LoadedModel | None,
              on_evaluate: OnEvaluate | None, score_eval_sets: bool, progress: bool) -> dict[str, Any]:
        """Train, evaluate without the context, save; returns (and writes) the seed's record."""
        c = self.config
        torch.manual_seed(self.seed)
        student, trainable = self.load_student()
        make_batch = self.batches(student, answers, teacher)
        evaluate = self.dev(student)
        extra: dict[str, Any] = {}
        if evaluate is not None:
            student.model.eval()
            extra["dev_before_training"] = evaluate(student.model)
        precision = mixed_precision_for(c.dtype, student.device)
        with measure(student.device) as training:
            result = fit(student.model, len(self.plan.queries), make_batch, make_loss(c, answers), c, seed=self.seed,
                         mixed_precision=precision, cpu=student.device.type == "cpu",
                         checkpoint_dir=self.run_dir.seed_dir(self.seed), evaluate=evaluate, on_evaluate=on_evaluate,
                         progress=progress, identity=self.identity)  # another run's checkpoint is never resumed
        final, predictions, inference = self.final_evaluation(student, precision, score_eval_sets)
        artefacts = save_trained(student.model, student, c, self.run_dir.seed_dir(self.seed),
                                 gathered=result.final_trainable_state)
        self.run_dir.write_predictions(predictions, seed=self.seed)
        peaks = {"teacher_pass": teacher_info.get("peak_memory_mb")}
        record = {**self.record(student, trainable, result, final, artefacts), **extra,
                  "resources": seed_resources(result, training.as_dict(), inference, peaks),
                  "teacher_pass": dict(teacher_info) or None,
                  "on_policy_draws": getattr(make_batch, "drawn", None)}
        self.run_dir.write_seed(self.seed, record)
        self.run_dir.clear_journals(self.seed)
        return record

    def final_evaluation(self, student: LoadedModel, precision: str, score_eval_sets: bool
                         ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        """The evaluation sets, once, on the selected state, without the context; and what answering cost."""
        student.model.eval()
        final: dict[str, Any] = {}
        predictions: list[dict[str, Any]] = []
        autocast = torch.autocast(device_type=student.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with measure(student.device) as cost, autocast:
            if score_eval_sets:
                final, predictions = evaluate_generation(student, self.setup, [], seed=self.seed,
                                                         batch_size=self.config.batch_size, with_context=False,
                                                         use_prefix_cache=self.config.prefix_cache,
                                                         journal=RunJournals(self.run_dir, self.identity))
        queries = sum(v["n"] for v in final.values())
        inference = {**cost.as_dict(), "queries": queries,
                     "latency_ms_per_query": 1000 * cost.wall_time_s / max(queries, 1)}
        return final, predictions, inference

    def record(self, student: LoadedModel, trainable: Any, result: TrainResult, final: dict[str, Any],
               artefacts: dict[str, str]) -> dict[str, Any]:
        p = self.plan
        return {"seed": self.seed, "method": "gen-distill", "status": "complete", "identity": self.identity,
                "signal": self.config.signal, "student": model_record(student), "trainable": trainable.as_dict(),
                "demonstrations": [d.id for d in p.demonstrations], "train_queries": [r.id for r in p.queries],
                "dev_examples": [r.id for r in p.dev], "labelled_examples": labelled_examples(self.config, p),
                "history": result.history, "selected": result.selected, "stopped_early": result.stopped_early,
                "eval": final, "artefacts": artefacts}
