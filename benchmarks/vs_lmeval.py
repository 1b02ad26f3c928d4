"""Benchmark: icld against lm-evaluation-harness on the same prompts, in the same run.

The same k demonstrations (seed 0's draw) and the same MNLI-matched queries (the binarised task,
``--limit``'s seeded sample) are written as an lm-eval task (``first_n`` sampler, so the demonstrations
come in the same order; the ``gpt3`` pattern; ``target_delimiter " "``, ``fewshot_delimiter "\\n\\n"``,
label words Yes/No), and then, one after the other, in each dtype:

* ``lm_eval --model hf`` runs as a user runs it (batch 8, ``--log_samples`` so that each query's
  log-likelihoods can be read back), from its own virtual environment (created once under
  ``~/.cache/icldistill/bench-venvs/``, with the project's torch and transformers versions, so that
  only the harness differs; lm-eval is never a project dependency);
* ``icld icl`` runs through the public command line on the same prompts.

It prints the whole-process wall time of each (interpreter start, imports, model load, scoring), their
ratio, the accuracy of each, whether the prompts lm-eval built equal icld's character for character,
and the largest difference between the two log-likelihoods over all (query, label) pairs.
Targets (issue 13): within 1e-4 in fp32 with identical predictions; icld >= 15x faster at k=16 in fp32.

    python benchmarks/vs_lmeval.py --model smollm2-135m --shots 16 --queries 200 --dtypes fp32,bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icldistill.config import IclOptions, build_config
from icldistill.methods.common import Setup, prepare
from icldistill.models.packaged import fetch_packaged
from icldistill.runtime.paths import default_cache_dir
from icldistill.tasks.data import Example
from icldistill.tasks.prompts import Pattern, demonstration_prefix

LM_EVAL_VERSION = "0.4.13"
"""Pinned: the version whose context building (samplers.py, task.py) and pair encoding
(models/huggingface.py ``_encode_pair``) this script's prompts were checked against."""

_LM_EVAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
_TASK = "icld_mnli_vs_lmeval"


# --------------------------------------------------------------------------- lm-eval's own environment

def ensure_lmeval_venv(root: Path) -> Path:
    """The Python of a virtual environment holding lm-eval (created on first use), beside, never in, the project's.

    lm-eval's ``hf`` extra (transformers, accelerate, peft) is pinned to the versions this interpreter
    runs, so that a difference in the numbers comes from the harness, not from the libraries under
    it. torch goes in first and on its own (``pip install torch==X`` finds the CPU wheel on this
    machine's disk). The marker records what was installed; a different pin reinstalls.
    """
    venv = root / f"lm-eval-{LM_EVAL_VERSION}"
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    torch_spec = "torch==" + importlib.metadata.version("torch").split("+")[0]
    pins = [f"lm-eval[hf]=={LM_EVAL_VERSION}",
            *(f"{name}=={importlib.metadata.version(name)}" for name in ("transformers", "accelerate", "peft"))]
    wanted = "\n".join([torch_spec, *pins]) + "\n"
    if marker.is_file() and marker.read_text() == wanted:
        return python
    print(f"installing into {venv}: {torch_spec} {' '.join(pins)}", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, torch_spec], check=True)
    subprocess.run([*pip, *pins], check=True)
    marker.write_text(wanted)
    return python


# --------------------------------------------------------------------------- the prompts, as lm-eval task files

