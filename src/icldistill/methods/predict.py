"""``icld predict``: answer a file of unlabelled rows with any model, a trained student alone or an ICL teacher.

Each row is rendered with the task's pattern and scored through the one scoring path
(:func:`icldistill.scoring.evalsets.score_prompts`, the shared-prefix cache when there are
demonstrations). The output has one row per input: the predicted class, its label word and every
class's probability (softmax over the label words). A row too long for the model is reported in the
output and the summary, never cut. Latency per query and peak memory are measured (issue 11).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icldistill.config import PredictOptions
from icldistill.errors import ConfigError, IcldError
from icldistill.methods.trained import EXPORT_META, ModelSource, load_source, resolve_source
from icldistill.runtime import distributed
from icldistill.runtime.records import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, measure
from icldistill.runtime.rundir import probe_writable
from icldistill.tasks import data as data_mod
from icldistill.tasks.data import Example
from icldistill.tasks.inputs import read_inputs
from icldistill.tasks.prompts import Pattern, context_rng, resolve_pattern, sample_demonstrations
from icldistill.tasks.registry import DataSpec, Family, PatternSpec, Task, family_of, get_task

logger = logging.getLogger(__name__)

DEFAULT_TASK = "mnli"


def portable_task(task: Task, pattern: Pattern) -> dict[str, Any]:
    """What ``predict`` needs of a task, carried by an export (``icldistill.json``) instead of the task file's path.

    An export copied to another machine answers with the pattern it was trained with, reads its input
    columns and id column, and names its classes, without the task file.
    """
    family = family_of(task)
    return {"name": task.name, "fields": list(family.fields), "classes": list(family.classes),
            "id_column": task.train.id_column, "strip": task.train.strip, "label_column": task.train.label_column,
            "content_free": dict(family.content_free),
            "pattern": {"name": pattern.name, "template": pattern.template, "label_words": list(pattern.label_words)}}


def task_from_portable(definition: dict[str, Any], origin: str) -> Task:
    """The task an export carries, without data: it answers rows; demonstrations need the task file (``--task``)."""
    name, fields = definition["name"], tuple(definition["fields"])
    classes = tuple(definition["classes"])
    recorded = definition["pattern"]
    family = Family(name, fields, classes, {recorded["name"]: PatternSpec(recorded["template"],
                                                                          tuple(recorded["label_words"]))},
                    definition.get("content_free") or {f: "N/A" for f in fields})
    spec = DataSpec(name=name, family=name, local=None, hub=None, label_map={c: i for i, c in enumerate(classes)},
                    fields=fields, label_column=definition.get("label_column") or "label",
                    id_column=definition.get("id_column"), id_required=False, strip=bool(definition.get("strip")),
                    origin=origin)
    return Task(name, name, spec, default_eval=(), default_pattern=recorded["name"], columns=family, ref=origin)


def _recorded_task(source: ModelSource) -> Task:
    """The task the model was trained for: found again by its recorded name or file where it exists here (its
    data then serves demonstrations and evaluation sets), else the definition an export carries."""
    meta = source.meta or {}
    ref = meta.get("task_ref") or meta.get("task") or DEFAULT_TASK
    try:
        return get_task(ref)
    except IcldError as exc:
        if meta.get("task_definition"):
            logger.info("%s: task %s is not found here (%s); using the definition the export carries",
                        source.name, ref, exc)
            return task_from_portable(meta["task_definition"], f"{source.name}/{EXPORT_META}")
        if not meta.get("task"):
            raise
        raise ConfigError(f"{source.name} was trained for task {ref}, which is not found here ({exc}). Pass "
                          "--task NAME_OR_FILE with the same inputs and classes (the model keeps its own pattern), "
                          "or re-export the run with this version, whose exports carry their task.") from None


def require_data(task: Task, model: str, why: str) -> None:
    """Refuse, in one line, to use the data of a task that an export carries without it (its file is not here)."""
    if task.train.local is None and task.train.hub is None and not task.eval_sets:
        raise ConfigError(f"{model} carries its task '{task.name}' but not its data, and the task file is not found "
                          f"here; {why}. Pass --task NAME_OR_FILE with the same inputs and classes (the model keeps "
                          "its own pattern).")


def _own_pattern(source: ModelSource, task: Task, recorded: dict[str, Any]) -> Pattern:
    """The pattern the model was trained with, checked against ``task``'s inputs and classes."""
    family = family_of(task)
    classes = (source.meta or {}).get("classes") or list(family.classes)
    words = recorded.get("label_words") or []
    fields = _fields_of(recorded.get("template") or "")
    if tuple(classes) != tuple(family.classes) or len(words) != len(family.classes) or fields != set(family.fields):
        raise ConfigError(
            f"{source.name} was trained with the pattern {recorded.get('template')!r} over inputs "
            f"{sorted(fields)} and classes {list(classes)}; task '{task.name}' has inputs {list(family.fields)} and "
            f"classes {list(family.classes)}. Use a task with the model's inputs and classes, or pass --pattern and "
            "--label-words to prompt it in a way it was not trained on.")
    resolved = resolve_pattern(family, recorded["template"], words)
    return dataclasses.replace(resolved, name=recorded.get("name") or resolved.name)


