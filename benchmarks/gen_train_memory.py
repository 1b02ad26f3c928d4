"""Benchmark: a generation student's training memory: the whole logits against the chunked loss, with and
without --gradient-checkpointing and --grad-accum.

Each configuration runs in its own process (one run's peak cannot leak into another's): the same student
(default Qwen2.5-Coder-0.5B, LoRA r=8 on q_proj/v_proj, fp32), SFT on GSM8K's reference solutions
(``--signal reference``: no teacher is loaded, so the figure is the student's training alone; ``--signal
on-policy`` adds a teacher scoring the student's samples), the same
training questions, the same steps of the same batch. "whole logits" is the loss as it was before the
chunked one (``training.sequence.answer_logits``: the (tokens, vocab) logits at once), patched in for that
process only. The script reads each run's training peak memory and seconds per step from its results.json
and prints ratios against that baseline. Every variant trains the same weights (the tests check that the
chunked loss, checkpointing and accumulation leave the numbers alone): only memory and time differ.

    python benchmarks/gen_train_memory.py --student qwen2.5-coder-0.5b --batch 8 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from train_cost import measured

WHOLE_LOGITS = ("import sys; import icldistill.methods.gen_train as g, icldistill.methods.gen_teacher as t; "
                "from icldistill.training.sequence import answer_logits; g.answer_scores = t.answer_scores = "
                "answer_logits; from icldistill.cli import main; sys.exit(main(sys.argv[1:]))")
CHUNKED = "import sys; from icldistill.cli import main; sys.exit(main(sys.argv[1:]))"
VARIANTS = {  # name: (loss, extra options)
    "whole logits": (WHOLE_LOGITS, []),
    "whole logits + checkpointing": (WHOLE_LOGITS, ["--gradient-checkpointing"]),
    "chunked": (CHUNKED, []),
    "chunked + checkpointing": (CHUNKED, ["--gradient-checkpointing"]),
    "chunked + checkpointing + accum 2": (CHUNKED, ["--gradient-checkpointing", "--grad-accum", "2"]),
}


def run(code: str, command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-c", code, "-q", *command], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"failed: {' '.join(command)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="qwen2.5-coder-0.5b")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--signal", default="reference", help="reference (no teacher) or on-policy (--teacher "
                        "scores the student's samples of up to --max-new-tokens)")
    parser.add_argument("--teacher", default="qwen2.5-coder-0.5b")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="on-policy samples' length (and the answer "
                        "to the one evaluation question)")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per run")
    parser.add_argument("--batch", type=int, default=8, help="examples per optimiser step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    work = Path(tempfile.mkdtemp(prefix="icld-gen-train-memory-"))
    common = ["gen-distill", "--task", args.task, "--student", args.student, "--teacher", args.teacher,
              "--signal", args.signal, "--shots", "4",
              "--seeds", "0", "--train-queries", str(args.batch * args.steps), "--train-batch-size", str(args.batch),
              "--max-steps", str(args.steps), "--dev-queries", "0", "--eval-every", "-1", "--limit", "1",
              "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype, "--warmup-ratio", "0",
              "--lr", "1e-4", "--no-save-every-epoch"]
    what = (f"SFT on {args.task} references" if args.signal == "reference" else
            f"{args.signal} on {args.task}, teacher {args.teacher}, samples of up to {args.max_new_tokens} tokens")
    print(f"student {args.student}, {what}, {args.steps} steps of {args.batch} examples, {args.threads} threads, "
          f"{args.dtype}")
    print(f"{'variant':<34} {'s/step':>8} {'x base':>7} {'peak MB':>8} {'x base':>7}")
    rows: list[dict] = []
    for i, name in enumerate(args.variants.split(",")):
        code, extra = VARIANTS[name]
        out = work / f"variant-{i}"
        run(code, [*common, *extra, "--output-dir", str(out)], env)
        m = measured(out)
        base = rows[0] if rows else m
        rows.append({"variant": name, **m})
        print(f"{name:<34} {m['seconds_per_step']:>8.2f} {m['seconds_per_step'] / base['seconds_per_step']:>7.2f} "
              f"{m['peak_memory_mb']:>8,.0f} {m['peak_memory_mb'] / base['peak_memory_mb']:>7.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