def jinja_template(pattern: Pattern) -> str:
    """The pattern as the Jinja template lm-eval's ``doc_to_text`` expects (``{premise}`` -> ``{{premise}}``)."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(pattern.template):
        if any(c in literal for c in "{}%#"):
            raise SystemExit(f"pattern {pattern.template!r} has characters Jinja would read; use a plain pattern")
        out.append(literal + ("{{" + name + "}}" if name is not None else ""))
    return "".join(out)


def write_lmeval_task(directory: Path, pattern: Pattern, demonstrations: Sequence[Example],
                      queries: Sequence[Example]) -> None:
    """The demonstrations (in order) as the few-shot split, the queries as the test split, and the task YAML."""
    if any(not w.startswith(" ") for w in pattern.label_words):
        raise SystemExit(f"label words {pattern.label_words} do not start with a space; lm-eval's target "
                         "delimiter ' ' would not reproduce them")
    directory.mkdir(parents=True, exist_ok=True)

    def rows(examples: Sequence[Example]) -> str:
        return "".join(json.dumps({"id": ex.id, **ex.fields, "label": ex.label}) + "\n" for ex in examples)

    (directory / "fewshot.jsonl").write_text(rows(demonstrations))
    (directory / "test.jsonl").write_text(rows(queries))
    choices = [w[1:] for w in pattern.label_words]
    # JSON is valid YAML: every string below is quoted exactly.
    task = {
        "task": _TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(directory / "fewshot.jsonl"),
                                          "test": str(directory / "test.jsonl")}},
        "output_type": "multiple_choice",
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": len(demonstrations),
        "doc_to_text": jinja_template(pattern),
        "doc_to_target": "label",
        "doc_to_choice": choices,
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "metric_list": [{"metric": "acc"}],
        "metadata": {"version": 1.0},
    }
    (directory / f"{_TASK}.yaml").write_text(json.dumps(task, indent=2) + "\n")


def icld_prompt(pattern: Pattern, demonstrations: Sequence[Example], query: Example) -> str:
    """The whole prompt string icld scores for ``query``: demonstrations, blank line, rendered query."""
    return demonstration_prefix(pattern, demonstrations) + pattern.render(query.fields)


# --------------------------------------------------------------------------- the two runs

def _offline_env(threads: int) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")


def _timed(command: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``command`` to completion; its whole-process wall time in seconds. Output goes to ``log``."""
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}; log in {log}")
    return seconds


def lmeval_scoring_seconds(log: str) -> float | None:
    """Seconds lm-eval's progress bar shows for its log-likelihood requests (the last bar in ``log``)."""
    bars = re.findall(r"Running loglikelihood requests: 100%.*?\[(?:(\d+):)?(\d+):(\d+)<", log)
    if not bars:
        return None
    hours, minutes, seconds = bars[-1]
    return 3600 * int(hours or 0) + 60 * int(minutes) + int(seconds)


def run_lmeval(python: Path, task_dir: Path, model_dir: Path, dtype: str, batch_size: int, shots: int,
               threads: int, out: Path) -> dict[str, Any]:
    """``lm_eval --model hf`` on the task; wall time and, per query id, its context and label log-likelihoods."""
    lm_eval = python.parent / "lm_eval"
    command = [str(lm_eval), "--model", "hf",
               "--model_args", f"pretrained={model_dir},dtype={_LM_EVAL_DTYPES[dtype]}",
               "--tasks", _TASK, "--include_path", str(task_dir), "--num_fewshot", str(shots),
               "--batch_size", str(batch_size), "--device", "cpu", "--output_path", str(out), "--log_samples"]
    seconds = _timed(command, _offline_env(threads), out.with_suffix(".log"))
    samples = sorted(out.rglob(f"samples_{_TASK}_*.jsonl"))
    if not samples:
        raise SystemExit(f"lm-eval wrote no samples file under {out}")
    per_query = {}
    for line in samples[-1].read_text().splitlines():
        sample = json.loads(line)
        args = [sample["arguments"][key] for key in sorted(sample["arguments"], key=lambda a: int(a.rsplit("_", 1)[1]))]
        per_query[sample["doc"]["id"]] = {
            "context": args[0]["arg_0"],
            "continuations": [a["arg_1"] for a in args],
            "loglik": [float(r[0]) for r in sample["filtered_resps"]],
        }
    scoring = lmeval_scoring_seconds(out.with_suffix(".log").read_text())
    return {"seconds": seconds, "scoring_seconds": scoring, "per_query": per_query}