def _fields_of(template: str) -> set[str]:
    import string

    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError:
        return set()


def resolve_prompting(source: ModelSource, task: str | None, pattern: str | None,
                      label_words: Sequence[str] | None) -> tuple[Task, Family, Pattern]:
    """The task, family and pattern to use.

    A trained run or an export always answers with the pattern and label words it was trained with:
    ``--task`` then gives the columns and the data only (said in the log), and a task whose inputs or
    classes do not fit that pattern is refused. Only an explicit ``--pattern`` / ``--label-words``
    prompts it otherwise (with a warning). A plain model takes the options, else the task's default.
    """
    resolved_task = get_task(task) if task else _recorded_task(source)
    family = family_of(resolved_task)
    recorded = (source.meta or {}).get("pattern") or {}
    if not recorded.get("template"):  # a plain model: nothing was trained on a pattern
        return resolved_task, family, resolve_pattern(family, pattern or resolved_task.default_pattern, label_words)
    if pattern is None and label_words is None:
        own = _own_pattern(source, resolved_task, recorded)
        if task:
            logger.warning("%s answers with the pattern it was trained with ('%s', label words %s); --task %s gives "
                           "the columns and data only (pass --pattern to prompt it otherwise)", source.name, own.name,
                           list(own.label_words), task)
        return resolved_task, family, own
    resolved = resolve_pattern(family, pattern if pattern is not None else recorded["template"], label_words)
    own = (recorded["template"], list(recorded.get("label_words") or []))
    if (resolved.template, list(resolved.label_words)) != own:
        logger.warning("%s was trained with the pattern %r and label words %s; prompting it with %r and %s as asked",
                       source.name, recorded["template"], recorded.get("label_words"), resolved.template,
                       list(resolved.label_words))
    return resolved_task, family, resolved


def probabilities(label_logprobs: np.ndarray) -> np.ndarray:
    """(n, C) softmax over the label words of (n, C) full-vocabulary log-probabilities."""
    shifted = label_logprobs - label_logprobs.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    return p / p.sum(axis=1, keepdims=True)


def answer(model: Any, family: Family, pattern: Pattern, demonstrations: Sequence[Example], rows: Sequence[Example],
           *, batch_size: int, use_prefix_cache: bool = True, label_score: str = "sum",
           progress: bool = True) -> list[dict[str, Any]]:
    """One output row per input row, in input order; rows that do not fit the model carry ``skipped``."""
    from icldistill.scoring.evalsets import score_prompts

    encoded, scores, _ = score_prompts(model, pattern, demonstrations, rows, batch_size=batch_size,
                                       use_prefix_cache=use_prefix_cache, label_score=label_score,
                                       desc="predict" if progress else None)
    logprobs = scores.label_logprobs.numpy().astype(np.float64)
    probs = probabilities(logprobs) if len(logprobs) else logprobs
    scored = {ex.id: i for i, ex in enumerate(encoded.examples)}
    prefix = len(encoded.prefix_ids)
    out = []
    for ex in rows:
        row: dict[str, Any] = {"id": ex.id, **ex.fields}  # the input beside its answer, to join back
        i = scored.get(ex.id)
        if i is None:
            tokens = len(model.tokenizer(pattern.render(ex.fields), add_special_tokens=False)["input_ids"])
            row.update(pred=None, label=None, label_word=None, skipped=(
                f"too long: {prefix + tokens} tokens (prompt {tokens}"
                + (f" after {prefix} of demonstrations" if demonstrations else "")
                + f") > {model.name}'s {model.max_length}"))
        else:
            c = int(np.argmax(logprobs[i]))
            row.update(pred=c, label=family.classes[c], label_word=pattern.label_words[c],
                       probs={name: round(float(p), 6) for name, p in zip(family.classes, probs[i])},
                       label_logprobs=[round(float(v), 6) for v in logprobs[i]])
        out.append(row)
    return out


