"""Benchmark: what the Qwen2.5-Coder pair costs, teacher with k demonstrations against the distilled student.

One process loads both models (fp32, ``--threads`` torch threads) and times, in rounds, four sides on the
same MNLI-m queries, interleaved batch by batch so that background load falls on all alike:

- ``student``: the 0.5B answering a query with no context (the distilled student at inference; its LoRA
  adapters are attached, unmerged, as a trained student that is not merged answers: about 0.1% more FLOPs);
- ``teacher cached``: the 1.5B with k demonstrations through the shared-prefix KV cache (a fresh prefix pass
  every round, counted); this is both ICL inference of the teacher and CD's teacher pass;
- ``teacher naive``: the same prompts whole, no cache (``--naive-queries`` of them a round: minutes each);
- ``train step``: one optimiser step of the student (LoRA r=8 on q/v, AdamW) on ``--train-batch`` zero-shot
  prompts against a fixed teacher label distribution (CD with a cached teacher signal: alpha 0.5 KL + CE).

Every side is warmed up first. Per round the script forms the ratios (per query: teacher cached with its
prefix pass shared by ``--queries`` queries, teacher cached per query after the prefix, teacher naive, each
over the student; a train step over the student's forward on the same number of prompts) and reports their
median and min-max over rounds, never one window. Peak memory of a side is its model's weights plus the
largest rise of the process's resident memory above the start of its timed windows (sampled every 5 ms);
the train step's includes LoRA, gradients and AdamW state.

    python benchmarks/pair_cost.py --shots 16 --queries 8 --naive-queries 1 --train-batch 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import torch

from icldistill.config import IclOptions, TrainOptions, build_config
from icldistill.methods.common import prepare
from icldistill.models.adapters import apply_lora
from icldistill.models.loading import load_model
from icldistill.scoring.evalsets import encode_prompts
from icldistill.scoring.prefix_cache import PrefixCache, label_token_ids, score_queries

PAGE = 4096


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class Peak:
    """The largest resident memory seen while a ``with peak.window(side)`` block runs, over its start."""

    def __init__(self) -> None:
        self.rise: dict[str, float] = {}
        self._current, self._start, self._max = None, 0.0, 0.0
        self._stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            if self._current is not None:
                self._max = max(self._max, _rss_mb())

    @contextmanager
    def window(self, side: str):
        self._start = self._max = _rss_mb()
        self._current = side
        try:
            yield
        finally:
            self._current = None
            self._max = max(self._max, _rss_mb())
            self.rise[side] = max(self.rise.get(side, 0.0), self._max - self._start)


def _weights_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def _flops_params(model: torch.nn.Module) -> int:
    """Parameters a token multiplies through (all but the input embedding): ~2 FLOPs each a token."""
    embed = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embed


def _train_step(peft_model, optimizer, ids: list[list[int]], labels: list[int], target: torch.Tensor,
                gold: torch.Tensor) -> float:
    """One CD step on a cached signal: right-padded zero-shot prompts, label-word KL to ``target`` + CE."""
    width = max(len(q) for q in ids)
    batch = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, q in enumerate(ids):
        batch[i, :len(q)], mask[i, :len(q)] = torch.tensor(q), 1
    logits = peft_model(input_ids=batch, attention_mask=mask).logits
    last = logits[torch.arange(len(ids)), mask.sum(1) - 1][:, labels].log_softmax(-1)
    kl = torch.nn.functional.kl_div(last, target, log_target=True, reduction="batchmean")
    loss = 0.5 * kl + 0.5 * torch.nn.functional.nll_loss(last, gold)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _round(s, *, naive: bool) -> dict[str, float]:
    """One round: the sides batch by batch; seconds of each (teacher cached with its fresh prefix pass)."""
    t = dict.fromkeys(("student", "prefix", "cached", "naive", "train", "student_train_batch"), 0.0)

    def timed(side: str, key: str, fn) -> None:
        start = time.perf_counter()
        fn()
        t[key] += time.perf_counter() - start

    def prefix() -> None:
        s.cache = PrefixCache(s.teacher.model, s.t_enc.prefix_ids)

    timed("teacher cached", "prefix", prefix)
    for b in s.batches:
        timed("student", "student", lambda b=b: score_queries(
            s.student.model, s.s_enc.prefix_ids, [s.s_enc.query_ids[i] for i in b], s.s_labels,
            batch_size=len(b)))
        timed("teacher cached", "cached", lambda b=b: score_queries(
            s.teacher.model, s.t_enc.prefix_ids, [s.t_enc.query_ids[i] for i in b], s.t_labels,
            batch_size=len(b), prefix_cache=s.cache))
    if naive:
        timed("teacher naive", "naive", lambda: score_queries(
            s.teacher.model, s.t_enc.prefix_ids, s.t_enc.query_ids[:s.naive_n], s.t_labels,
            batch_size=s.naive_n, use_prefix_cache=False))
    train_ids = s.s_train_ids
    timed("student", "student_train_batch", lambda: score_queries(
        s.student.model, [], train_ids, s.s_labels, batch_size=len(train_ids)))
    timed("train step", "train", lambda: _train_step(s.peft, s.optimizer, train_ids, s.label_ids, s.target, s.gold))
    s.cache = None
    return t


def _ratios(t: dict[str, float], q: int, naive_n: int) -> dict[str, float]:
    student = t["student"] / q
    out = {"student_ms": 1e3 * student, "teacher_cached_ms": 1e3 * (t["prefix"] + t["cached"]) / q,
           "teacher_query_ms": 1e3 * t["cached"] / q, "prefix_s": t["prefix"], "train_step_s": t["train"],
           "cached_over_student": (t["prefix"] + t["cached"]) / q / student,
           "query_only_over_student": t["cached"] / q / student,
           "train_step_over_forward": t["train"] / t["student_train_batch"]}
    if t["naive"]:
        out.update(teacher_naive_ms=1e3 * t["naive"] / naive_n, naive_over_student=t["naive"] / naive_n / student,
                   naive_over_cached=t["naive"] / naive_n / ((t["prefix"] + t["cached"]) / q))
    return out


class _Sides:
    """The models, prompts and training state the rounds share."""


def _setup(args, *, teacher: bool = True, student: bool = True) -> _Sides:
    """Data, prompts and models (both, or one for a memory side) and the student's LoRA and optimiser."""
    s = _Sides()
    setup = prepare(build_config(IclOptions, {"eval": ["mnli-m"], "limit": args.queries + args.train_batch,
                                             "data_dir": args.data_dir}))
    rows = setup.eval_examples["mnli-m"]
    queries, train_rows = rows[:args.queries], rows[args.queries:]
    demos = setup.demonstrations(0, args.shots)
    s.naive_n = min(args.naive_queries, len(queries))
    s.gold = torch.tensor([ex.label for ex in train_rows])
    # The CD target: the teacher's label distribution on the training prompts (a cached teacher signal);
    # uniform when only the student is loaded (the memory of a step does not depend on its values).
    s.target = torch.full((len(train_rows), 2), -math.log(2.0))
    if teacher:
        s.teacher = load_model(args.teacher, dtype="fp32", device="cpu")
        s.t_enc = encode_prompts(s.teacher, setup.pattern, demos, queries)
        s.t_labels = label_token_ids(s.teacher.tokenizer, setup.pattern.label_words)
        t_train = encode_prompts(s.teacher, setup.pattern, demos, train_rows)
        if student:
            s.target = score_queries(s.teacher.model, t_train.prefix_ids, t_train.query_ids, s.t_labels,
                                     batch_size=args.train_batch).label_logprobs.log_softmax(-1)
    if student:
        s.student = load_model(args.student, dtype="fp32", device="cpu")
        s.s_enc = encode_prompts(s.student, setup.pattern, [], queries)
        s.s_labels = s.label_ids = label_token_ids(s.student.tokenizer, setup.pattern.label_words)
        s.s_train_ids = [list(s.s_enc.prefix_ids) + list(q)
                         for q in encode_prompts(s.student, setup.pattern, [], train_rows).query_ids]
        s.peft = apply_lora(s.student.model, build_config(TrainOptions, {}))  # r=8, q/v: the project's default
        s.peft.train()
        s.optimizer = torch.optim.AdamW([p for p in s.peft.parameters() if p.requires_grad], lr=2e-4)
    enc = s.t_enc if teacher else s.s_enc
    order = sorted(range(len(enc.query_ids)), key=lambda i: -len(enc.query_ids[i]))
    s.batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    s.cache = None
    return s


