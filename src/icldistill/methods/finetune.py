"""Training a model on pattern-rendered queries without demonstrations: what PBFT and distillation share.

A method hands over its training examples and a loss; this module loads and wraps the model, builds
right-padded batches of the rendered queries, runs the one training loop, evaluates the trained model
(with no demonstrations, which is the point), saves the adapter and returns the seed's record.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from icldistill.runtime import distributed
from icldistill.models.adapters import prepare_trainable
from icldistill.config import CommonOptions, TrainOptions
from icldistill.tasks.data import Example
from icldistill.errors import ConfigError, IcldError
from icldistill.training.losses import LossOutput
from icldistill.models.loading import LoadedModel, load_model
from icldistill.runtime.records import measure
from icldistill.runtime.rundir import SEED_RESULT_FILE, RunDir, identity_of
from icldistill.scoring.encoding import tokenize_prompts
from icldistill.scoring.prefix_cache import label_word_tokens, last_token_logits, pad_right, rows_forward
from icldistill.training.loop import OnEvaluate, fit
from icldistill.methods.common import Setup, evaluate_on_sets, model_record, prediction_rows

logger = logging.getLogger(__name__)

SEED_RESULT = SEED_RESULT_FILE


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
    continuations: list[list[list[int]]] = dataclasses.field(default_factory=list)
    label_score: str = "sum"

    @classmethod
    def build(cls, model: LoadedModel, setup: Setup, examples: Sequence[Example]) -> "StudentBatchBuilder":
        texts = [setup.pattern.render(ex.fields) for ex in examples]
        tokens = tokenize_prompts(model.tokenizer, "", texts, setup.pattern.label_words, model.name)
        ids = [tokens.prefix_ids + q for q in tokens.query_ids]
        longest = [len(row) + max(len(c) for c in conts) - 1 for row, conts in zip(ids, tokens.continuations)]
        too_long = [ex.id for ex, n in zip(examples, longest) if n > model.max_length]
        if too_long:
            raise IcldError(f"Training examples {too_long[:5]} exceed {model.name}'s {model.max_length} tokens.")
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        return cls(ids, torch.tensor([ex.label for ex in examples]), pad, model.device, tokens.continuations,
                   getattr(setup, "label_score", "sum"))

    def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
        input_ids, lengths = pad_right([self.ids[i] for i in indices], self.pad_id, self.device)
        return {"input_ids": input_ids, "lengths": lengths, "labels": self.labels[list(indices)].to(self.device),
                "indices": list(indices), "n_tokens": int(lengths.sum()),
                "prompts": [self.ids[i] for i in indices], "continuations": [self.continuations[i] for i in indices],
                "label_score": self.label_score, "pad_id": self.pad_id}


def student_logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(batch, vocab) logits at each row's last token: the student's answer position."""
    return last_token_logits(model, batch["input_ids"], batch["lengths"])


