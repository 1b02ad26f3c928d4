"""Training a generation student on answer tokens: its batches, the four signals' losses, and its seed record.

The generation counterpart of ``finetune.train_and_evaluate``. The student sees the query alone (no
instruction, no demonstrations); each training row is (student prompt, answer tokens), laid out by
``training.sequence.answer_batch`` so that only the answer positions are ever scored: the prompt's tokens
cannot enter a loss. The answers are the teacher's (``sequence``, ``token``), the references
(``reference``) or the student's own samples, drawn afresh during training (``on-policy``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from icldistill.config import GenDistillOptions
from icldistill.methods.gen_setup import GenSetup, answer_rows
from icldistill.methods.gen_teacher import TeacherAnswers, answer_tokens, context_logits
from icldistill.scoring.generation import DecodeSettings, generate
from icldistill.scoring.generation_metrics import generation_metrics
from icldistill.scoring.prefix_cache import PrefixCache
from icldistill.tasks.generation import GenerationRow, GenerationTask, uses_chat_template
from icldistill.training.losses import LossOutput
from icldistill.training.sequence import AnswerBatch, AnswerHidden, answer_batch, answer_scores
from icldistill.training.sequence_losses import answer_ce, answer_jsd, answer_topk_kl

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenBatch:
    """One micro-batch: the laid-out rows, their positions among the training queries, and (on-policy)
    the teacher's logits at the same answer tokens."""

    rows: AnswerBatch
    indices: list[int]
    teacher_logits: torch.Tensor | AnswerHidden | None = None

    @property
    def n_tokens(self) -> int:
        return self.rows.n_tokens


@dataclass
class FixedAnswers:
    """Batches of fixed (prompt, answer) rows: the teacher's answers or the references."""

    prompts: list[list[int]]
    answers: list[list[int]]
    pad_id: int

    def __call__(self, indices: Sequence[int]) -> GenBatch:
        idx = list(indices)
        return GenBatch(answer_batch([self.prompts[i] for i in idx], [self.answers[i] for i in idx], self.pad_id),
                        idx)


@dataclass
class OnPolicyAnswers:
    """Batches of the student's own samples (without the context), scored by the teacher (with it).

    A row is sampled again the first time a batch asks for it and then every ``resample_every`` times (once
    an epoch: every N epochs), by the student as it is at that step, at ``settings.temperature`` from a
    seeded generator; the teacher's full logits at those tokens follow its context's cache.
    """

    student: Any  # the module being trained (the loop's model: the same parameters)
    tokenizer: Any
    eos: int
    prompts: list[list[int]]
    teacher: Any  # the teacher's LoadedModel
    teacher_prompts: list[list[int]]
    teacher_prefix: PrefixCache | None
    settings: DecodeSettings
    resample_every: int
    seed: int
    pad_id: int
    teacher_pad_id: int
    samples: dict[int, list[int]] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)
    drawn: int = 0

    def _resample(self, rows: list[int]) -> None:
        was_training = self.student.training
        self.student.eval()
        self.drawn += 1
        try:
            out = generate(self.student, self.tokenizer, [self.prompts[i] for i in rows], self.settings,
                           use_prefix_cache=False, seed=self.seed * 1_000_003 + self.drawn)
        finally:
            self.student.train(was_training)
        for i, g in zip(rows, out):
            self.samples[i] = answer_tokens(g, self.eos)

    def state_dict(self) -> dict[str, Any]:
        """The samples and counters a resumed run needs to train on what the uninterrupted one would (the
        loop checkpoints them): without them a resume would draw again from the resumed student."""
        return {"samples": {str(i): t for i, t in self.samples.items()},
                "seen": {str(i): n for i, n in self.seen.items()}, "drawn": self.drawn}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.samples = {int(i): list(t) for i, t in state["samples"].items()}
        self.seen = {int(i): int(n) for i, n in state["seen"].items()}
        self.drawn = int(state["drawn"])

    def __call__(self, indices: Sequence[int]) -> GenBatch:
        idx = list(indices)
        stale = [i for i in idx if i not in self.samples or self.seen.get(i, 0) % self.resample_every == 0]
        for i in idx:
            self.seen[i] = self.seen.get(i, 0) + 1
        if stale:
            self._resample(stale)
        answers = [self.samples[i] for i in idx]
        with torch.no_grad():  # the teacher's hidden states: its logits are computed a chunk at a time in the loss
            teacher = context_logits(self.teacher.model, self.teacher_prefix, [self.teacher_prompts[i] for i in idx],
                                     answers, self.teacher_pad_id, chunked=True)
        return GenBatch(answer_batch([self.prompts[i] for i in idx], answers, self.pad_id), idx, teacher)


