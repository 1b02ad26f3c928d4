"""``icld predict`` with a generation student (a ``gen-distill`` run or its export) or a generation ``--task``.

Each input row is rendered with the task's template (the chat template where the task uses one) and
answered greedily through the one decoding path (``scoring.generation.generate``: batches continue from the
shared prefix). A trained student answers the query alone, as it was evaluated; ``--shots k`` gives any model
the task's context (instruction and k demonstrations drawn from its train split with ``--seed``: an ICL
teacher). The output has one row per input, in input order: its id and inputs, the generated text, the
extracted final answer (the task's extractor), its length in tokens and why it ended.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icldistill.config import PredictOptions
from icldistill.errors import ConfigError
from icldistill.methods.gen_setup import encode_prompts
from icldistill.methods.gen_source import is_generation, task_of
from icldistill.methods.trained import ModelSource, load_source
from icldistill.runtime import distributed
from icldistill.runtime.records import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, measure
from icldistill.scoring.generation import DecodeSettings, generate
from icldistill.scoring.generation_metrics import Extractor
from icldistill.tasks.generation import (
    GenerationRow,
    GenerationTask,
    draw_demonstrations,
    generation_task_files,
    is_generation_file,
    load_rows,
)
from icldistill.tasks.inputs import read_inputs

ANSWER_COLUMNS = ("text", "answer", "tokens", "finish")


def names_generation_task(name: str | None) -> bool:
    """Whether ``--task`` names a generation task (built-in, in ``$ICLDISTILL_TASKS``, or a ``type: generation``
    file); read without data."""
    if not name:
        return False
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return is_generation_file(Path(name).expanduser())
    return name in generation_task_files()


def answers_generation(source: ModelSource, task: str | None) -> bool:
    """Whether ``predict``/``eval`` take the generation path: a generation student, or a generation ``--task``."""
    return is_generation(source) or names_generation_task(task)


def _demonstrations(config: PredictOptions, task: GenerationTask, rows: Sequence[GenerationRow]
                    ) -> list[GenerationRow]:
    """``--shots`` demonstrations from the task's train split (none of them an input row); [] without."""
    if not config.shots:
        return []
    if config.demonstrations:
        raise ConfigError("--demonstrations is for classification tasks; a generation task draws --shots "
                          "demonstrations from its train split.")
    if task.train is None:
        raise ConfigError(f"--shots {config.shots}: generation task '{task.name}' has no train split here to draw "
                          "demonstrations from; pass --task with its task file.")
    train = load_rows(task, task.train, config.data_dir)
    exclude = frozenset(task.query_text(r) for r in rows)
    return draw_demonstrations(dataclasses.replace(task, shots=config.shots), train, config.seed, exclude=exclude)


def write_answers(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Atomically write the answer rows as JSON Lines, CSV or Parquet (every column a scalar)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        atomic_write_jsonl(path, rows, option="--output")
    elif suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["id", *ANSWER_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, buffer.getvalue().encode("utf-8"), option="--output")
    elif suffix == ".parquet":
        import pandas as pd

        buffer = io.BytesIO()
        pd.DataFrame(list(rows)).to_parquet(buffer, index=False)
        atomic_write_bytes(path, buffer.getvalue(), option="--output")
    else:
        raise ConfigError(f"--output {path}: unknown format {suffix or '(none)'}; use .jsonl, .csv or .parquet.")


def answer_rows(task: GenerationTask, rows: Sequence[GenerationRow], answers: Sequence[Any]) -> list[dict[str, Any]]:
    """One output row per input row: its id and inputs beside the generated text and the extracted answer."""
    extractor = Extractor(task.extractor, task.answer_pattern)
    return [{"id": row.id, **row.fields, "text": a.text, "answer": extractor(a.text), "tokens": len(a.tokens),
             "finish": a.finish} for row, a in zip(rows, answers)]


def run_gen_predict(config: PredictOptions, source: ModelSource, output: Path, summary_file: Path) -> dict[str, Any]:
    """Answer every row of ``config.input``; write ``output`` and the summary beside it; return the summary."""
    task = task_of(source, config.task)
    examples = read_inputs(config.input or "", task.inputs, id_column=task.id_column or "id")
    rows = [GenerationRow(ex.id, dict(ex.fields)) for ex in examples]
    demonstrations = _demonstrations(config, task, rows)
    # A plain model is prompted as the ICL teacher (instruction + demonstrations); a trained student alone.
    with_context = bool(demonstrations) or (source.kind == "model" and bool(task.instruction))
    with measure(config.device) as loading:
        model = load_source(source, dtype=config.dtype, device=config.device, cache_dir=config.cache_dir)
    settings = DecodeSettings(max_new_tokens=task.max_new_tokens, stop=task.stop, batch_size=config.batch_size)
    with measure(model.device) as cost:
        prompts = encode_prompts(model, task, rows, demonstrations, with_instruction=with_context)
        out = answer_rows(task, rows, generate(model.model, model.tokenizer, prompts, settings,
                                               use_prefix_cache=config.prefix_cache))
    if distributed.is_main():
        write_answers(output, out)
    n = len(out)
    summary = {"model": config.model, "kind": "generation", "source": source.kind, "task": task.name,
               "id_column": task.id_column or "id", "shots": len(demonstrations), "context": with_context,
               "rows": n, "answered": sum(r["answer"] is not None for r in out),
               "mean_answer_tokens": sum(r["tokens"] for r in out) / n if n else None,
               "finish": {f: sum(r["finish"] == f for r in out) for f in ("eos", "stop", "length")},
               "output": str(output), "load_time_s": round(loading.wall_time_s, 3),
               "inference": {**cost.as_dict(), "queries": n,
                             "latency_ms_per_query": 1000 * cost.wall_time_s / n if n else None},
               "summary": str(summary_file)}
    if distributed.is_main():
        atomic_write_json(summary_file, summary, option="--output")
    return summary


def describe_generation(summary: dict[str, Any]) -> list[str]:
    """The lines ``icld predict`` prints for generated answers."""
    inf = summary["inference"]
    latency = f"{inf['latency_ms_per_query']:.1f} ms/row" if inf.get("latency_ms_per_query") else "-"
    return [f"{summary['rows']} rows answered with {summary['model']} ({summary['task']}, "
            + (f"{summary['shots']} demonstrations" if summary["shots"] else
               "with the task's instruction" if summary["context"] else "the query alone") + ")",
            f"a final answer extracted from {summary['answered']} of {summary['rows']}; mean answer "
            f"{summary['mean_answer_tokens'] or 0:.1f} tokens; ended by "
            + ", ".join(f"{k} {v}" for k, v in summary["finish"].items()),
            f"latency {latency}; peak memory {inf['peak_memory_mb']:.0f} MB; model load {summary['load_time_s']:.1f} s",
            f"output: {summary['output']} (summary: {summary['summary']})"]
