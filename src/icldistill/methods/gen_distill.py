"""Context distillation for generation: a student without the context learns to answer as the teacher with it.

One loop (``training.loop.fit``), four sources of targets (``--signal``):

- ``sequence``: the teacher, with the context, answers the training queries greedily; the student is
  fine-tuned (CE) on those answers without it. Across tokenizers the teacher's text is re-tokenized.
- ``token``: also the teacher's top-k log-probabilities at every token of its answers; loss
  ``alpha * top-k KL + (1 - alpha) * CE``. One tokenizer.
- ``on-policy`` (GKD / OPCD): the student samples answers without the context, the teacher with it scores
  those tokens; generalised JSD (``--beta``; 1 is OPCD's reverse KL). One tokenizer.
- ``reference``: SFT on the reference answers, no teacher (the labelled baseline).

The teacher's off-policy pass is cached on disk (``methods.gen_teacher``; ``sequence`` and ``token``
share its answers) and runs before any training, the teacher released after it; the on-policy teacher
stays loaded. The dev split (``--dev-queries`` rows of the train split, disjoint from the demonstrations,
the training queries and the evaluation queries) is scored during training by the exact match of the
student's greedy answers (``dev_accuracy``) and the CE of its reference answers (``dev_loss``). The
evaluation sets are scored once, after training, without the context.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

from icldistill.config import GenDistillOptions
from icldistill.errors import ConfigError
from icldistill.methods.common import finish_record, model_record
from icldistill.methods.gen_seed import SeedPlan, SeedRun
from icldistill.methods.gen_setup import GenSetup, claim_generation_run, encode_prompts, prepare_generation
from icldistill.methods.gen_teacher import (
    AnswerCache,
    TeacherAnswers,
    cache_key,
    teacher_answers,
    teacher_topk,
    topk_key,
)
from icldistill.models.loading import LoadedModel, load_tokenizer, logit_width
from icldistill.runtime.records import measure
from icldistill.runtime.rundir import identity_of
from icldistill.tasks.generation import GenerationRow, GenerationTask
from icldistill.training.loop import OnEvaluate
from icldistill.training.losses import check_vocab_compatible
from icldistill.training.signals import TeacherSpec

logger = logging.getLogger(__name__)

METHOD = "gen-distill"


def plan_seed(config: GenDistillOptions, setup: GenSetup, seed: int) -> SeedPlan:
    """Demonstrations as ``generate`` draws them; then dev rows (with references) and training queries."""
    task = setup.task
    demos = setup.demonstrations(seed)
    taken = set(setup.query_texts) | {task.query_text(d) for d in demos}
    labelled = [r for r in setup.train if r.reference is not None and task.query_text(r) not in taken]
    if len(labelled) < config.dev_queries:
        raise ConfigError(f"--dev-queries {config.dev_queries} exceeds the {len(labelled)} labelled training rows "
                          "left after the demonstrations.")
    dev = random.Random(f"icldistill-gen-dev-{seed}").sample(labelled, config.dev_queries)
    taken |= {task.query_text(r) for r in dev}
    pool = [r for r in setup.train if task.query_text(r) not in taken
            and (config.signal != "reference" or r.reference is not None)]
    if len(pool) < config.train_queries:
        raise ConfigError(f"--train-queries {config.train_queries} exceeds the {len(pool)} training rows left after "
                          "the demonstrations and the dev split.")
    queries = random.Random(f"icldistill-gen-train-queries-{seed}").sample(pool, config.train_queries)
    return SeedPlan(demos, dev, queries)


def teacher_spec(config: GenDistillOptions) -> TeacherSpec:
    return TeacherSpec(config.teacher, config.teacher_revision, config.dtype, config.trust_remote_code,
                       config.device, config.cache_dir)


def check_one_tokenizer(config: GenDistillOptions, spec: TeacherSpec) -> bool:
    """Whether teacher and student share a tokenizer (read without weights); token and on-policy require it."""
    student = load_tokenizer(config.student, cache_dir=config.cache_dir, revision=config.revision,
                             trust_remote_code=config.trust_remote_code)
    same = spec.tokenizer().get_vocab() == student.get_vocab()
    if config.signal in ("token", "on-policy"):
        width = logit_width(config.student, cache_dir=config.cache_dir, revision=config.revision,
                            trust_remote_code=config.trust_remote_code)
        try:
            check_vocab_compatible(spec.logit_width(), width, config.teacher, config.student, same)
        except ConfigError as exc:
            raise ConfigError(f"--signal {config.signal}: {exc} Use --signal sequence (the teacher's text, "
                              "re-tokenized) for models with different tokenizers.") from None
    return same


def _encode(tokenizer: Any, task: GenerationTask, rows: Sequence[GenerationRow],
            demos: Sequence[GenerationRow], *, with_instruction: bool) -> list[list[int]]:
    """Prompts for a tokenizer alone (no weights loaded): the cache key of a teacher pass is computed so."""
    return encode_prompts(cast(LoadedModel, SimpleNamespace(tokenizer=tokenizer)), task, rows, demos,
                          with_instruction=with_instruction)


def teacher_pass(config: GenDistillOptions, setup: GenSetup, spec: TeacherSpec, plans: dict[int, SeedPlan],
                 progress: bool) -> tuple[dict[int, TeacherAnswers], dict[int, dict[str, Any]], dict[str, Any]]:
    """The teacher's answers (and top-k for ``token``) for every seed's training queries, from the cache or
    computed once and stored there; the teacher is loaded only on a miss and released after the pass."""
    cache, tokenizer, identity = AnswerCache(config.cache_dir), spec.tokenizer(), spec.identity()
    settings = setup.decode_settings(config.batch_size)
    topk = config.teacher_topk if config.signal == "token" else 0
    if topk:
        spec.check_topk(topk)
    loaded: list[LoadedModel] = []  # the teacher, once loaded

    def teacher() -> LoadedModel:
        if not loaded:
            loaded.append(spec.load())
        return loaded[0]

    answers, per_seed, hits = {}, {}, 0
    with measure(config.device) as whole:
        for seed, plan in plans.items():
            prompts = _encode(tokenizer, setup.task, plan.queries, plan.demonstrations, with_instruction=True)
            key, description = cache_key(identity, prompts, settings)
            with measure(config.device) as part:
                with cache.lock(key):  # another worker computing this pass: wait, then read it
                    found = cache.load(key)
                    hit = found is not None
                    if found is None:
                        found = teacher_answers(teacher(), prompts, settings, journal=cache.journal(key))
                        cache.save(key, found, description)
                if topk:
                    top_key = topk_key(key, topk)
                    with cache.lock(top_key):
                        top = cache.load_topk(top_key)
                        hit = hit and top is not None
                        if top is None:
                            top = teacher_topk(teacher(), prompts, found.answers, config.batch_size, topk)
                            cache.save_topk(top_key, *top, {**description, "answers_key": key, "topk": topk})
                    found.topk_logprobs, found.topk_ids = top
            hits += hit
            answers[seed] = found
            per_seed[seed] = {**part.as_dict(), "cache_hit": hit, "key": top_key if topk else key,
                              "answers_key": key, "answers": found.summary()}
    record = {**whole.as_dict(), "mode": "cached", "teacher": identity, "teacher_loaded": bool(loaded),
              "cache_dir": str(cache.directory), "cache_hits": hits, "topk": topk}
    loaded.clear()
    return answers, per_seed, record


def run_gen_distill(config: GenDistillOptions, *, progress: bool = True, on_evaluate: OnEvaluate | None = None,
                    score_eval_sets: bool = True) -> dict[str, Any]:
    """Distil the teacher with the task's context into the student without it, for each seed.

    ``on_evaluate`` and ``score_eval_sets`` are for tuning trials (as ``finetune.train_and_evaluate``)."""
    setup = prepare_generation(config)
    spec = teacher_spec(config)
    same = check_one_tokenizer(config, spec) if config.signal != "reference" else False
    record, run_dir = claim_generation_run(METHOD, config, setup)
    record.update(seeds={}, signal=config.signal)
    identity = identity_of(METHOD, config)
    plans: dict[int, SeedPlan] = {}
    for seed in config.seeds:
        finished = run_dir.finished_seed(seed, identity) if config.resume else None
        if finished is not None:
            logger.info("seed %d already complete in %s", seed, run_dir.seed_dir(seed))
            record["seeds"][str(seed)] = finished
        else:
            plans[seed] = plan_seed(config, setup, seed)
    answers: dict[int, TeacherAnswers] = {}
    per_seed: dict[int, dict[str, Any]] = {}
    online: LoadedModel | None = None
    if plans and config.signal in ("sequence", "token"):
        answers, per_seed, record["teacher_pass"] = teacher_pass(config, setup, spec, plans, progress)
    elif plans and config.signal == "on-policy":
        with measure(config.device) as loading:
            online = spec.load()
        record["teacher_pass"] = {**loading.as_dict(), "mode": "online", "teacher": model_record(online),
                                  "note": "the teacher stays loaded during training: its memory is in the "
                                          "training peak"}
    for seed, plan in plans.items():
        run = SeedRun(config, setup, seed, plan, run_dir, identity, same_tokenizer=same)
        record["seeds"][str(seed)] = run.train(answers.get(seed), per_seed.get(seed, {}), online, on_evaluate,
                                               score_eval_sets, progress)
    return finish_record(record, run_dir.path)