def write_rows(path: Path, rows: Sequence[dict[str, Any]], classes: Sequence[str],
               fields: Sequence[str] = ()) -> None:
    """Atomically write ``rows`` as JSON Lines, CSV (one ``p_<class>`` column per class) or Parquet.

    Each row keeps its ``id`` (the task's id column, else the row's position) and its input ``fields``.
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        atomic_write_jsonl(path, rows, option="--output")
        return
    flat = [{"id": r["id"], **{f: r.get(f) for f in fields}, "pred": r["pred"], "label": r["label"],
             "label_word": r["label_word"],
             **{f"p_{c}": (r.get("probs") or {}).get(c) for c in classes}, "skipped": r.get("skipped", "")}
            for r in rows]
    if suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
        atomic_write_bytes(path, buffer.getvalue().encode("utf-8"), option="--output")
    elif suffix == ".parquet":
        import pandas as pd

        buffer = io.BytesIO()
        pd.DataFrame(flat).to_parquet(buffer, index=False)
        atomic_write_bytes(path, buffer.getvalue(), option="--output")
    else:
        raise ConfigError(f"--output {path}: unknown format {suffix or '(none)'}; use .jsonl, .csv or .parquet.")


def run_predict(config: PredictOptions, *, progress: bool = True) -> dict[str, Any]:
    """Answer every row of ``config.input`` with ``config.model``; write ``config.output``; return a summary."""
    if not config.input:
        raise ConfigError("icld predict needs --input FILE (.jsonl, .csv or .parquet with the task's input columns).")
    output = Path(config.output).expanduser()
    if output.suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"):
        raise ConfigError(f"--output {output}: unknown format; use .jsonl, .csv or .parquet.")
    probe_writable(output.parent, "--output")  # before the model loads, not after every row is answered
    source = resolve_source(config.model)
    from icldistill.methods.gen_predict import answers_generation, run_gen_predict

    if answers_generation(source, config.task):  # free-form answers: methods.gen_predict
        return run_gen_predict(config, source, output, summary_path(output))
    task, family, pattern = resolve_prompting(source, config.task, config.pattern, config.label_words)
    rows = read_inputs(config.input, family.fields, strip=task.train.strip, id_column=task.train.id_column or "id")
    demonstrations: list[Example] = []
    if config.demonstrations or config.shots:
        require_data(task, config.model, "--shots/--demonstrations draw demonstrations from its training data")
    label_score = (config.label_score if config.label_score != "auto"
                   else (source.meta or {}).get("label_score") or "sum")
    if config.demonstrations:  # fixed rows, in file order (as icl and distill take them)
        from icldistill.methods.common import load_demonstrations

        demonstrations = list(load_demonstrations(task, config.demonstrations).examples)
    elif config.shots:
        train = data_mod.load(task.train, config.data_dir, config.data_source)
        demonstrations = sample_demonstrations(train.examples, config.shots, len(family.classes),
                                               context_rng(config.seed), exclude={ex.text_key() for ex in rows},
                                               classes=family.classes)
    elif source.kind == "model":
        logger.info("%s answers zero-shot (no --shots): right for a trained student, weak for a plain model",
                    config.model)
    with measure(config.device) as loading:
        model = load_source(source, dtype=config.dtype, device=config.device, cache_dir=config.cache_dir)
    with measure(model.device) as cost:
        out = answer(model, family, pattern, demonstrations, rows, batch_size=config.batch_size,
                     use_prefix_cache=config.prefix_cache, label_score=label_score, progress=progress)
    scored = sum(r["pred"] is not None for r in out)
    if distributed.is_main():  # under N processes every rank holds every answer; one writes them
        write_rows(output, out, family.classes, family.fields)
    counts = {c: sum(r["label"] == c for r in out) for c in family.classes}
    summary = {
        "model": config.model, "kind": source.kind, "task": task.name, "pattern": pattern.name,
        "id_column": task.train.id_column or "id",
        "label_words": list(pattern.label_words), "shots": len(demonstrations), "label_score": label_score,
        "rows": len(out), "scored": scored,
        "skipped": [{"id": r["id"], "why": r["skipped"]} for r in out if r.get("skipped")],
        "predicted": counts, "output": str(output), "load_time_s": round(loading.wall_time_s, 3),
        "inference": {**cost.as_dict(), "queries": scored,
                      "queries_per_s": scored / cost.wall_time_s if cost.wall_time_s else None,
                      "latency_ms_per_query": 1000 * cost.wall_time_s / scored if scored else None},
        "summary": str(summary_path(output)),
    }
    if distributed.is_main():  # what the answers cost, recorded beside them
        atomic_write_json(summary_path(output), summary, option="--output")
    return summary


def summary_path(output: Path) -> Path:
    """``answers.jsonl`` -> ``answers.jsonl.summary.json``: the run's record beside its answers."""
    return output.with_name(output.name + ".summary.json")


def describe(summary: dict[str, Any]) -> list[str]:
    """The lines ``icld predict`` prints."""
    if summary.get("kind") == "generation":
        from icldistill.methods.gen_predict import describe_generation

        return describe_generation(summary)
    inf = summary["inference"]
    lines = [f"{summary['scored']} of {summary['rows']} rows answered with {summary['model']} "
             f"({summary['task']}, pattern {summary['pattern']}, label words {summary['label_words']}"
             + (f", {summary['shots']} demonstrations" if summary["shots"] else "") + ")",
             "predicted: " + ", ".join(f"{c} {n}" for c, n in summary["predicted"].items())]
    for skipped in summary["skipped"][:10]:
        lines.append(f"row {skipped['id']} not answered: {skipped['why']}")
    if len(summary["skipped"]) > 10:
        lines.append(f"... and {len(summary['skipped']) - 10} more rows too long (see the output's 'skipped')")
    rate = (f"{inf['queries_per_s']:.1f} rows/s, {inf['latency_ms_per_query']:.2f} ms/row"
            if inf["queries_per_s"] else "-")
    lines.append(f"throughput {rate}; peak memory {inf['peak_memory_mb']:.0f} MB ({inf['memory_kind']}); "
                 f"model load {summary['load_time_s']:.1f} s")
    lines.append(f"output: {summary['output']} (summary: {summary['summary']})")
    return lines

