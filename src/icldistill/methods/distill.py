"""Context distillation (CD): train a student without demonstrations to answer like a teacher with them.

Student loss ``alpha * KL(teacher || student) + (1 - alpha) * CE(target)`` (arXiv 2412.13243), the CE
target being the gold label (the paper's) or the teacher's predicted class (``--ce-target teacher``). The k
examples of a seed are the teacher's demonstrations; a disjoint sample of training queries is what the
student trains on. The teacher's signal is cached by default: computed once before training (and
reused by any later run with the same teacher, pattern, demonstrations and queries), so training runs
without the teacher in memory and costs what plain student fine-tuning costs.

Where the signal comes from (cache or online teacher) and the teacher's identity live in
``training.signals``; this module keeps what is the method's own: the plan of each seed (contexts, dev
rows, training queries), the loss over a batch, and the teacher's dev check (the ICL gain).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from icldistill.config import DistillOptions
from icldistill.errors import ConfigError
from icldistill.methods.common import Setup, dev_split, finish_record, model_record, prepare, start_record
from icldistill.methods.finetune import (
    SeedJob,
    StudentBatch,
    student_label_scores,
    summarise_predictions,
    train_and_evaluate,
)
from icldistill.models.loading import LoadedModel, load_tokenizer, logit_width
from icldistill.runtime.records import measure
from icldistill.tasks.data import Example
from icldistill.training.loop import OnEvaluate
from icldistill.training.losses import (
    LossOutput,
    ce_loss,
    check_vocab_compatible,
    class_log_probs,
    distillation_loss,
    mix_terms,
    topk_vocab_kl,
)
from icldistill.training.signals import (
    CachedSource,
    CachedTeacherPass,
    OnlineSource,
    SignalSource,
    TeacherPrompts,
    TeacherSpec,
    signal_cache,
    tempered_targets,
)
from icldistill.training.teacher import TeacherSignal, compute_signal

logger = logging.getLogger(__name__)


def training_queries(setup: Setup, seed: int, n: int, contexts: Sequence[Sequence[Example]],
                     exclude: Sequence[Example] = ()) -> list[Example]:
    """n training queries from the train split, disjoint from every demonstration, dev row and evaluation query."""
    taken = ({ex.text_key() for demos in contexts for ex in demos} | setup.query_texts
             | {ex.text_key() for ex in exclude})
    pool = [ex for ex in setup.train.examples if ex.text_key() not in taken]
    if len(pool) < n:
        raise ConfigError(f"--train-queries {n} exceeds the {len(pool)} training rows left after the demonstrations"
                          " and the dev split.")
    return random.Random(f"icldistill-train-queries-{seed}").sample(pool, n)


def _check_vocab(config: DistillOptions, teacher: TeacherSpec) -> None:
    """Full-vocabulary KL needs one tokenizer and one logit width for both models (read without the weights);
    a cached top-k no wider than the teacher's vocabulary."""
    s = load_tokenizer(config.student, cache_dir=config.cache_dir, revision=config.revision,
                       trust_remote_code=config.trust_remote_code)
    width = logit_width(config.student, cache_dir=config.cache_dir, revision=config.revision,
                        trust_remote_code=config.trust_remote_code)
    check_vocab_compatible(teacher.logit_width(), width, config.teacher, config.student,
                           teacher.tokenizer().get_vocab() == s.get_vocab())
    if config.teacher_signal == "cached":
        teacher.check_topk(config.teacher_topk)


def labelled_examples(config: DistillOptions, contexts: Sequence[Sequence[Example]]) -> int:
    """CD's label budget: the distinct demonstrations, plus the training queries when CE uses their gold labels."""
    demos = len({d.id for c in contexts for d in c})
    uses_gold = config.ce_target == "gold" and config.alpha < 1
    return demos + (config.train_queries if uses_gold else 0)