LossFn = Callable[[torch.nn.Module, GenBatch], LossOutput]


def make_loss(config: GenDistillOptions, answers: TeacherAnswers | None) -> LossFn:
    """The signal's loss over a micro-batch, SUMMED over its sequences (each the mean over its answer tokens):
    CE (sequence, reference), alpha * top-k KL + (1 - alpha) * CE (token), generalised JSD (on-policy)."""
    signal, alpha, T = config.signal, config.alpha, config.temperature

    def loss_fn(model: torch.nn.Module, batch: GenBatch) -> LossOutput:
        rows = batch.rows
        logits = answer_scores(model, rows)  # chunked where the model allows: the logits never exist whole
        seq, device = rows.sequence.to(logits.device), logits.device
        if signal == "on-policy":
            assert batch.teacher_logits is not None
            jsd = answer_jsd(logits, batch.teacher_logits, seq, rows.n, config.beta, T, "sum")
            return LossOutput(jsd, jsd.detach(), None)
        ce = answer_ce(logits, rows.targets.to(device), seq, rows.n, "sum") if signal != "token" or alpha < 1 else None
        if signal != "token":
            return LossOutput(ce, None, ce.detach())
        assert answers is not None
        lp, ids = answers.topk_rows(batch.indices)
        kl = answer_topk_kl(lp.to(device), ids.to(device), logits, seq, rows.n, T, "sum")
        loss = alpha * kl + (1 - alpha) * ce if ce is not None else kl
        return LossOutput(loss, kl.detach(), None if ce is None else ce.detach())

    return loss_fn


def dev_evaluator(setup: GenSetup, rows: Sequence[GenerationRow], prompts: list[list[int]],
                  references: list[list[int]], tokenizer: Any, pad_id: int, seed: int, batch_size: int
                  ) -> Callable[[torch.nn.Module], dict[str, Any]]:
    """The student on the dev rows without the context: ``accuracy`` is the exact match of its greedy answers,
    ``loss`` the mean per-answer CE of the reference answers (the labelled dev objective)."""
    settings = setup.decode_settings(batch_size)

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        with torch.no_grad():
            answers = generate(model, tokenizer, prompts, settings, use_prefix_cache=False)
            scored = answer_rows(setup.task, rows, answers, seed, "dev")
            losses = []
            for start in range(0, len(rows), batch_size):
                part = slice(start, start + batch_size)
                batch = answer_batch(prompts[part], references[part], pad_id)
                logits = answer_scores(model, batch)
                losses.append(answer_ce(logits, batch.targets.to(logits.device),
                                        batch.sequence.to(logits.device), batch.n, "sum"))
        metrics = generation_metrics(scored, seed=seed)
        return {**metrics, "accuracy": metrics.get("exact_match"), "loss": float(sum(losses)) / max(len(rows), 1)}

    return evaluate


def with_model(loaded: Any, model: torch.nn.Module) -> Any:
    return dataclasses.replace(loaded, model=model)


def reference_tokens(task: GenerationTask, tokenizer: Any, eos: int, rows: Sequence[GenerationRow]
                     ) -> list[list[int]]:
    """The references as answers after the student's prompt, as a demonstration writes them, ended by EOS."""
    chat = uses_chat_template(task, tokenizer)
    out = []
    for r in rows:
        text = task.answer_template.format(answer=r.reference)
        out.append(list(tokenizer(text.strip() if chat else text, add_special_tokens=False)["input_ids"]) + [eos])
    return out


def sequence_tokens(answers: TeacherAnswers, tokenizer: Any, eos: int, same_tokenizer: bool) -> list[list[int]]:
    """The teacher's answers as the student's targets: its tokens under one tokenizer (its EOS replaced by the
    student's), else its text re-tokenized; EOS ends every answer the teacher ended."""
    out = []
    for tokens, text, finish in zip(answers.answers, answers.texts, answers.finish):
        if same_tokenizer:
            body = tokens[:-1] if finish == "eos" else list(tokens)
        else:
            body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ended = finish == "eos" or (finish == "stop" and not same_tokenizer)
        out.append(body + [eos] if ended or not body else body)
    return out
