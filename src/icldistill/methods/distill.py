"""Context distillation (CD): train a student without demonstrations to answer like a teacher with them.

Student loss ``alpha * KL(teacher || student) + (1 - alpha) * CE(target)`` (arXiv 2412.13243), the CE
target being the gold label (the paper's) or the teacher's predicted class (``--ce-target teacher``). The k
examples of a seed are the teacher's demonstrations; a disjoint sample of training queries is what the
student trains on. The teacher's signal is cached by default: computed once before training (and
reused by any later run with the same teacher, pattern, demonstrations and queries), so training runs
without the teacher in memory and costs what plain student fine-tuning costs.
"""

from __future__ import annotations

import gc
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from icldistill.runtime import distributed
from icldistill.config import DistillOptions
from icldistill.tasks.data import Example
from icldistill.errors import ConfigError
from icldistill.training.losses import (LossOutput, ce_loss, check_vocab_compatible, class_log_probs, distillation_loss,
                                       tempered_context_average, topk_vocab_kl)
from icldistill.models.loading import LoadedModel, load_model, load_tokenizer, logit_width, model_identity
from icldistill.runtime.paths import default_cache_dir
from icldistill.runtime.records import measure
from icldistill.training.teacher import OnlineTeacher, SignalCache, TeacherSignal, compute_signal, signal_key
from icldistill.training.loop import OnEvaluate
from icldistill.methods.common import Setup, dev_split, finish_record, model_record, prepare, start_record
from icldistill.methods.finetune import student_label_scores, summarise_predictions, train_and_evaluate

logger = logging.getLogger(__name__)


def training_queries(setup: Setup, seed: int, n: int, contexts: Sequence[Sequence[Example]],
                     exclude: Sequence[Example] = ()) -> list[Example]:
    """n training queries from the train split, disjoint from every demonstration, dev row and evaluation query."""
    taken = {ex.text_key() for demos in contexts for ex in demos} | setup.query_texts | {ex.text_key() for ex in exclude}
    pool = [ex for ex in setup.train.examples if ex.text_key() not in taken]
    if len(pool) < n:
        raise ConfigError(f"--train-queries {n} exceeds the {len(pool)} training rows left after the demonstrations"
                          " and the dev split.")
    return random.Random(f"icldistill-train-queries-{seed}").sample(pool, n)


def _check_vocab(config: DistillOptions) -> None:
    """Full-vocabulary KL needs one tokenizer and one logit width for both models (read without the weights)."""
    t = load_tokenizer(config.teacher, cache_dir=config.cache_dir, revision=config.teacher_revision,
                       trust_remote_code=config.trust_remote_code)
    s = load_tokenizer(config.student, cache_dir=config.cache_dir, revision=config.revision,
                       trust_remote_code=config.trust_remote_code)
    widths = [logit_width(name, cache_dir=config.cache_dir, revision=rev, trust_remote_code=config.trust_remote_code)
              for name, rev in ((config.teacher, config.teacher_revision), (config.student, config.revision))]
    check_vocab_compatible(widths[0], widths[1], config.teacher, config.student, t.get_vocab() == s.get_vocab())


def labelled_examples(config: DistillOptions, contexts: Sequence[Sequence[Example]]) -> int:
    """CD's label budget: the distinct demonstrations, plus the training queries when CE uses their gold labels."""
    demos = len({d.id for c in contexts for d in c})
    uses_gold = config.ce_target == "gold" and config.alpha < 1
    return demos + (config.train_queries if uses_gold else 0)


def teacher_targets(config: DistillOptions, teacher: TeacherSignal, T: float) -> torch.Tensor:
    """(batch, C) the teacher's tempered label distribution, each context tempered before averaging."""
    if teacher.context_label_logprobs is not None and teacher.context_label_logprobs.shape[0] > 1:
        return tempered_context_average(teacher.context_label_logprobs, T)
    return torch.log_softmax(teacher.label_logprobs / T, -1)