def _memory_side(args) -> dict[str, float]:
    """``--side``: only that side's model loaded, its work done once; resident memory after the load and the
    largest rise above it while the side ran (first touch: nothing was allocated for it before)."""
    teacher = args.side.startswith("teacher")
    s = _setup(args, teacher=teacher, student=not teacher)
    model = s.teacher.model if teacher else s.student.model
    peak = Peak()
    after_load = _rss_mb()
    with peak.window(args.side):
        if args.side == "student":
            for b in s.batches:
                score_queries(model, s.s_enc.prefix_ids, [s.s_enc.query_ids[i] for i in b], s.s_labels,
                              batch_size=len(b))
        elif args.side == "teacher cached":
            cache = PrefixCache(model, s.t_enc.prefix_ids)
            for b in s.batches:
                score_queries(model, s.t_enc.prefix_ids, [s.t_enc.query_ids[i] for i in b], s.t_labels,
                              batch_size=len(b), prefix_cache=cache)
        elif args.side == "teacher naive":
            score_queries(model, s.t_enc.prefix_ids, s.t_enc.query_ids[:s.naive_n], s.t_labels,
                          batch_size=s.naive_n, use_prefix_cache=False)
        else:
            _train_step(s.peft, s.optimizer, s.s_train_ids, s.label_ids, s.target, s.gold)
    return {"side": args.side, "weights_mb": _weights_mb(model), "after_load_mb": after_load,
            "rise_mb": peak.rise[args.side], "peak_mb": after_load + peak.rise[args.side]}


