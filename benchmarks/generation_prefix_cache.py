"""Benchmark: greedy generation after a context, naive full prompt vs the shared-prefix cache, against the floor.

The same GSM8K test questions are answered three ways, each batch of queries by all three in turn (so
background load falls on all alike): the naive path (every whole prompt, context + question, decoded
from scratch), the cached path (the context's key/value cache computed once, batches continue from
it) and the floor (the question alone, no context: what a student that needs no context pays). Every
path decodes exactly ``--new-tokens`` tokens (EOS ignored), so they are timed at equal lengths; the
script also checks that the naive and cached paths write the same tokens when both stop at EOS.
Target (issue 22): cached <= 1.3x the floor. Ratios within one run, never across machines: each ratio is
taken batch by batch (both sides timed back to back) and reported as its median and range.

With ``--teacher`` the teacher also answers with the context through the cache, interleaved the same way:
the distilled student's saving at inference (a student answering alone against the teacher with its cached
context), and the memory each side covers (weights, and the key/value cache of the context and of a row).

    python benchmarks/generation_prefix_cache.py --model qwen2.5-coder-0.5b --shots 2 --queries 16
    python benchmarks/generation_prefix_cache.py --model qwen2.5-coder-0.5b --teacher qwen2.5-coder-1.5b \
        --shots 4 --queries 8 --new-tokens 32 --repeats 2 --no-naive
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

from icldistill.models.loading import load_model
from icldistill.scoring.encoding import encode_text
from icldistill.scoring.generation import DecodeSettings, generate
from icldistill.tasks.generation import (
    draw_demonstrations,
    get_generation_task,
    load_rows,
    render_prompt,
    uses_chat_template,
)


def _timed(model, tokenizer, prompts, decode, *, cached):
    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, decode, use_prefix_cache=cached)
    return time.perf_counter() - start, out


def _spread(ratios: list[float]) -> dict[str, float]:
    """Median and range of per-batch ratios (each batch timed on both sides back to back)."""
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)}


def _weights_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def _kv_mb_per_token(model) -> float:
    """Key/value cache bytes one token costs in every layer (the context's share of a teacher's memory)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size() / 2**20


def _prompts(task, loaded, queries, demos):
    """(context + query, query alone) token ids for each query, rendered as the task renders them."""
    tok = loaded.tokenizer
    chat = uses_chat_template(task, tok)  # a chat template writes its own start tokens into the text

    def encode(text):
        return tok(text, add_special_tokens=False)["input_ids"] if chat else encode_text(tok, text)

    return ([encode(render_prompt(task, q, demos, tok)) for q in queries],
            [encode(render_prompt(task, q, (), tok)) for q in queries])


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--teacher", help="also time this teacher with the context (cached) against --model alone")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="passes over the queries (the first is a warm-up "
                        "when there are several)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive path (it is the slow one)")
    parser.add_argument("--json", help="write the figures here")
    return parser.parse_args()


def _time_paths(paths: dict, batch_size: int, decode: DecodeSettings, repeats: int) -> dict[str, list[float]]:
    """Seconds of every path on every batch, the paths interleaved batch by batch (load falls on all alike);
    with several repeats the first pass is a warm-up and is not kept."""
    n = len(next(iter(paths.values()))[2])
    kept: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(repeats):
        for start in range(0, n, batch_size):
            for name, (model, tok, prompts, cached) in paths.items():
                seconds = _timed(model, tok, prompts[start:start + batch_size], decode, cached=cached)[0]
                if repeat > 0 or repeats == 1:
                    kept[name].append(seconds)
    return kept


def main() -> None:
    args = _parse()
    torch.manual_seed(0)
    task = dataclasses.replace(get_generation_task("gsm8k"), shots=args.shots)  # the built-in task, its data
    queries = load_rows(task, task.eval["gsm8k"])[: args.queries]
    demos = draw_demonstrations(task, load_rows(task, task.train), seed=0)
    student = load_model(args.model, dtype=args.dtype)
    model, tok = student.model, student.tokenizer
    full, bare = _prompts(task, student, queries, demos)
    paths = {"cached": (model, tok, full, True), "floor": (model, tok, bare, False)}
    if not args.no_naive:
        paths["naive"] = (model, tok, full, False)
    teacher = load_model(args.teacher, dtype=args.dtype) if args.teacher else None
    if teacher is not None:
        paths["teacher_cached"] = (teacher.model, teacher.tokenizer, _prompts(task, teacher, queries, demos)[0], True)
    fixed = DecodeSettings(max_new_tokens=args.new_tokens, batch_size=args.batch_size, ignore_eos=True)
    times = _time_paths(paths, args.batch_size, fixed, args.repeats)
    natural = DecodeSettings(max_new_tokens=args.new_tokens, batch_size=args.batch_size, stop=tuple(task.stop))
    same = None
    if not args.no_naive:
        a = generate(model, tok, full[:4], natural, use_prefix_cache=True)
        b = [generate(model, tok, [p], natural, use_prefix_cache=False)[0] for p in full[:4]]
        same = sum(x.tokens == y.tokens for x, y in zip(a, b))
    context = statistics.mean(len(f) - len(b) for f, b in zip(full, bare))
    ratio = {f"{name}_over_floor": _spread([t / f for t, f in zip(times[name], times["floor"])])
             for name in paths if name != "floor"}
    report = {
        "model": args.model, "teacher": args.teacher, "shots": args.shots, "queries": len(queries),
        "batch_size": args.batch_size, "new_tokens": args.new_tokens, "repeats": args.repeats, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "context_tokens": context, "load_average": os.getloadavg(),
        "seconds": {name: sum(t) for name, t in times.items()}, **ratio, "identical_answers_of_4": same,
        "memory_mb": {"student_weights": _weights_mb(model),
                      "student_kv_per_row": _kv_mb_per_token(model) * (statistics.mean(map(len, bare))
                                                                        + args.new_tokens)},
    }
    if teacher is not None:
        report["memory_mb"] |= {"teacher_weights": _weights_mb(teacher.model),
                                "teacher_kv_context": _kv_mb_per_token(teacher.model) * context,
                                "teacher_kv_per_row": _kv_mb_per_token(teacher.model) * (
                                    statistics.mean(map(len, bare)) + args.new_tokens)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
