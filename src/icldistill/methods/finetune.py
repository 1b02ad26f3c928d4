"""Training a model on pattern-rendered queries without demonstrations: what PBFT and distillation share.

A method hands over its training examples and a loss; this module loads and wraps the model, builds
right-padded batches of the rendered queries, runs the one training loop, evaluates the trained model
(with no demonstrations, which is the point), saves the adapter and returns the seed's record.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from icldistill.config import DistillOptions, PbftOptions, TrainOptions
from icldistill.errors import ConfigError, IcldError
from icldistill.methods.common import Setup, evaluate_on_sets, model_record, prediction_rows, seed_resources
from icldistill.models.adapters import TrainableSummary, prepare_trainable, writing
from icldistill.models.loading import LoadedModel, load_model
from icldistill.runtime import distributed
from icldistill.runtime.records import measure
from icldistill.runtime.rundir import SEED_RESULT_FILE, RunDir, identity_of
from icldistill.scoring.encoding import fits_in_context, tokenize_prompts
from icldistill.scoring.prefix_cache import last_token_logits, pad_right, rows_forward
from icldistill.tasks.data import Example
from icldistill.training.loop import LossFn, OnEvaluate, TrainResult, fit
from icldistill.training.losses import LossOutput

logger = logging.getLogger(__name__)

SEED_RESULT = SEED_RESULT_FILE


@dataclasses.dataclass(frozen=True)
class StudentBatch:
    """One training micro-batch of the student: its rows' prompts (right-padded too) and each class's label word.

    Data only; how a class is scored from its word's tokens (``--label-score``) is the loss's setting.
    """

    input_ids: torch.Tensor  # (batch, longest) right-padded prompts
    lengths: torch.Tensor  # (batch,) each prompt's length
    labels: torch.Tensor  # (batch,) gold classes
    indices: list[int]  # the rows' positions in the training examples (the teacher signal's rows)
    prompts: list[list[int]]  # the prompts unpadded
    continuations: list[list[list[int]]]  # per row, per class: the label word's tokens after the prompt
    pad_id: int
    n_tokens: int  # prompt tokens in the batch (the loop counts them)


@dataclasses.dataclass
class StudentBatchBuilder:
    """Right-padded batches of the student's inputs: the rendered query alone, no demonstrations.

    Each prompt is tokenized whole (start tokens + query text) and each class's label word as its
    continuation, exactly as evaluation tokenizes a prompt with no demonstrations, so training and
    evaluation score the same tokens.
    """

    ids: list[list[int]]
    labels: torch.Tensor
    pad_id: int
    device: torch.device
    continuations: list[list[list[int]]]

    @classmethod
    def build(cls, model: LoadedModel, setup: Setup, examples: Sequence[Example]) -> StudentBatchBuilder:
        texts = [setup.pattern.render(ex.fields) for ex in examples]
        tokens = tokenize_prompts(model.tokenizer, "", texts, setup.pattern.label_words, model.name)
        ids = [tokens.prefix_ids + q for q in tokens.query_ids]
        too_long = [ex.id for ex, q, conts in zip(examples, tokens.query_ids, tokens.continuations)
                    if not fits_in_context(len(tokens.prefix_ids), q, conts, model.max_length)]
        if too_long:
            raise IcldError(f"Training examples {too_long[:5]} exceed {model.name}'s {model.max_length} tokens.")
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        return cls(ids, torch.tensor([ex.label for ex in examples]), pad, model.device, tokens.continuations)

    def __call__(self, indices: Sequence[int]) -> StudentBatch:
        input_ids, lengths = pad_right([self.ids[i] for i in indices], self.pad_id, self.device)
        return StudentBatch(input_ids, lengths, self.labels[list(indices)].to(self.device), list(indices),
                            [self.ids[i] for i in indices], [self.continuations[i] for i in indices], self.pad_id,
                            int(lengths.sum()))


def student_logits(model: torch.nn.Module, batch: StudentBatch) -> torch.Tensor:
    """(batch, vocab) logits at each row's last token: the student's answer position."""
    return last_token_logits(model, batch.input_ids, batch.lengths)


def student_label_scores(model: torch.nn.Module, batch: StudentBatch,
                         label_score: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, vocab) answer-position logits and (batch, C) class scores of the student, differentiable.

    A class's score is the sum (or mean, ``--label-score``) of its label word's token log-probabilities
    after the query: the same scores evaluation and the teacher compute, so label-space losses work for
    any label words and across tokenizers (``losses.class_log_probs`` turns them into a distribution).
    Single-token words take one position per row (the fast path).
    """
    return rows_forward(model, batch.prompts, batch.continuations, pad_id=batch.pad_id, label_score=label_score)