def _summary(rounds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median and min / max over rounds of every per-round figure."""
    keys = sorted({k for r in rounds for k in r})
    out = {}
    for key in keys:
        values = sorted(r[key] for r in rounds if key in r)
        out[key] = {"median": statistics.median(values), "min": values[0], "max": values[-1], "n": len(values)}
    return out


SIDES = ("student", "teacher cached", "teacher naive", "train step")


def _memory(args) -> dict[str, dict[str, float]]:
    """Each side's peak memory, from a process of its own (``--side``), one after the other."""
    out = {}
    for side in SIDES:
        options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if v is not None and k not in ("side", "json", "memory")]
        argv = [sys.executable, __file__, "--side", side, *options]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        out[side] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _print(s, args, summary, memory, flops) -> None:
    print(f"{args.teacher} (k={args.shots}, prefix {len(s.t_enc.prefix_ids)} tokens) vs {args.student} "
          f"(no context); {len(s.s_enc.query_ids)} queries a round, {s.naive_n} naive, {args.repeats} rounds, "
          f"{torch.get_num_threads()} threads, fp32. FLOPs a token, teacher / student: {flops:.2f}x")
    for key, v in summary.items():
        print(f"{key:>26}: median {v['median']:10.3f}  min {v['min']:10.3f}  max {v['max']:10.3f}  (n={v['n']})")
    for side, m in memory.items():
        print(f"{'peak MB ' + side:>26}: {m['peak_mb']:10.0f}  (after load {m['after_load_mb']:.0f}, weights "
              f"{m['weights_mb']:.0f}, rise {m['rise_mb']:.0f})")


def _write(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(result, handle, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="qwen2.5-coder-1.5b")
    parser.add_argument("--student", default="qwen2.5-coder-0.5b")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--queries", type=int, default=8, help="MNLI-m queries a round (student, teacher cached)")
    parser.add_argument("--naive-queries", type=int, default=1, help="of them, scored whole (no cache) each round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure each side's peak memory, each in a process of its own")
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(_memory_side(args)))
        return 0
    s = _setup(args)
    print("warm-up", file=sys.stderr, flush=True)
    _round(s, naive=False)  # every side but the naive one once: allocation, kernel choice, AdamW state
    rounds = []
    for r in range(args.repeats):
        rounds.append(_ratios(_round(s, naive=True), len(s.s_enc.query_ids), s.naive_n))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in rounds[-1].items()), file=sys.stderr,
              flush=True)
    summary = _summary(rounds)
    flops = _flops_params(s.teacher.model) / _flops_params(s.student.model)
    result = {"args": vars(args), "rounds": rounds, "summary": summary, "flops_ratio": flops,
              "prefix_tokens": len(s.t_enc.prefix_ids), "peak_memory": {}}
    _print(s, args, summary, {}, flops)
    _write(args.json, result)  # the timings are kept even if a memory side fails
    del s.teacher, s.student, s.peft, s.optimizer  # the memory sides run after, each alone
    if args.memory:
        result["peak_memory"] = _memory(args)
        _print(s, args, {}, result["peak_memory"], flops)
        _write(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
