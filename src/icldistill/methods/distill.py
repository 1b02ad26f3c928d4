"""Context distillation (CD): train a student without demonstrations to answer like a teacher with them.

Student loss ``alpha * KL(teacher || student) + (1 - alpha) * CE(gold)`` (arXiv 2412.13243). The k
examples of a seed are the teacher's demonstrations; a disjoint sample of training queries is what the
student trains on. The teacher's signal is cached by default: computed once before training (and
reused by any later run with the same teacher, pattern, demonstrations and queries), so training runs
without the teacher in memory and costs what plain student fine-tuning costs.
"""

from __future__ import annotations

import gc
import logging
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from icldistill.runtime import distributed
from icldistill.config import DistillOptions
from icldistill.tasks.data import Example
from icldistill.errors import ConfigError
from icldistill.training.losses import LossOutput, ce_loss, check_vocab_compatible, distillation_loss, label_log_probs, topk_vocab_kl
from icldistill.models.loading import LoadedModel, load_model, load_tokenizer, model_identity
from icldistill.runtime.paths import default_cache_dir
from icldistill.runtime.records import measure
from icldistill.training.teacher import OnlineTeacher, SignalCache, TeacherSignal, compute_signal, signal_key
from icldistill.methods.common import Setup, finish_record, model_record, prepare, start_record
from icldistill.methods.finetune import student_logits, train_and_evaluate

logger = logging.getLogger(__name__)


def training_queries(setup: Setup, seed: int, n: int, contexts: Sequence[Sequence[Example]]) -> list[Example]:
    """n training queries from the train split, disjoint from every demonstration and evaluation query."""
    taken = {ex.text_key() for demos in contexts for ex in demos} | setup.query_texts
    pool = [ex for ex in setup.train.examples if ex.text_key() not in taken]
    if len(pool) < n:
        raise ConfigError(f"--train-queries {n} exceeds the {len(pool)} training rows left after the demonstrations.")
    return random.Random(f"icldistill-train-queries-{seed}").sample(pool, n)


def _check_vocab(config: DistillOptions) -> None:
    """Full-vocabulary KL needs one tokenizer for both models (checked on the tokenizers alone)."""
    t = load_tokenizer(config.teacher, cache_dir=config.cache_dir)
    s = load_tokenizer(config.student, cache_dir=config.cache_dir)
    check_vocab_compatible(len(t), len(s), config.teacher, config.student, t.get_vocab() == s.get_vocab())


def make_distill_loss(config: DistillOptions, signal_for: Callable[[dict[str, Any]], TeacherSignal]):
    """The CD loss over a batch; ``signal_for(batch)`` gives the teacher's answers for the batch's rows."""
    T, alpha = config.temperature, config.alpha

    def factory(label_ids: torch.Tensor):
        def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
            logits = student_logits(model, batch)
            student_lp = label_log_probs(logits, label_ids)
            teacher = signal_for(batch) if alpha > 0 else None
            if config.kl_space == "label":
                student_T = label_log_probs(logits, label_ids, T)
                teacher_T = torch.log_softmax(teacher.label_logprobs.to(logits.device) / T, -1) if teacher else None
                return distillation_loss(student_T, teacher_T, student_lp, batch["labels"], alpha=alpha,
                                         temperature=T, reduction="sum")
            kl = topk_vocab_kl(teacher.topk_logprobs.to(logits.device), teacher.topk_ids.to(logits.device), logits, T,
                               reduction="sum") if teacher else None
            ce = ce_loss(student_lp, batch["labels"], reduction="sum") if alpha < 1 else None
            loss = kl if ce is None else ce if kl is None else alpha * kl + (1 - alpha) * ce
            return LossOutput(loss, None if kl is None else kl.detach(), None if ce is None else ce.detach())

        return loss_fn

    return factory


def _signal_cache(config: DistillOptions) -> SignalCache:
    base = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    return SignalCache(base / "teacher")


def _load_teacher(config: DistillOptions) -> LoadedModel:
    return load_model(config.teacher, dtype=config.teacher_dtype, device=config.device, cache_dir=config.cache_dir)