def mixed_precision_for(dtype: str, device: torch.device) -> str:
    """Weights stay fp32 and bf16 autocast does the compute (the paper's BF16; FP16 gave it NaN).

    Whether bf16 is used is decided by ``models.loading.resolve_dtype``, the same check ``--dtype`` uses:
    ``auto`` is bf16 only on a GPU with native bf16, and ``bf16`` on a GPU without it is an error.
    """
    from icldistill.models.loading import resolve_dtype

    resolved = resolve_dtype(dtype, device)
    if resolved is torch.bfloat16:
        return "bf16"
    if resolved is torch.float16:
        return "fp16"
    return "no"


def dev_metrics(model: LoadedModel, setup: Setup, examples: Sequence[Example], demonstrations: Sequence[Example] = (),
                *, batch_size: int, use_prefix_cache: bool = True) -> dict[str, Any]:
    """Accuracy and mean log-loss (over the label words) of ``model`` on dev rows, with optional demonstrations.

    The dev rows come from the train split, so nothing here ever looks at an evaluation set.
    """
    from icldistill.scoring.evalsets import evaluate_examples

    metrics, predictions, _ = evaluate_examples(model, setup.family, setup.pattern, list(demonstrations), examples,
                                                batch_size=batch_size, use_prefix_cache=use_prefix_cache,
                                                label_score=setup.label_score)
    return {**summarise_predictions(predictions), "dropped": metrics["dropped"],
            "calibrated_accuracy": metrics.get("calibrated_accuracy")}


