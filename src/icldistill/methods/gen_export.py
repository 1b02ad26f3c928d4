"""What ``icld export`` writes for a generation student: ``icldistill.json`` with its task, and its model card.

The export carries the generation task as it ran (``task_definition``: template, instruction, stop
sequences, ``max_new_tokens``, chat-template use, extractor), so ``icld predict`` answers and extracts as
the run did without the task file, and a context summary: what the teacher saw (its k demonstrations or the
instruction's digest and first lines), the teacher, the signal, the steps and the labels used. The
classification export (``methods.export``) calls these for a generation run; the weights are merged alike.
"""

from __future__ import annotations

import hashlib
from typing import Any

from icldistill.methods.gen_source import KIND, portable_generation_task, task_of
from icldistill.methods.trained import EXPORT_META, ModelSource

INSTRUCTION_LINES = 3  # the instruction's first lines shown in the card (its digest identifies the whole)
_LINE_CHARS = 160


def instruction_summary(instruction: str) -> dict[str, Any] | None:
    """The instruction as a card shows it: a sha256 digest (12 hex digits), its length and first lines."""
    if not instruction:
        return None
    lines = [line[:_LINE_CHARS] for line in instruction.splitlines() if line.strip()]
    return {"sha256": hashlib.sha256(instruction.encode("utf-8")).hexdigest()[:12], "chars": len(instruction),
            "lines": len(lines), "first_lines": lines[:INSTRUCTION_LINES]}


def context_summary(run: dict[str, Any], seed: dict[str, Any], instruction: str) -> dict[str, Any]:
    """What the teacher saw and how the student learnt it, for the card and ``icldistill.json``."""
    config = run.get("config") or {}
    signal = seed.get("signal") or run.get("signal") or config.get("signal")
    resources = seed.get("resources") or {}
    teacher = None if signal == "reference" else config.get("teacher")
    demonstrations = [] if signal == "reference" else list(seed.get("demonstrations") or [])
    return {"teacher": teacher, "signal": signal, "shots": len(demonstrations), "demonstrations": demonstrations,
            "instruction": None if signal == "reference" else instruction_summary(instruction),
            "train_queries": len(seed.get("train_queries") or []), "steps": resources.get("steps"),
            "epochs": config.get("epochs"), "labelled_examples": seed.get("labelled_examples")}


def generation_meta(source: ModelSource, notes: list[str], export_format: int) -> dict[str, Any]:
    """``icldistill.json`` of a generation export: everything ``icld predict`` needs, and what the model is."""
    run, seed = source.run_record or {}, source.seed_record or {}
    task = task_of(source)
    config = run.get("config") or {}
    context = context_summary(run, seed, task.instruction)
    return {"format": export_format, "kind": KIND, "task": task.name, "task_ref": config.get("task") or run.get("task"),
            "task_definition": portable_generation_task(task), "classes": None, "pattern": None,
            "label_words": None, "method": run.get("method"), "signal": context["signal"], "seed": source.seed,
            "base_model": (seed.get("student") or {}).get("name"),
            "base_fingerprint": (seed.get("student") or {}).get("fingerprint"), "teacher": context["teacher"],
            "context": context, "seeds_in_run": len(run.get("seeds") or {}) or None, "run": str(source.seed_dir),
            "notes": notes}


def _plural(n: Any, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _metric_lines(run: dict[str, Any], seed: dict[str, Any]) -> list[str]:
    lines = ["| evaluation set | n | exact match [95% bootstrap] | token F1 | run mean EM over seeds |",
             "|---|---|---|---|---|"]
    for name, m in (seed.get("eval") or {}).items():
        low_high = m.get("exact_match_ci95") or []
        interval = f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if len(low_high) == 2 else ""
        agg = ((run.get("aggregate") or {}).get(name) or {}).get("exact_match") or {}
        lines.append(f"| {name} | {m.get('n')} | {_fmt(m.get('exact_match'))}{interval} | {_fmt(m.get('token_f1'))} "
                     f"| {_fmt(agg.get('mean'))} ({_plural(agg.get('n_seeds', 1), 'seed')}) |")
    return lines


def _context_lines(context: dict[str, Any]) -> list[str]:
    if context["signal"] == "reference":
        return ["- Teacher: none (signal `reference`: supervised fine-tuning on the reference answers)"]
    lines = [f"- Teacher: `{context['teacher']}` with the task's context; signal `{context['signal']}`"]
    if context["shots"]:
        ids = ", ".join(context["demonstrations"])
        lines.append(f"- Context: {_plural(context['shots'], 'demonstration')} (train ids {ids})")
    summary = context["instruction"]
    if summary:
        lines.append(f"- Instruction: {summary['chars']} characters, {summary['lines']} lines, sha256 "
                     f"{summary['sha256']}; it begins:")
        lines += [f"  > {line}" for line in summary["first_lines"]]
    return lines


def generation_card(source: ModelSource, meta: dict[str, Any], upstream: str | None, licence: str) -> str:
    """The generation export's ``README.md``: what it answers, what the teacher saw, how well it did, how to use it."""
    run, seed = source.run_record or {}, source.seed_record or {}
    config, context, task = run.get("config") or {}, meta["context"], meta["task_definition"]
    trained = seed.get("trainable") or {}
    front = ["---", f"license: {'apache-2.0' if licence == 'Apache-2.0' else 'other'}", f"base_model: {upstream}",
             "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [icldistill, context-distillation, generation]", "---"]
    return "\n".join(front + [
        f"# {meta['task']} student (generation distillation, signal {context['signal']}) from {upstream}", "",
        f"Made with icldistill (`gen-distill`) and exported from `{source.seed_dir}` (seed {source.seed}). The "
        "student answers the query alone; the context below was distilled into its weights.", "",
        "## What the teacher saw", "", *_context_lines(context),
        f"- Training: training queries {context['train_queries']}, {_plural(context['steps'], 'step')} "
        f"({_plural(config.get('epochs'), 'epoch')}, lr {config.get('lr')}), labelled examples used: "
        f"{context['labelled_examples']}",
        f"- What trained: {trained.get('method')} ({trained.get('trainable_parameters')} of "
        f"{trained.get('total_parameters')} parameters); " + "; ".join(meta["notes"] or ["no merge needed"]),
        f"- Base model: `{upstream}` (licence: {licence}; it applies to these weights)", "",
        "## Task", "",
        f"- Template: `{task['template']!r}`; chat template: {task['chat_template']}; stop sequences "
        f"{task['stop']}; at most {task['max_new_tokens']} new tokens; answer extractor `{task['extractor']}`", "",
        "## Evaluation", "",
        "Exact match of the extracted answer and token F1 of this seed (bootstrap intervals over the queries), and "
        "the run's mean over its seeds.", "", *_metric_lines(run, seed), "",
        "## Use", "",
        "`icld predict --model DIR --input rows.jsonl --output answers.jsonl` writes each row's generated text and "
        f"extracted answer (task, template and extractor come from `{EXPORT_META}`); "
        "`icld eval --model DIR --eval SET` scores it again.", ""])