def write_demonstrations_file(path: Path, setup: Setup, demonstrations: Sequence[Example]) -> None:
    """The demonstrations as a data file of the task's columns and raw labels, for ``--demonstrations``."""
    spec = setup.train.spec
    raw: dict[int, str] = {}
    for value, cls in spec.label_map.items():
        if cls is not None:
            raw.setdefault(cls, value)
    id_column = spec.id_column or "id"
    path.write_text("".join(json.dumps({id_column: d.id, **d.fields, spec.label_column: raw[d.label]}) + "\n"
                            for d in demonstrations))


def run_icld(model: str, dtype: str, setup: Setup, demonstrations: Sequence[Example],
             query_examples: Sequence[Example], threads: int, out: Path) -> dict[str, Any]:
    """``icld icl`` on the same prompts; wall time and, per query id, its label log-probabilities.

    The one place that knows how the icld side is run: the public command line, with the
    demonstrations fixed by ``--demonstrations FILE`` (in file order) where the command has it, else
    seed 0's draw, which is what this script read them from. Demonstrations and queries are checked
    against the run's records, so a difference fails loudly here.
    """
    command = [sys.executable, "-m", "icldistill.cli", "-q", "icl", "--model", model, "--task", "mnli",
               "--eval", "mnli-m", "--shots", str(len(demonstrations)), "--seeds", "0",
               "--limit", str(len(query_examples)), "--dtype", dtype, "--device", "cpu", "--output-dir", str(out)]
    if any(f.name == "demonstrations" for f in dataclasses.fields(IclOptions)):
        demo_file = out.with_name(out.name + "-demonstrations.jsonl")
        write_demonstrations_file(demo_file, setup, demonstrations)
        command += ["--demonstrations", str(demo_file)]
    seconds = _timed(command, _offline_env(threads), out.with_suffix(".log"))
    record = json.loads((out / "results.json").read_text())
    used = record["seeds"]["0"]["demonstrations"]
    if used != [d.id for d in demonstrations]:
        raise SystemExit(f"icld used demonstrations {used}, not the ones written for lm-eval")
    per_query = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        per_query[row["id"]] = {"loglik": row["label_logprobs"]}
    if set(per_query) != {q.id for q in query_examples}:
        raise SystemExit("icld scored other queries than the ones written for lm-eval")
    return {"seconds": seconds, "scoring_seconds": record["resources"]["scoring"]["wall_time_s"],
            "per_query": per_query}


# --------------------------------------------------------------------------- comparison