def make_distill_loss(config: DistillOptions, source: SignalSource, label_score: str = "sum"):
    """The CD loss over a batch; ``source(batch.indices)`` gives the teacher's answers for the batch's rows.

    With ``--ce-target teacher`` the CE term's target is the teacher's predicted class (the argmax of its
    context-averaged label distribution), so no gold label beyond the demonstrations is used.
    """
    T, alpha = config.temperature, config.alpha
    needs_teacher = alpha > 0 or config.ce_target == "teacher"

    def loss_fn(model: torch.nn.Module, batch: StudentBatch) -> LossOutput:
        # Class scores from whole label words (any length), as the teacher's: issue 10.
        logits, class_scores = student_label_scores(model, batch, label_score)
        student_lp = class_log_probs(class_scores)
        signal = source(batch.indices) if needs_teacher else None
        teacher = signal if alpha > 0 else None
        labels = batch.labels if config.ce_target == "gold" else signal.label_logprobs.argmax(-1).to(logits.device)
        if config.kl_space == "label":
            student_T = class_log_probs(class_scores, T)
            teacher_T = tempered_targets(teacher, T).to(logits.device) if teacher else None
            return distillation_loss(student_T, teacher_T, student_lp, labels, alpha=alpha,
                                     temperature=T, reduction="sum")
        kl = topk_vocab_kl(teacher.topk_logprobs.to(logits.device), teacher.topk_ids.to(logits.device), logits, T,
                           reduction="sum") if teacher else None
        ce = ce_loss(student_lp, labels, reduction="sum") if alpha < 1 else None
        return mix_terms(kl, ce, alpha)

    return loss_fn


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


def _prompts(setup: Setup) -> TeacherPrompts:
    return TeacherPrompts(setup.pattern, setup.label_score, setup.train.fingerprint)


def cached_signals(config: DistillOptions, setup: Setup, plan: dict[int, SeedPlan], topk: int,
                   progress: bool) -> tuple[dict[int, TeacherSignal], dict[int, dict[str, Any]], dict[str, Any]]:
    """The cached teacher pass over every seed (see ``signals.CachedTeacherPass``), and the teacher's dev check.

    The teacher on each seed's dev rows, with its demonstrations and zero-shot (the ICL-gain check), is
    cached the same way. The teacher is released before training starts. Returns the signals, each seed's
    teacher pass (peak, time, cache hit, dev metrics) and the whole pass's record.
    """
    cache = signal_cache(config.cache_dir)
    teacher = CachedTeacherPass(TeacherSpec.from_options(config), _prompts(setup), cache,
                                batch_size=config.batch_size, use_prefix_cache=config.prefix_cache, progress=progress)
    signals, per_seed, keys, hits = {}, {}, {}, 0
    with measure(config.device) as teacher_pass:
        for seed, p in plan.items():
            with measure(config.device) as seed_pass:
                signals[seed], keys[str(seed)], hit = teacher.signal(p.contexts, p.queries, topk)
                hits += hit
                dev = {}
                if p.dev:
                    dev = {"teacher_icl": signal_metrics(teacher.signal(p.contexts, p.dev, 0)[0], p.dev),
                           "teacher_zero_shot": signal_metrics(teacher.signal([[]], p.dev, 0)[0], p.dev)}
            per_seed[seed] = {**seed_pass.as_dict(), "cache_hit": bool(hit), "key": keys[str(seed)], "dev": dev}
    record = {**teacher_pass.as_dict(), "keys": keys, "cache_hits": hits, "cache_dir": str(cache.directory),
              "teacher": teacher.identity, "teacher_loaded": teacher.loaded}
    teacher.release()
    return signals, per_seed, record