def cached_signals(config: DistillOptions, setup: Setup, plan: dict[int, tuple[list, list[Example]]], topk: int,
                   progress: bool) -> tuple[dict[int, TeacherSignal], dict[str, Any]]:
    """The teacher pass: each seed's signal from the cache, or computed once and stored there.

    The key needs the teacher's identity, not its weights, so a run whose signals are all cached never
    loads the teacher. The teacher is released before training starts. Under N processes rank 0 reads
    the cache and hands the signal to every rank; on a miss every rank loads the teacher, scores its
    share of the queries, and rank 0 stores the gathered signal.
    """
    cache = _signal_cache(config)
    identity = model_identity(config.teacher, dtype=config.teacher_dtype, device=config.device, cache_dir=config.cache_dir)
    teacher: LoadedModel | None = None
    signals, keys, hits = {}, {}, 0
    with measure(config.device) as teacher_pass:
        for seed, (contexts, queries) in plan.items():
            key, description = signal_key(identity, setup.pattern, contexts, queries, setup.train.fingerprint, topk)
            signal = distributed.broadcast(cache.load(key, queries) if distributed.is_main() else None)
            if signal is None:
                teacher = teacher or _load_teacher(config)
                signal = compute_signal(teacher, setup.pattern, contexts, queries, batch_size=config.batch_size,
                                        topk=topk, use_prefix_cache=config.prefix_cache, progress=progress)
                if distributed.is_main():
                    cache.save(key, signal, description)
            else:
                hits += 1
            signals[seed], keys[str(seed)] = signal, key
    record = {**teacher_pass.as_dict(), "keys": keys, "cache_hits": hits, "cache_dir": str(cache.directory),
              "teacher": identity, "teacher_loaded": teacher is not None}
    del teacher
    gc.collect()
    return signals, record


def _from_cache(signal: TeacherSignal, queries: Sequence[Example]) -> Callable[[dict[str, Any]], TeacherSignal]:
    """The rows of a cached signal that belong to a training batch."""
    index = {qid: i for i, qid in enumerate(signal.query_ids)}

    def signal_for(batch: dict[str, Any]) -> TeacherSignal:
        rows = torch.tensor([index[queries[i].id] for i in batch["indices"]])
        return TeacherSignal([], signal.label_logprobs[rows],
                             None if signal.topk_logprobs is None else signal.topk_logprobs[rows],
                             None if signal.topk_ids is None else signal.topk_ids[rows])

    return signal_for


def _from_teacher(online: OnlineTeacher, queries: Sequence[Example], topk: int) -> Callable[[dict[str, Any]], TeacherSignal]:
    """The online teacher's answers for a training batch (its prefix caches are kept across batches)."""

    def signal_for(batch: dict[str, Any]) -> TeacherSignal:
        with torch.no_grad():
            return online([queries[i] for i in batch["indices"]], topk=topk)

    return signal_for


def run_distill(config: DistillOptions, *, progress: bool = True) -> dict[str, Any]:
    """Distil ``config.teacher`` (with k demonstrations) into ``config.student`` for each seed."""
    setup = prepare(config)
    setup.check_tokenizer(load_tokenizer(config.teacher, cache_dir=config.cache_dir), config.teacher)  # before the teacher pass
    record, out = start_record("distill", config, setup)
    plan = {}
    for seed in config.seeds:
        contexts = [setup.demonstrations(seed, config.shots, context=j) for j in range(config.teacher_contexts)]
        plan[seed] = (contexts, training_queries(setup, seed, config.train_queries, contexts))
    if config.kl_space == "vocab":
        _check_vocab(config)
    teacher: LoadedModel | None = None
    if config.teacher_signal == "cached":
        signals, record["teacher_pass"] = cached_signals(
            config, setup, plan, config.teacher_topk if config.kl_space == "vocab" else 0, progress)
    else:
        teacher = _load_teacher(config)
        record["teacher_pass"] = {"mode": "online", "teacher": model_record(teacher)}
    record["teacher_pass"].update(mode=config.teacher_signal, contexts=config.teacher_contexts)

    for seed, (contexts, queries) in plan.items():
        if teacher is None:
            signal_for = _from_cache(signals[seed], queries)
        else:
            # Online vocabulary KL uses the teacher's whole next-token distribution.
            vocab = teacher.model.get_output_embeddings().weight.shape[0] if config.kl_space == "vocab" else 0
            signal_for = _from_teacher(OnlineTeacher(teacher, setup.pattern, contexts), queries, vocab)
        extra = {"demonstration_contexts": [[d.id for d in c] for c in contexts],
                 "teacher_signal": config.teacher_signal, "teacher_key": record["teacher_pass"].get("keys", {}).get(str(seed))}
        record["seeds"][str(seed)] = train_and_evaluate(
            "distill", config, config, setup, config.student, queries, make_distill_loss(config, signal_for), seed,
            out / f"seed-{seed}", extra_record=extra, progress=progress,
        )
    return finish_record(record, out)