def compare(lm: dict[str, Any], icld: dict[str, Any], expected_prompts: dict[str, str],
            gold: dict[str, int]) -> dict[str, Any]:
    """Prompt equality, accuracies, prediction agreement and log-likelihood differences over all pairs."""
    diffs, same_prompt, same_pred, correct_lm, correct_icld = [], 0, 0, 0, 0
    for qid, ref in lm["per_query"].items():
        mine = icld["per_query"][qid]["loglik"]
        same_prompt += ref["context"] == expected_prompts[qid]
        diffs += [abs(a - b) for a, b in zip(ref["loglik"], mine)]
        pred_lm = max(range(len(mine)), key=lambda c: ref["loglik"][c])
        pred_icld = max(range(len(mine)), key=lambda c: mine[c])
        same_pred += pred_lm == pred_icld
        correct_lm += pred_lm == gold[qid]
        correct_icld += pred_icld == gold[qid]
    n = len(lm["per_query"])
    diffs.sort()
    return {"queries": n, "identical_prompts": same_prompt, "identical_predictions": same_pred,
            "lmeval_accuracy": correct_lm / n, "icld_accuracy": correct_icld / n,
            "max_abs_loglik_diff": diffs[-1], "median_abs_loglik_diff": diffs[len(diffs) // 2],
            "lmeval_s": lm["seconds"], "icld_s": icld["seconds"], "speedup": lm["seconds"] / icld["seconds"],
            # Scoring alone (lm-eval's progress bar, icld's measured scoring section): what remains of the
            # ratio once the fixed costs of a process (imports, model load) are set aside.
            "lmeval_scoring_s": lm["scoring_seconds"], "icld_scoring_s": icld["scoring_seconds"],
            "scoring_speedup": lm["scoring_seconds"] / icld["scoring_seconds"] if lm["scoring_seconds"] else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="a packaged model (its converted directory feeds lm-eval)")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--queries", type=int, default=200, help="MNLI-matched queries (icld's --limit sample)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--lmeval-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--venvs", default=None, help="where lm-eval's environment lives "
                        "(default: <icldistill cache>/bench-venvs)")
    parser.add_argument("--work", default=None, help="directory for task files and outputs (default: a new temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    python = ensure_lmeval_venv(Path(args.venvs) if args.venvs else default_cache_dir() / "bench-venvs")
    model_dir = fetch_packaged(args.model)
    setup = prepare(build_config(IclOptions, {"task": "mnli", "eval": ["mnli-m"], "limit": args.queries}))
    demonstrations = setup.demonstrations(0, args.shots)
    queries = setup.eval_examples["mnli-m"]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="icld-vs-lmeval-"))
    write_lmeval_task(work / "task", setup.pattern, demonstrations, queries)
    expected = {q.id: icld_prompt(setup.pattern, demonstrations, q) for q in queries}
    gold = {q.id: q.label for q in queries}
    print(f"model {args.model} ({model_dir}), k={args.shots}, {len(queries)} MNLI-m queries, lm-eval {LM_EVAL_VERSION} "
          f"batch {args.lmeval_batch_size}, {args.threads} threads; work dir {work}", flush=True)

    rows = []
    header = (f"{'dtype':<5} {'lm-eval s':>9} {'icld s':>7} {'ratio':>6} {'acc lm-eval':>11} {'acc icld':>8} "
              f"{'same prompt':>11} {'same pred':>9} {'max |dll|':>9} {'median':>8}")
    print(header)
    print("-" * len(header))
    for dtype in args.dtypes.split(","):
        icld = run_icld(args.model, dtype, setup, demonstrations, queries, args.threads, work / f"icld-{dtype}")
        lm = run_lmeval(python, work / "task", model_dir, dtype, args.lmeval_batch_size, args.shots, args.threads,
                        work / f"lmeval-{dtype}")
        row = {"dtype": dtype, **compare(lm, icld, expected, gold)}
        rows.append(row)
        n = row["queries"]
        print(f"{dtype:<5} {row['lmeval_s']:>9.1f} {row['icld_s']:>7.1f} {row['speedup']:>5.1f}x "
              f"{row['lmeval_accuracy']:>11.3f} {row['icld_accuracy']:>8.3f} {row['identical_prompts']:>6}/{n:<4} "
              f"{row['identical_predictions']:>4}/{n:<4} {row['max_abs_loglik_diff']:>9.2e} "
              f"{row['median_abs_loglik_diff']:>8.1e}", flush=True)
        if row["scoring_speedup"]:
            print(f"      scoring alone: lm-eval {row['lmeval_scoring_s']:.1f} s, icld {row['icld_scoring_s']:.1f} s, "
                  f"{row['scoring_speedup']:.1f}x", flush=True)
    ok = True
    for row in rows:
        if row["dtype"] == "fp32":
            agree = row["max_abs_loglik_diff"] <= 1e-4 and row["identical_predictions"] == row["queries"]
            fast = row["speedup"] >= 15 or args.shots != 16
            print(f"target fp32 within 1e-4, identical predictions: {'met' if agree else 'NOT met'}")
            if args.shots == 16:
                print(f"target icld >= 15x faster at k=16 fp32: {row['speedup']:.1f}x, {'met' if fast else 'NOT met'}")
            ok = ok and agree  # a miss on speed is reported, a disagreement fails the run
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "shots": args.shots, "lm_eval": LM_EVAL_VERSION,
                                               "threads": args.threads, "rows": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