def online_teacher(config: DistillOptions, setup: Setup, plan: dict[int, SeedPlan]
                   ) -> tuple[LoadedModel, dict[int, dict[str, Any]], dict[str, Any]]:
    """The online teacher, loaded for the whole run, and its dev check on each seed's dev rows."""
    per_seed: dict[int, dict[str, Any]] = {}
    with measure(config.device) as loading:
        teacher = TeacherSpec.from_options(config).load()
        for seed, p in plan.items():
            dev = {}
            if p.dev:
                dev = {name: signal_metrics(compute_signal(teacher, setup.pattern, contexts, p.dev,
                                                           batch_size=config.batch_size, progress=False,
                                                           label_score=setup.label_score), p.dev)
                       for name, contexts in (("teacher_icl", p.contexts), ("teacher_zero_shot", [[]]))}
            per_seed[seed] = {"cache_hit": False, "dev": dev}
    record = {"mode": "online", "teacher": model_record(teacher), **loading.as_dict(),
              "note": "the teacher stays loaded during training: its memory is in the training peak"}
    return teacher, per_seed, record


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


def _seed_job(config: DistillOptions, setup: Setup, seed: int, p: SeedPlan, source: SignalSource, out: Any,
              seed_pass: dict[str, Any]) -> SeedJob:
    """The seed's training: the student on the training queries, with the teacher's signal from ``source``."""
    extra = {"demonstration_contexts": [[d.id for d in c] for c in p.contexts],
             "teacher_signal": config.teacher_signal, "teacher_key": seed_pass.get("key"),
             "teacher_pass": {k: v for k, v in seed_pass.items() if k != "dev"}, "ce_target": config.ce_target}
    teacher_peak = seed_pass.get("peak_memory_mb")
    return SeedJob(
        "distill", seed, out / f"seed-{seed}", config.student, p.queries,
        make_distill_loss(config, source, setup.label_score), dev_examples=p.dev,
        labelled_examples=labelled_examples(config, p.contexts),
        before_training=lambda student_dev: icl_gain(seed_pass.get("dev", {}), student_dev, seed),
        other_peaks_mb={"teacher_pass": teacher_peak} if teacher_peak is not None else None, extra_record=extra)


def run_distill(config: DistillOptions, *, progress: bool = True, on_evaluate: OnEvaluate | None = None,
                score_eval_sets: bool = True) -> dict[str, Any]:
    """Distil ``config.teacher`` (with k demonstrations) into ``config.student`` for each seed.

    ``on_evaluate`` and ``score_eval_sets`` are for tuning trials (see ``finetune.train_and_evaluate``)."""
    setup = prepare(config)
    spec = TeacherSpec.from_options(config)
    setup.check_tokenizer(spec.tokenizer(), config.teacher)  # before the teacher pass
    record, out = start_record("distill", config, setup)
    plan = {seed: plan_seed(config, setup, seed) for seed in config.seeds}
    if config.kl_space == "vocab":
        _check_vocab(config, spec)
    teacher: LoadedModel | None = None
    if config.teacher_signal == "cached":
        # The top-k is stored whatever the KL space (a few hundred bytes a query), so that label- and vocab-KL
        # runs of one teacher, demonstrations and queries share one cached teacher pass.
        signals, per_seed, record["teacher_pass"] = cached_signals(config, setup, plan, config.teacher_topk, progress)
    else:
        teacher, per_seed, record["teacher_pass"] = online_teacher(config, setup, plan)
    record["teacher_pass"].update(mode=config.teacher_signal, contexts=config.teacher_contexts)

    for seed, p in plan.items():
        if teacher is None:
            source: SignalSource = CachedSource(signals[seed], p.queries)
        else:
            source = OnlineSource.start(teacher, _prompts(setup), p.contexts, p.queries, config.kl_space == "vocab")
        job = _seed_job(config, setup, seed, p, source, out, per_seed.get(seed, {}))
        record["seeds"][str(seed)] = train_and_evaluate(config, setup, job, on_evaluate=on_evaluate,
                                                        score_eval_sets=score_eval_sets, progress=progress)
    return finish_record(record, out)