def student_label_scores(model: torch.nn.Module, batch: dict[str, Any],
                         label_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, vocab) answer-position logits and (batch, C) class scores of the student, differentiable.

    A class's score is the sum (or mean, ``--label-score``) of its label word's token log-probabilities
    after the query: the same scores evaluation and the teacher compute, so label-space losses work for
    any label words and across tokenizers (``losses.class_log_probs`` turns them into a distribution).
    Single-token words take one position per row (the fast path). A batch without the builder's
    continuations (right-padded ids only) is scored on one-token ``label_ids``.
    """
    if "continuations" not in batch:
        logits = student_logits(model, batch)
        return logits, torch.log_softmax(logits.float(), -1)[:, label_ids.to(logits.device)]
    return rows_forward(model, batch["prompts"], batch["continuations"], pad_id=batch["pad_id"],
                        label_score=batch["label_score"])


LossFactory = Callable[[torch.Tensor], Callable[[torch.nn.Module, dict[str, Any]], LossOutput]]


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


def train_and_evaluate(
    method: str,
    config: CommonOptions,
    options: TrainOptions,
    setup: Setup,
    model_name: str,
    train_examples: Sequence[Example],
    make_loss: LossFactory,
    seed: int,
    seed_dir: Path,
    *,
    dev_examples: Sequence[Example] = (),
    labelled_examples: int | None = None,
    before_training: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    other_peaks_mb: dict[str, float] | None = None,
    revision: str | None = None,
    extra_record: dict[str, Any] | None = None,
    on_evaluate: OnEvaluate | None = None,
    score_eval_sets: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model_name`` on ``train_examples`` with the loss from ``make_loss(label_ids)``; evaluate; save.

    ``dev_examples`` (rows of the train split, disjoint from everything else) are scored before training,
    during training and for ``--select``; the evaluation sets are scored once, after training, on the
    selected state. ``before_training(student_dev_metrics)`` returns fields for the record (distillation's
    ICL-gain check). ``labelled_examples`` is the method's label budget without the dev split (which is
    added when ``--select best`` uses its labels). ``other_peaks_mb`` are peaks paid outside this function
    (the teacher pass) that enter the run's overall peak. ``on_evaluate`` goes to ``fit`` (a tuner's
    pruning hook); ``score_eval_sets=False`` scores the dev split only (tuning trials never look at the
    evaluation sets).

    Returns the seed's record (also written to ``seed_dir/seed_result.json``, which a resumed run reuses).
    Under N processes every rank trains and evaluates its share and holds the same record; rank 0 writes.
    """
    run_dir, identity = RunDir(seed_dir.parent), identity_of(method, options)
    # Rank 0 decides (and reads) for all ranks, so they all skip the seed or all train it; another run's seed is refused.
    finished = run_dir.finished_seed(seed, identity) if options.resume else None
    if finished is not None:
        logger.info("seed %d already complete in %s", seed, seed_dir)
        return finished
    if options.merge and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError("--merge is not available under FSDP (the parameters are sharded across processes): "
                          "train without it and merge the saved adapter afterwards in one process.")
    torch.manual_seed(seed)
    # Weights load in fp32; bf16 is applied by autocast in the training loop.
    loaded = load_model(model_name, dtype="fp32", device=config.device, cache_dir=config.cache_dir,
                        revision=revision, trust_remote_code=config.trust_remote_code)
    setup.check_tokenizer(loaded.tokenizer, loaded.name)
    # First token of each label word (the one-position uses, e.g. vocabulary KL); class scores use every token.
    label_ids = torch.tensor([ids[0] for ids in label_word_tokens(loaded.tokenizer, setup.pattern.label_words, loaded.name)],
                             device=loaded.device)
    batches = StudentBatchBuilder.build(loaded, setup, train_examples)
    model, trainable = prepare_trainable(loaded.model, options)
    student = dataclasses.replace(loaded, model=model)

    precision = mixed_precision_for(config.dtype, student.device)

    def autocast():
        return torch.autocast(device_type=student.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def evaluate_dev(m: torch.nn.Module) -> dict[str, Any]:
        """The student on the dev split, without demonstrations (what distillation is for)."""
        with autocast():
            return dev_metrics(dataclasses.replace(student, model=m), setup, dev_examples, batch_size=config.batch_size,
                               use_prefix_cache=config.prefix_cache)

    extra: dict[str, Any] = {}
    if dev_examples:
        model.eval()
        before = evaluate_dev(model)
        extra["dev_before_training"] = before
        if before_training is not None:
            extra.update(before_training(before))

    with measure(student.device) as training:
        result = fit(model, len(train_examples), batches, make_loss(label_ids), options, seed=seed,
                     mixed_precision=precision, cpu=student.device.type == "cpu", checkpoint_dir=seed_dir,
                     evaluate=evaluate_dev if dev_examples else None, on_evaluate=on_evaluate, progress=progress)
    # The evaluation sets, scored once on the selected state; also the measurement of the inference cost.
    model.eval()
    final: dict[str, Any] = {}
    final_predictions: dict[str, list[dict[str, Any]]] = {}
    with measure(student.device) as cost, autocast():
        if score_eval_sets:
            final, final_predictions, _ = evaluate_on_sets(student, setup, [], batch_size=config.batch_size,
                                                           progress=False, use_prefix_cache=config.prefix_cache)
    queries = sum(v["n"] for v in final.values())
    inference = {**cost.as_dict(), "queries": queries, "latency_ms_per_query": 1000 * cost.wall_time_s / max(queries, 1)}
    artefacts = save_trained(model, student, options, seed_dir, gathered=result.final_trainable_state)
    run_dir.write_predictions(prediction_rows(seed, final_predictions), seed=seed)  # rows as icl's (issue 11)
    training_record = training.as_dict()
    peaks = {"training": training_record["peak_memory_mb"], "inference": inference["peak_memory_mb"],
             **(other_peaks_mb or {})}
    selection_labels = len(dev_examples) if options.select == "best" else 0
    record = {
        "seed": seed, "method": method, "status": "complete", "identity": identity, "student": model_record(student),
        "trainable": trainable.as_dict(), "train_examples": [ex.id for ex in train_examples],
        "dev_examples": [ex.id for ex in dev_examples],
        "labelled_examples": None if labelled_examples is None else labelled_examples + selection_labels,
        "history": result.history, "selected": result.selected, "stopped_early": result.stopped_early,
        "eval": final, "artefacts": artefacts,
        "resources": {"training": training_record, "steps": result.steps, "planned_steps": result.planned_steps,
                      "epochs_done": result.epochs_done, "examples_seen": result.train_examples_seen,
                      "train_tokens": result.train_tokens,
                      "train_seconds": round(result.train_seconds, 4),
                      "train_tokens_per_s": _rate(result.train_tokens, result.train_seconds),
                      "seconds_per_step": result.train_seconds / max(result.steps, 1),
                      "resumed_from_epoch": result.resumed_from_epoch, "inference": inference,
                      # What a user pays: the largest of the run's parts, each also given on its own.
                      "peak_memory_mb": {"overall": max(v for v in peaks.values() if v is not None), **peaks},
                      "memory_kind": training_record["memory_kind"]},
        **extra,
        **(extra_record or {}),
    }
    run_dir.write_seed(seed, record)  # rank 0 writes, artefact paths relative to the seed directory
    return record


def _rate(amount: float, seconds: float) -> float | None:
    return amount / seconds if seconds > 0 else None


def save_trained(model: torch.nn.Module, student: LoadedModel, options: TrainOptions, seed_dir: Path, *,
                 gathered: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """LoRA: the adapter in peft format (``PeftModel.from_pretrained``), and with --merge a plain model.

    BitFit and full fine-tuning: the trainable tensors as safetensors (the base is the model's own files).
    Rank 0 writes; every rank returns the same paths. ``gathered`` is the trained state where the
    parameters are sharded across ranks (``TrainResult.final_trainable_state``), read instead of the model.
    """
    from safetensors.torch import save_file

    from icldistill.training.loop import trainable_state

    out: dict[str, str] = {}
    write = distributed.is_main()
    if write:  # without per-epoch checkpoints nothing has made the seed's directory yet
        seed_dir.mkdir(parents=True, exist_ok=True)
    if options.peft == "lora":
        adapter = seed_dir / "adapter"
        if write:
            model.save_pretrained(str(adapter), **({"state_dict": gathered} if gathered is not None else {}))
        out["adapter"] = str(adapter)
        if options.merge:
            merged_dir = seed_dir / "merged"
            if write:
                merged = model.merge_and_unload()
                merged.save_pretrained(str(merged_dir))
                student.tokenizer.save_pretrained(str(merged_dir))
            out["merged"] = str(merged_dir)
    else:
        path = seed_dir / "trainable.safetensors"
        if write:
            save_file(gathered if gathered is not None else trainable_state(model), str(path))
        out["trainable"] = str(path)
    return out


def ce_only(label_ids: torch.Tensor) -> Callable[[torch.nn.Module, dict[str, Any]], LossOutput]:
    """The PBFT loss: cross-entropy of the gold label word over the label words, summed over the batch."""
    from icldistill.training.losses import ce_loss, class_log_probs

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        lp = class_log_probs(student_label_scores(model, batch)[1])
        ce = ce_loss(lp, batch["labels"], reduction="sum")
        return LossOutput(ce, None, ce.detach())

    return loss_fn