def make_distill_loss(config: DistillOptions, signal_for: Callable[[dict[str, Any]], TeacherSignal]):
    """The CD loss over a batch; ``signal_for(batch)`` gives the teacher's answers for the batch's rows.

    With ``--ce-target teacher`` the CE term's target is the teacher's predicted class (the argmax of its
    context-averaged label distribution), so no gold label beyond the demonstrations is used.
    """
    T, alpha = config.temperature, config.alpha
    needs_teacher = alpha > 0 or config.ce_target == "teacher"

    def factory(label_ids: torch.Tensor):
        def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
            # Class scores from whole label words (any length), as the teacher's: issue 10.
            logits, class_scores = student_label_scores(model, batch, label_ids)
            student_lp = class_log_probs(class_scores)
            signal = signal_for(batch) if needs_teacher else None
            teacher = signal if alpha > 0 else None
            labels = batch["labels"] if config.ce_target == "gold" else signal.label_logprobs.argmax(-1).to(logits.device)
            if config.kl_space == "label":
                student_T = class_log_probs(class_scores, T)
                teacher_T = teacher_targets(config, teacher, T).to(logits.device) if teacher else None
                return distillation_loss(student_T, teacher_T, student_lp, labels, alpha=alpha,
                                         temperature=T, reduction="sum")
            kl = topk_vocab_kl(teacher.topk_logprobs.to(logits.device), teacher.topk_ids.to(logits.device), logits, T,
                               reduction="sum") if teacher else None
            ce = ce_loss(student_lp, labels, reduction="sum") if alpha < 1 else None
            loss = kl if ce is None else ce if kl is None else alpha * kl + (1 - alpha) * ce
            return LossOutput(loss, None if kl is None else kl.detach(), None if ce is None else ce.detach())

        return loss_fn

    return factory


def _signal_cache(config: DistillOptions) -> SignalCache:
    base = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    return SignalCache(base / "teacher")


def _load_teacher(config: DistillOptions) -> LoadedModel:
    return load_model(config.teacher, dtype=config.teacher_dtype, device=config.device, cache_dir=config.cache_dir,
                      revision=config.teacher_revision, trust_remote_code=config.trust_remote_code)


@dataclass
class SeedPlan:
    """What the teacher pass needs for one seed: the contexts, the training queries, the dev rows."""

    contexts: list[list[Example]]
    queries: list[Example]
    dev: list[Example]


def signal_metrics(signal: TeacherSignal, examples: Sequence[Example]) -> dict[str, Any]:
    """Accuracy and log-loss of a signal's (context-averaged) label distribution against the rows' gold labels."""
    lp = signal.label_logprobs.double()
    return summarise_predictions([{"gold": ex.label, "label_logprobs": row.tolist()} for ex, row in zip(examples, lp)])


def cached_signals(config: DistillOptions, setup: Setup, plan: dict[int, SeedPlan], topk: int,
                   progress: bool) -> tuple[dict[int, TeacherSignal], dict[int, dict[str, Any]], dict[str, Any]]:
    """The teacher pass: each seed's signal from the cache, or computed once and stored there.

    Also the teacher on the seed's dev rows, with its demonstrations and zero-shot (the ICL-gain check),
    cached the same way. The key needs the teacher's identity, not its weights, so a run whose signals are
    all cached never loads the teacher. The teacher is released before training starts. Under N processes
    rank 0 reads the cache and hands the signal to every rank; on a miss every rank loads the teacher,
    scores its share of the queries, and rank 0 stores the gathered signal. Returns the signals, each
    seed's teacher pass (peak, time, cache hit, dev metrics) and the whole pass's record.
    """
    cache = _signal_cache(config)
    identity = model_identity(config.teacher, dtype=config.teacher_dtype, device=config.device,
                              cache_dir=config.cache_dir, revision=config.teacher_revision)
    teacher: LoadedModel | None = None
    signals, per_seed, keys, hits = {}, {}, {}, 0

    def signal(contexts: Sequence[Sequence[Example]], queries: Sequence[Example], k: int) -> tuple[TeacherSignal, str, bool]:
        nonlocal teacher
        key, description = signal_key(identity, setup.pattern, contexts, queries, setup.train.fingerprint, k,
                                      label_score=setup.label_score)
        found = distributed.broadcast(cache.load(key, queries) if distributed.is_main() else None)
        if found is not None:
            return found, key, True
        teacher = teacher or _load_teacher(config)
        found = compute_signal(teacher, setup.pattern, contexts, queries, batch_size=config.batch_size, topk=k,
                               label_score=setup.label_score,
                               use_prefix_cache=config.prefix_cache, progress=progress)
        if distributed.is_main():
            cache.save(key, found, description)
        return found, key, False

    with measure(config.device) as teacher_pass:
        for seed, p in plan.items():
            with measure(config.device) as seed_pass:
                signals[seed], keys[str(seed)], hit = signal(p.contexts, p.queries, topk)
                hits += hit
                dev = {}
                if p.dev:
                    dev = {"teacher_icl": signal_metrics(signal(p.contexts, p.dev, 0)[0], p.dev),
                           "teacher_zero_shot": signal_metrics(signal([[]], p.dev, 0)[0], p.dev)}
            per_seed[seed] = {**seed_pass.as_dict(), "cache_hit": bool(hit), "key": keys[str(seed)], "dev": dev}
    record = {**teacher_pass.as_dict(), "keys": keys, "cache_hits": hits, "cache_dir": str(cache.directory),
              "teacher": identity, "teacher_loaded": teacher is not None}
    del teacher
    gc.collect()
    return signals, per_seed, record


