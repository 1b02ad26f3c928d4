"""Benchmark: training cost of PBFT vs context distillation with an online or a cached teacher.

Each configuration runs in its own process (so one run's peak memory cannot leak into another's) with
the same student, the same batch size and the same number of optimiser steps; the script reads
seconds per step (optimisation only) and the training peak memory from each run's results.json and
prints ratios against PBFT. For the cached teacher, a first process fills the teacher cache and a
second, measured process trains from it without ever loading the teacher: that is the cost a user pays
on every run after the first.

    python benchmarks/train_cost.py --student smollm2-135m --teacher gemma3-270m --shots 2,8,32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "icldistill.cli", "-q", *command], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"failed: {' '.join(command)}")


def measured(out: Path) -> dict[str, float]:
    record = json.loads((out / "results.json").read_text())
    seed = next(iter(record["seeds"].values()))
    res = seed["resources"]
    return {"seconds_per_step": res["seconds_per_step"], "peak_memory_mb": res["training"]["peak_memory_mb"],
            "steps": res["steps"], "trainable": seed["trainable"]["trainable_parameters"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="smollm2-135m")
    parser.add_argument("--teacher", default="gemma3-270m")
    parser.add_argument("--shots", default="2,8,32")
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per run")
    parser.add_argument("--batch", type=int, default=2, help="examples per step (k=2 PBFT has only 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    work = Path(tempfile.mkdtemp(prefix="icld-train-cost-"))
    common = ["--eval", "mnli-m", "--limit", "4", "--seeds", "0", "--train-batch-size", str(args.batch),
              "--dtype", args.dtype, "--warmup-ratio", "0", "--lr", "1e-4", "--no-save-every-epoch"]
    rows = []
    print(f"student {args.student}, teacher {args.teacher}, {args.steps} steps of {args.batch} examples, "
          f"{args.threads} threads, {args.dtype}")
    header = f"{'k':>3} {'method':<11} {'s/step':>8} {'x PBFT':>7} {'peak MB':>8} {'x PBFT':>7}"
    print(header)
    print("-" * len(header))
    for k in [int(x) for x in args.shots.split(",")]:
        pbft_epochs = max(1, args.steps * args.batch // k)
        queries = args.steps * args.batch
        distill = ["distill", "--teacher", args.teacher, "--student", args.student, "--shots", str(k),
                   "--train-queries", str(queries), "--epochs", "1", *common]
        results = {}
        out = work / f"pbft-{k}"
        run(["pbft", "--model", args.student, "--shots", str(k), "--epochs", str(pbft_epochs),
             "--output-dir", str(out), *common], env)
        results["pbft"] = measured(out)
        out = work / f"online-{k}"
        run([*distill, "--teacher-signal", "online", "--output-dir", str(out)], env)
        results["cd-online"] = measured(out)
        # The teacher cache is keyed by content: the first run fills it (or finds it), the second must hit.
        run([*distill, "--teacher-signal", "cached", "--output-dir", str(work / f"warm-{k}")], env)
        out = work / f"cached-{k}"
        run([*distill, "--teacher-signal", "cached", "--output-dir", str(out)], env)
        record = json.loads((out / "results.json").read_text())
        assert record["teacher_pass"]["cache_hits"] == 1 and not record["teacher_pass"]["teacher_loaded"]
        results["cd-cached"] = measured(out)
        base = results["pbft"]
        for method, r in results.items():
            r.update(k=k, method=method, time_ratio=r["seconds_per_step"] / base["seconds_per_step"],
                     memory_ratio=r["peak_memory_mb"] / base["peak_memory_mb"])
            rows.append(r)
            print(f"{k:>3} {method:<11} {r['seconds_per_step']:>8.3f} {r['time_ratio']:>6.2f}x "
                  f"{r['peak_memory_mb']:>8.0f} {r['memory_ratio']:>6.2f}x", flush=True)
    cached = {r["k"]: r for r in rows if r["method"] == "cd-cached"}
    ks = sorted(cached)
    flat = cached[ks[-1]]["peak_memory_mb"] / cached[ks[0]]["peak_memory_mb"]
    print(f"cd-cached peak memory k={ks[-1]} / k={ks[0]}: {flat:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "cached_memory_flatness": flat}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
