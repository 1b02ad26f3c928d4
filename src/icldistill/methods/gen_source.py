"""A generation student used again: whether a run or an export answers free-form, and the task it answers.

``icld export``, ``predict`` and ``eval`` accept a ``gen-distill`` run (``RUN/seed-N`` or a one-seed run) or
its export. Both carry the generation task as it ran (template, instruction, shots, stop sequences,
``max_new_tokens``, chat-template use, extractor: the options' overrides applied): the run in its record
(``generation`` and ``config.task``), the export in ``icldistill.json`` (``task_definition``, without data),
so an export copied to another machine prompts and extracts answers as the run did.
"""

from __future__ import annotations

import dataclasses
import logging
import string
from typing import Any

from icldistill.errors import ConfigError, IcldError
from icldistill.methods.trained import EXPORT_META, ModelSource
from icldistill.tasks.generation import GenerationTask, get_generation_task

logger = logging.getLogger(__name__)

KIND = "generation"
# The task's prompting and scoring fields an export carries (its data, train and eval, stay behind).
PORTABLE_FIELDS = ("name", "inputs", "template", "answer_column", "answer_template", "instruction", "shots", "stop",
                   "max_new_tokens", "chat_template", "extractor", "answer_pattern", "id_column", "description")
# What a run's record says of the task as it ran (methods.gen_setup.claim_generation_run writes it).
_RECORDED = ("template", "instruction", "shots", "stop", "max_new_tokens", "chat_template", "extractor")


def is_generation(source: ModelSource) -> bool:
    """Whether ``source`` (a run or an export) was trained on a generation task."""
    return (source.run_record or {}).get("kind") == KIND or (source.meta or {}).get("kind") == KIND


def portable_generation_task(task: GenerationTask) -> dict[str, Any]:
    """``task_definition`` of a generation export: every prompting and scoring field, no data paths."""
    out = {name: getattr(task, name) for name in PORTABLE_FIELDS}
    out["inputs"], out["stop"] = list(task.inputs), list(task.stop)
    return {"type": KIND, **out}


def task_from_definition(definition: dict[str, Any], origin: str) -> GenerationTask:
    """The task an export carries, without data: it answers rows; evaluation sets need the task file."""
    unknown = [k for k in definition if k not in (*PORTABLE_FIELDS, "type")]
    if definition.get("type") != KIND or unknown or not definition.get("template"):
        raise ConfigError(f"{origin}: task_definition is not a generation task's (type {definition.get('type')!r}"
                          + (f", unknown key {unknown[0]!r}" if unknown else "") + "); export the run again.")
    values = {k: definition[k] for k in PORTABLE_FIELDS if k in definition}
    values["inputs"], values["stop"] = tuple(values.get("inputs") or ()), tuple(values.get("stop") or ())
    return GenerationTask(**values)


def _as_ran(task: GenerationTask, recorded: dict[str, Any]) -> GenerationTask:
    """``task`` with what the run recorded of it (the options' overrides: shots, max_new_tokens, ...)."""
    changes = {k: recorded[k] for k in _RECORDED if k in recorded and recorded[k] is not None}
    if "stop" in changes:
        changes["stop"] = tuple(changes["stop"])
    return dataclasses.replace(task, **changes)


def _from_record(run: dict[str, Any]) -> GenerationTask:
    """The task of a run whose task file is gone: what its record holds (inputs read off the template)."""
    recorded = run.get("generation") or {}
    template = recorded.get("template") or ""
    inputs = tuple(dict.fromkeys(n for _, n, _, _ in string.Formatter().parse(template) if n))
    return _as_ran(GenerationTask(str(run.get("task") or "task"), inputs, template), recorded)


def task_of(source: ModelSource, override: str | None = None) -> GenerationTask:
    """The generation task ``source`` answers: ``override`` (``--task``: data and prompting from that file), else
    the one it was trained on, found again where its file exists here (its data then serves evaluation sets),
    else what the run's record or the export's ``task_definition`` holds."""
    if override:
        return get_generation_task(override)
    if source.kind == "export":
        meta = source.meta or {}
        definition = meta.get("task_definition") or {}
        carried = task_from_definition(definition, f"{source.name}/{EXPORT_META}")
        try:
            found = get_generation_task(meta.get("task_ref") or carried.name)
        except IcldError as exc:
            logger.info("%s: task %s is not found here (%s); using the definition the export carries",
                        source.name, meta.get("task_ref"), exc)
            return carried
        return dataclasses.replace(carried, train=found.train, eval=found.eval)
    run = source.run_record or {}
    ref = (run.get("config") or {}).get("task") or run.get("task")
    try:
        return _as_ran(get_generation_task(str(ref)), run.get("generation") or {})
    except IcldError as exc:
        logger.warning("task %s is not found (%s); using what the run's record holds", ref, exc)
        return _from_record(run)


def require_eval_data(task: GenerationTask, model: str) -> None:
    """Refuse, in one line, to evaluate with a task whose data is not here (an export's carried definition)."""
    if not task.eval:
        raise ConfigError(f"{model} carries its generation task '{task.name}' but not its data, and the task file "
                          "is not found here; icld eval reads evaluation sets: pass --task NAME_OR_FILE (a generation "
                          "task file with the same inputs).")
