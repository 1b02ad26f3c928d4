"""Benchmark: greedy generation after a context, naive full prompt vs the shared-prefix cache, against the floor.

The same GSM8K test questions are answered three ways, each batch of queries by all three in turn (so
background load falls on all alike): the naive path (every whole prompt, context + question, decoded
from scratch), the cached path (the context's key/value cache computed once, batches continue from
it) and the floor (the question alone, no context: what a student that needs no context pays). Every
path decodes exactly ``--new-tokens`` tokens (EOS ignored), so they are timed at equal lengths; the
script also checks that the naive and cached paths write the same tokens when both stop at EOS.
Target (issue 22): cached <= 1.3x the floor. Ratios within one run, never across machines.

    python benchmarks/generation_prefix_cache.py --model qwen2.5-coder-0.5b --shots 2 --queries 16
"""

from __future__ import annotations

import argparse
import gzip
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
    parse_generation_task,
    render_prompt,
    rows_from_records,
    uses_chat_template,
)

TASK = {"type": "generation", "name": "gsm8k", "inputs": ["question"], "template": "Question: {question}\nAnswer:",
        "answer_column": "answer", "stop": ["\n\nQuestion:"], "chat_template": "auto"}


def _rows(split: str, task, data_dir: Path):
    with gzip.open(data_dir / "gsm8k" / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return rows_from_records(task, [json.loads(line) for line in f], f"gsm8k/{split}")


def _timed(model, tokenizer, prompts, decode, *, cached):
    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, decode, use_prefix_cache=cached)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive path (it is the slow one)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    data_dir = Path(os.environ.get("ICLDISTILL_DATA", "../shared/data"))
    task = parse_generation_task({**TASK, "shots": args.shots}, Path("gsm8k.yaml"))
    queries = _rows("test", task, data_dir)[: args.queries]
    demos = draw_demonstrations(task, _rows("train", task, data_dir), seed=0)
    loaded = load_model(args.model, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    chat = uses_chat_template(task, tok)  # a chat template writes its own start tokens into the text

    def encode(text):
        return tok(text, add_special_tokens=False)["input_ids"] if chat else encode_text(tok, text)

    full = [encode(render_prompt(task, q, demos, tok)) for q in queries]
    bare = [encode(render_prompt(task, q, (), tok)) for q in queries]
    fixed = DecodeSettings(max_new_tokens=args.new_tokens, batch_size=args.batch_size, ignore_eos=True)
    times = {"naive": 0.0, "cached": 0.0, "floor": 0.0}
    for start in range(0, len(queries), args.batch_size):  # interleaved: a batch of each in turn
        part = slice(start, start + args.batch_size)
        if not args.no_naive:
            times["naive"] += _timed(model, tok, full[part], fixed, cached=False)[0]
        times["cached"] += _timed(model, tok, full[part], fixed, cached=True)[0]
        times["floor"] += _timed(model, tok, bare[part], fixed, cached=False)[0]
    natural = DecodeSettings(max_new_tokens=args.new_tokens, batch_size=args.batch_size, stop=tuple(task.stop))
    same = None
    if not args.no_naive:
        a = generate(model, tok, full[:4], natural, use_prefix_cache=True)
        b = [generate(model, tok, [p], natural, use_prefix_cache=False)[0] for p in full[:4]]
        same = sum(x.tokens == y.tokens for x, y in zip(a, b))
    report = {
        "model": args.model, "shots": args.shots, "queries": len(queries), "batch_size": args.batch_size,
        "new_tokens": args.new_tokens, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "context_tokens": statistics.mean(len(f) - len(b) for f, b in zip(full, bare)),
        "seconds": times, "cached_over_floor": times["cached"] / times["floor"],
        "naive_over_floor": None if args.no_naive else times["naive"] / times["floor"],
        "identical_answers_of_4": same,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