def is_better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether dev metrics ``a`` beat ``b``: higher accuracy, or equal accuracy and lower log-loss."""
    return a["accuracy"] > b["accuracy"] or (a["accuracy"] == b["accuracy"] and a["loss"] < b["loss"])


def icl_gain(teacher_dev: dict[str, Any], student_dev: dict[str, Any], seed: int) -> dict[str, Any]:
    """Is the teacher worth distilling? Its ICL accuracy and log-loss on the dev rows against the student
    zero-shot and the teacher zero-shot; warns when the teacher with demonstrations is no better than the
    student alone (distilling such a teacher has been seen to hurt)."""
    icl, zero = teacher_dev.get("teacher_icl"), teacher_dev.get("teacher_zero_shot")
    if not icl or icl.get("accuracy") is None or student_dev.get("accuracy") is None:
        return {"teacher_icl_gain": None}

    def delta(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, float | None]:
        if not a or a.get("accuracy") is None:
            return {"accuracy": None, "loss": None}
        return {"accuracy": a["accuracy"] - b["accuracy"], "loss": a["loss"] - b["loss"]}

    gain = {"dev_queries": icl["n"], "teacher_icl": icl, "teacher_zero_shot": zero, "student_zero_shot": student_dev,
            "vs_student_zero_shot": delta(icl, student_dev), "vs_teacher_zero_shot": delta(icl, zero or {})}
    # Better: higher dev accuracy, or (small dev splits tie often) the same accuracy and a lower log-loss.
    gain["worth_distilling"] = is_better(icl, student_dev)
    if not gain["worth_distilling"]:
        logger.warning(
            "seed %d: the teacher WITH its demonstrations is no better than the student alone on %d dev rows "
            "(accuracy %.3f vs %.3f, log-loss %.3f vs %.3f): distilling it is unlikely to help and has been seen to "
            "hurt. Consider a stronger teacher, more shots, or another pattern.", seed, icl["n"], icl["accuracy"],
            student_dev["accuracy"], icl["loss"], student_dev["loss"])
    return {"teacher_icl_gain": gain}


def _from_cache(signal: TeacherSignal, queries: Sequence[Example]) -> Callable[[dict[str, Any]], TeacherSignal]:
    """The rows of a cached signal that belong to a training batch."""
    index = {qid: i for i, qid in enumerate(signal.query_ids)}

    def signal_for(batch: dict[str, Any]) -> TeacherSignal:
        return signal.rows(torch.tensor([index[queries[i].id] for i in batch["indices"]]))

    return signal_for


def _within_vocab(signal: TeacherSignal, vocab: int) -> TeacherSignal:
    """Keep only the token ids below ``vocab`` (the tokenizer's real vocabulary) of a whole-width top-k.

    Embedding matrices are often padded past the tokenizer; those rows are no token, and a KL that gave
    them mass would teach the student nothing real. The loss renormalises over what is kept.
    """
    if signal.topk_ids is None or signal.topk_ids.shape[-1] == vocab:
        return signal
    keep = signal.topk_ids < vocab
    n = signal.topk_ids.shape[0]
    signal.topk_logprobs = signal.topk_logprobs[keep].view(n, vocab)
    signal.topk_ids = signal.topk_ids[keep].view(n, vocab)
    return signal


def _from_teacher(online: OnlineTeacher, queries: Sequence[Example], topk: int,
                  vocab: int = 0) -> Callable[[dict[str, Any]], TeacherSignal]:
    """The online teacher's answers for a training batch (its prefix caches are kept across batches)."""

    def signal_for(batch: dict[str, Any]) -> TeacherSignal:
        with torch.no_grad():
            found = online([queries[i] for i in batch["indices"]], topk=topk)
        return _within_vocab(found, vocab) if vocab else found

    return signal_for


def plan_seed(config: DistillOptions, setup: Setup, seed: int) -> SeedPlan:
    """The seed's demonstration contexts, dev rows and training queries, all disjoint.

    Context 0 is the seed's ICL context; the dev rows are drawn next exactly as PBFT draws them (so the two
    methods share a dev split), and the other contexts and the training queries avoid both.
    """
    first = setup.demonstrations(seed, config.shots)
    dev = dev_split(setup, seed, config.dev_queries, first)
    dev_texts = frozenset(ex.text_key() for ex in dev)
    contexts = [first] + [setup.demonstrations(seed, config.shots, context=j, exclude=dev_texts)
                          for j in range(1, config.teacher_contexts)]
    return SeedPlan(contexts, training_queries(setup, seed, config.train_queries, contexts, exclude=dev), dev)


def run_distill(config: DistillOptions, *, progress: bool = True, on_evaluate: OnEvaluate | None = None,
                score_eval_sets: bool = True) -> dict[str, Any]:
    """Distil ``config.teacher`` (with k demonstrations) into ``config.student`` for each seed.

    ``on_evaluate`` and ``score_eval_sets`` are for tuning trials (see ``finetune.train_and_evaluate``)."""
    setup = prepare(config)
    setup.check_tokenizer(load_tokenizer(config.teacher, cache_dir=config.cache_dir), config.teacher)  # before the teacher pass
    record, out = start_record("distill", config, setup)
    plan = {seed: plan_seed(config, setup, seed) for seed in config.seeds}
    if config.kl_space == "vocab":
        _check_vocab(config)
    teacher: LoadedModel | None = None
    per_seed: dict[int, dict[str, Any]] = {}
    if config.teacher_signal == "cached":
        # The top-k is stored whatever the KL space (a few hundred bytes a query), so that label- and vocab-KL
        # runs of one teacher, demonstrations and queries share one cached teacher pass.
        signals, per_seed, record["teacher_pass"] = cached_signals(config, setup, plan, config.teacher_topk, progress)
    else:
        with measure(config.device) as loading:
            teacher = _load_teacher(config)
            for seed, p in plan.items():
                dev = {}
                if p.dev:
                    dev = {name: signal_metrics(compute_signal(teacher, setup.pattern, contexts, p.dev,
                                                               batch_size=config.batch_size, progress=False,
                                                               label_score=setup.label_score), p.dev)
                           for name, contexts in (("teacher_icl", p.contexts), ("teacher_zero_shot", [[]]))}
                per_seed[seed] = {"cache_hit": False, "dev": dev}
        record["teacher_pass"] = {"mode": "online", "teacher": model_record(teacher), **loading.as_dict(),
                                  "note": "the teacher stays loaded during training: its memory is in the training peak"}
    record["teacher_pass"].update(mode=config.teacher_signal, contexts=config.teacher_contexts)

    for seed, p in plan.items():
        if teacher is None:
            signal_for = _from_cache(signals[seed], p.queries)
        else:
            # Online vocabulary KL: the teacher's whole next-token distribution, within its real vocabulary.
            width = teacher.model.get_output_embeddings().weight.shape[0] if config.kl_space == "vocab" else 0
            signal_for = _from_teacher(OnlineTeacher(teacher, setup.pattern, p.contexts, setup.label_score), p.queries, width,
                                       vocab=len(teacher.tokenizer) if width else 0)
        seed_pass = per_seed.get(seed, {})
        extra = {"demonstration_contexts": [[d.id for d in c] for c in p.contexts],
                 "teacher_signal": config.teacher_signal, "teacher_key": seed_pass.get("key"),
                 "teacher_pass": {k: v for k, v in seed_pass.items() if k != "dev"}, "ce_target": config.ce_target}
        teacher_peak = seed_pass.get("peak_memory_mb")
        record["seeds"][str(seed)] = train_and_evaluate(
            "distill", config, config, setup, config.student, p.queries, make_distill_loss(config, signal_for), seed,
            out / f"seed-{seed}", dev_examples=p.dev, labelled_examples=labelled_examples(config, p.contexts),
            before_training=lambda student_dev, s=seed: icl_gain(per_seed.get(s, {}).get("dev", {}), student_dev, s),
            other_peaks_mb={"teacher_pass": teacher_peak} if teacher_peak is not None else None,
            revision=config.revision, extra_record=extra, on_evaluate=on_evaluate, score_eval_sets=score_eval_sets,
            progress=progress,
        )
    return finish_record(record, out)