def summarise_predictions(predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``n``, ``accuracy`` and ``loss`` (mean negative log-probability of the gold label word, the label
    words renormalised) of a list of predictions with ``gold`` and ``label_logprobs``."""
    if not predictions:
        return {"n": 0, "accuracy": None, "loss": None}
    lp = torch.log_softmax(torch.tensor([p["label_logprobs"] for p in predictions], dtype=torch.float64), dim=-1)
    gold = torch.tensor([p["gold"] for p in predictions])
    return {"n": len(predictions), "accuracy": float((lp.argmax(-1) == gold).double().mean()),
            "loss": float(-lp[torch.arange(len(gold)), gold].mean())}


@dataclasses.dataclass
class SeedJob:
    """What one seed's training needs beyond the run's config: what differs between the methods and the seeds.

    ``dev_examples`` (rows of the train split, disjoint from everything else) are scored before training,
    during training and for ``--select``. ``before_training(student_dev_metrics)`` returns fields for the
    record (distillation's ICL-gain check). ``labelled_examples`` is the method's label budget without the
    dev split (which is added when ``--select best`` uses its labels). ``other_peaks_mb`` are peaks paid
    outside the seed's training (the teacher pass) that enter the run's overall peak; ``extra_record`` is
    added to the seed's record as is.
    """

    method: str
    seed: int
    seed_dir: Path
    model_name: str
    train_examples: Sequence[Example]
    loss_fn: LossFn
    dev_examples: Sequence[Example] = ()
    labelled_examples: int | None = None
    before_training: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    other_peaks_mb: dict[str, float] | None = None
    extra_record: dict[str, Any] | None = None


TrainedConfig = PbftOptions | DistillOptions
"""A training method's options: the common ones (model loading, evaluation) and the training ones."""


def train_and_evaluate(config: TrainedConfig, setup: Setup, job: SeedJob, *, on_evaluate: OnEvaluate | None = None,
                       score_eval_sets: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train ``job.model_name`` on ``job.train_examples`` with ``job.loss_fn``; evaluate; save.

    The evaluation sets are scored once, after training, on the selected state. ``on_evaluate`` goes to
    ``fit`` (a tuner's pruning hook); ``score_eval_sets=False`` scores the dev split only (tuning trials
    never look at the evaluation sets).

    Returns the seed's record (also written to ``seed_dir/seed_result.json``, which a resumed run reuses).
    Under N processes every rank trains and evaluates its share and holds the same record; rank 0 writes.
    """
    run_dir, identity = RunDir(job.seed_dir.parent), identity_of(job.method, config)
    # Rank 0 decides (and reads) for all ranks, so they all skip the seed or all train it; another run's seed
    # is refused, and an unreadable seed record names its file.
    finished = run_dir.finished_seed(job.seed, identity) if config.resume else None
    if finished is not None:
        logger.info("seed %d already complete in %s", job.seed, job.seed_dir)
        return finished
    if config.merge and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError("--merge is not available under FSDP (the parameters are sharded across processes): "
                          "train without it and merge the saved adapter afterwards in one process.")
    torch.manual_seed(job.seed)
    student, trainable = _load_student(config, setup, job)
    trained = _Trained(student, trainable, mixed_precision_for(config.dtype, student.device))
    trained.train(config, setup, job, on_evaluate, progress)
    final, predictions, inference = trained.final_evaluation(config, setup, score_eval_sets)
    with writing(job.seed_dir, "the trained model", resumable=True):  # disk full: one line; a resume loses nothing
        artefacts = save_trained(student.model, student, config, job.seed_dir,
                                 gathered=trained.result.final_trainable_state)
    run_dir.write_predictions(prediction_rows(job.seed, predictions), seed=job.seed)  # rows as icl's (issue 11)
    record = {**trained.record(config, job, final, artefacts, inference), "identity": identity}
    run_dir.write_seed(job.seed, record)  # rank 0 writes, artefact paths relative to the seed directory
    return record


def _load_student(config: TrainedConfig, setup: Setup, job: SeedJob) -> tuple[LoadedModel, TrainableSummary]:
    """The student, loaded in fp32 (bf16 is applied by autocast in the loop) and made trainable."""
    loaded = load_model(job.model_name, dtype="fp32", device=config.device, cache_dir=config.cache_dir,
                        revision=config.revision, trust_remote_code=config.trust_remote_code)
    setup.check_tokenizer(loaded.tokenizer, loaded.name)
    model, trainable = prepare_trainable(loaded.model, config)
    return dataclasses.replace(loaded, model=model), trainable


@dataclasses.dataclass
class _Trained:
    """One seed's student through training and its final evaluation, and what each part measured."""

    student: LoadedModel
    trainable: TrainableSummary
    precision: str
    result: TrainResult = dataclasses.field(default_factory=TrainResult)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)  # the training part's time and memory
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # dev metrics before training, ICL gain

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.student.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def train(self, config: TrainedConfig, setup: Setup, job: SeedJob, on_evaluate: OnEvaluate | None,
              progress: bool) -> None:
        """Score the dev split before training (and the method's check on it), then run the loop."""
        batches = StudentBatchBuilder.build(self.student, setup, job.train_examples)

        def evaluate_dev(m: torch.nn.Module) -> dict[str, Any]:
            """The student on the dev split, without demonstrations (what distillation is for)."""
            with self.autocast():
                return dev_metrics(dataclasses.replace(self.student, model=m), setup, job.dev_examples,
                                   batch_size=config.batch_size, use_prefix_cache=config.prefix_cache)

        model = self.student.model
        if job.dev_examples:
            model.eval()
            before = evaluate_dev(model)
            self.extra["dev_before_training"] = before
            if job.before_training is not None:
                self.extra.update(job.before_training(before))
        with measure(self.student.device) as training:
            self.result = fit(model, len(job.train_examples), batches, job.loss_fn, config, seed=job.seed,
                              mixed_precision=self.precision, cpu=self.student.device.type == "cpu",
                              checkpoint_dir=job.seed_dir, evaluate=evaluate_dev if job.dev_examples else None,
                              on_evaluate=on_evaluate, progress=progress, identity=identity_of(job.method, config))
        self.training = training.as_dict()

    def final_evaluation(self, config: TrainedConfig, setup: Setup, score_eval_sets: bool
                         ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], dict[str, Any]]:
        """The evaluation sets, scored once on the selected state; also the measurement of the inference cost."""
        self.student.model.eval()
        final: dict[str, Any] = {}
        predictions: dict[str, list[dict[str, Any]]] = {}
        with measure(self.student.device) as cost, self.autocast():
            if score_eval_sets:
                final, predictions, _ = evaluate_on_sets(self.student, setup, [], batch_size=config.batch_size,
                                                         progress=False, use_prefix_cache=config.prefix_cache)
        queries = sum(v["n"] for v in final.values())
        inference = {**cost.as_dict(), "queries": queries,
                     "latency_ms_per_query": 1000 * cost.wall_time_s / max(queries, 1)}
        return final, predictions, inference

    def record(self, config: TrainedConfig, job: SeedJob, final: dict[str, Any], artefacts: dict[str, str],
               inference: dict[str, Any]) -> dict[str, Any]:
        """The seed's record (``seed_result.json``)."""
        result, training = self.result, self.training
        selection_labels = len(job.dev_examples) if config.select == "best" else 0
        return {
            "seed": job.seed, "method": job.method, "status": "complete", "student": model_record(self.student),
            "trainable": self.trainable.as_dict(), "train_examples": [ex.id for ex in job.train_examples],
            "dev_examples": [ex.id for ex in job.dev_examples],
            "labelled_examples": None if job.labelled_examples is None else job.labelled_examples + selection_labels,
            "history": result.history, "selected": result.selected, "stopped_early": result.stopped_early,
            "eval": final, "artefacts": artefacts,
            "resources": seed_resources(result, training, inference, job.other_peaks_mb),
            **self.extra,
            **(job.extra_record or {}),
        }


def save_trained(model: torch.nn.Module, student: LoadedModel, options: TrainOptions, seed_dir: Path, *,
                 gathered: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """LoRA: the adapter in peft format (``PeftModel.from_pretrained``), and with --merge a plain model.

    BitFit and full fine-tuning: the trainable tensors as safetensors (the base is the model's own files).
    Rank 0 writes; every rank returns the same paths. ``gathered`` is the trained state where the
    parameters are sharded across ranks (``TrainResult.final_trainable_state``), read instead of the model.
    """
    from icldistill.models.adapters import save_tensors, share_files
    from icldistill.training.loop import trainable_state

    out: dict[str, str] = {}
    write = distributed.is_main()
    if write:  # without per-epoch checkpoints nothing has made the seed's directory yet
        seed_dir.mkdir(parents=True, exist_ok=True)
    if options.peft == "lora":
        adapter = seed_dir / "adapter"
        if write:
            model.save_pretrained(str(adapter), **({"state_dict": gathered} if gathered is not None else {}))
            share_files(adapter)  # safetensors writes 0600; the umask's mode like every other file
        out["adapter"] = str(adapter)
        if options.merge:
            merged_dir = seed_dir / "merged"
            if write:
                merged = model.merge_and_unload()
                merged.save_pretrained(str(merged_dir))
                student.tokenizer.save_pretrained(str(merged_dir))
                share_files(merged_dir)
            out["merged"] = str(merged_dir)
    else:
        path = seed_dir / "trainable.safetensors"
        if write:
            save_tensors(gathered if gathered is not None else trainable_state(model), path)
        out["trainable"] = str(path)
    return out


def ce_only(label_score: str = "sum") -> LossFn:
    """The PBFT loss: cross-entropy of the gold label word over the label words, summed over the batch."""
    from icldistill.training.losses import ce_loss, class_log_probs

    def loss_fn(model: torch.nn.Module, batch: StudentBatch) -> LossOutput:
        lp = class_log_probs(student_label_scores(model, batch, label_score)[1])
        ce = ce_loss(lp, batch.labels, reduction="sum")
        return LossOutput(ce, None, ce.detach())

    return loss_fn
