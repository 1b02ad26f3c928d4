"""N processes give the numbers of one: ``accelerate launch`` runs of every method on tiny models.

Each launch test starts 2 processes with ``accelerate launch --multi_gpu`` with CUDA hidden, so the
launcher's torchrun path runs them on CPUs with the gloo backend (``accelerate launch --cpu`` starts a
single process unless mpirun is set up), and compares with the same configuration run in this
process. Tolerance: fp32 on CPU, the runs differ only in which queries share a batch and in the order
gradients are summed over ranks (about 1e-7 measured); metrics, label log-probabilities and
training losses must agree within ``TOL`` = 1e-5, and predictions exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from icldistill.config import DistillOptions, IclOptions, PbftOptions, build_config
from icldistill.runtime import distributed

TOL = 1e-5
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


# ------------------------------------------------------------------------------------- helpers, one process


def test_single_process_helpers_are_no_ops():
    assert not distributed.launched() and distributed.num_processes() == 1 and distributed.is_main()
    assert distributed.shard(5) == [0, 1, 2, 3, 4] and distributed.split_step([7, 3]) == ([7, 3], 2)
    t = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows([t, None], [0, 1, 2], 3)[0] is t  # returned as is: bit-identical
    assert distributed.broadcast({"a": 1}) == {"a": 1} and distributed.sum_across([1.5, 2.0]) == [1.5, 2.0]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
def test_shards_cover_every_index_with_equal_lengths(monkeypatch, n):
    shards, steps = [], []
    for rank in range(3):
        monkeypatch.setattr(distributed, "num_processes", lambda: 3)
        monkeypatch.setattr(distributed, "process_index", lambda rank=rank: rank)
        shards.append(distributed.shard(n))
        steps.append(distributed.split_step(list(range(100, 100 + n))))
    assert {len(s) for s in shards} == {math.ceil(n / 3)}  # same number of forward passes on every rank
    assert sorted({i for s in shards for i in s}) == list(range(n))
    assert [i for local, _ in steps for i in local] == list(range(100, 100 + n))  # no example twice
    assert {size for _, size in steps} == {math.ceil(n / 3)}


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load((CONFIGS / name).read_text())
    config = load_config_from_file(str(CONFIGS / name))  # accelerate's own loader rejects unknown keys
    assert config.mixed_precision == "bf16" and raw["num_processes"] > 1 and not raw["use_cpu"]
    if name == "ddp.yaml":
        assert raw["distributed_type"] == "MULTI_GPU"
    else:
        assert raw["distributed_type"] == "FSDP"
        assert raw["fsdp_config"]["fsdp_reshard_after_forward"] is True  # full shard
        assert {"fsdp_version", "fsdp_auto_wrap_policy", "fsdp_state_dict_type"} <= set(raw["fsdp_config"])


# ------------------------------------------------------------------------------------- 2 processes vs 1


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), where gloo's own sockets and bind(0) never land,
    drawn at random so that concurrent test runs rarely pick the same one."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _launch(args: list[str], cache_dir: Path) -> str:
    """Run ``icld -q ARGS`` in 2 processes; return its stdout (failing with the stderr tail)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ICLDISTILL_CACHE=str(cache_dir),
               PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "icldistill.cli", "-q", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    # torchrun's summary ends stderr; the ranks' own errors come before it.
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line or "terminate" in line]
    assert done.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    assert done.stdout.count("results: ") == 1, done.stdout  # rank 0 alone prints
    return done.stdout


def _flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def _common(data_dir, out: Path, **kw) -> dict:
    base = dict(task="mnli", eval=["mnli-m", "hans-lo"], shots=4, seeds=[0], limit=13, batch_size=4,
                data_dir=str(data_dir), output_dir=str(out), dtype="fp32", device="cpu")
    base.update(kw)
    return base


def _training(**kw) -> dict:
    base = dict(epochs=2, lr=1e-2, train_batch_size=4, grad_accum=2, warmup_ratio=0.0, lora_dropout=0.0)
    base.update(kw)
    return base


def _assert_close(a, b, path="") -> None:
    """Numbers within TOL, everything else equal, the same keys (None for NaN in JSON)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert abs(a - b) <= TOL, (path, a, b)
    else:
        assert a == b, (path, a, b)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _no_leftovers(root: Path) -> None:
    """Nothing half-written or written twice: no temporary files, no checkpoint left mid-swap."""
    names = _files(root)
    assert not [n for n in names if n.endswith(".tmp") or "/." in n or n.startswith(".")], names
    assert not [n for n in names if "checkpoint.tmp" in n or "checkpoint.old" in n], names


@pytest.mark.slow  # launches real 2-process runs (about 10 s each)
def test_icl_two_processes_equal_one(tmp_path, data_dir, tiny_dirs, cache_dir):
    from icldistill.methods.icl import run_icl

    values = _common(data_dir, tmp_path / "one", model=str(tiny_dirs["student"]), seeds=[0, 1])
    run_icl(build_config(IclOptions, values), progress=False)
    one = json.loads((tmp_path / "one" / "results.json").read_text())  # as written (NaN -> null), like two
    _launch(["icl", *_flags({**values, "output_dir": str(tmp_path / "two")})], cache_dir)

    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["environment"]["num_processes"] == 2
    _assert_close(one["seeds"], two["seeds"])
    _assert_close(one["aggregate"], two["aggregate"])
    assert _files(tmp_path / "two") == {"results.json", "predictions.jsonl"}
    _no_leftovers(tmp_path / "two")
    rows = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 13 and len({(r["seed"], r["eval"], r["id"]) for r in rows}) == len(rows)
    assert [(r["seed"], r["eval"], r["id"], r["pred"]) for r in rows] == [
        (r["seed"], r["eval"], r["id"], r["pred"]) for r in expected]
    _assert_close(expected, rows)


@pytest.mark.slow  # launches real 2-process runs (about 10 s each)
def test_distill_two_processes_equal_one(tmp_path, data_dir, tiny_dirs, cache_dir):
    """Cached teacher pass (2 contexts) and training: steps of 8 examples (2 micro-batches of 2 per rank,
    the first without gradient sync) and 1 example (the other rank runs a zero-weight stand-in)."""
    from safetensors.torch import load_file

    from icldistill.methods.distill import run_distill

    values = _common(data_dir, tmp_path / "one", teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["student"]),
                     train_queries=9, alpha=0.5, teacher_contexts=2, **_training(train_batch_size=8, grad_accum=4))
    run_distill(build_config(DistillOptions, values), progress=False)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    _launch(["distill", *_flags({**values, "output_dir": str(tmp_path / "two")})], tmp_path / "cache2")

    two = json.loads((tmp_path / "two" / "results.json").read_text())
    a, b = one["seeds"]["0"], two["seeds"]["0"]
    _assert_close(a["eval"], b["eval"])
    _assert_close(a["history"], b["history"])  # global loss sums, the epoch-1 evaluation, the lr schedule
    assert a["resources"]["train_tokens"] == b["resources"]["train_tokens"]
    assert a["resources"]["steps"] == b["resources"]["steps"] == 2 * 2
    # The same teacher cache entries (the training signal, and the dev rows with and without demonstrations
    # for the ICL-gain check), each written once, holding the single-process signal.
    entries = sorted(p.name for p in (tmp_path / "cache2" / "teacher").glob("*.safetensors"))
    assert entries == sorted(p.name for p in (cache_dir / "teacher").glob("*.safetensors")) and len(entries) == 3
    expected = {n for e in entries for n in (e, e.replace(".safetensors", ".json"))}
    assert _files(tmp_path / "cache2" / "teacher") == expected
    entry = tmp_path / "cache2" / "teacher" / f"{two['teacher_pass']['keys']['0']}.safetensors"
    reference = cache_dir / "teacher" / entry.name
    assert torch.allclose(load_file(str(entry))["label_logprobs"], load_file(str(reference))["label_logprobs"],
                          atol=TOL)
    _assert_close(a["teacher_icl_gain"], b["teacher_icl_gain"])
    _no_leftovers(tmp_path / "two")
    assert {n for n in _files(tmp_path / "two") if not n.startswith("seed-0/adapter/")} == {
        "results.json", "predictions.jsonl", "seed-0/predictions.jsonl", "seed-0/seed_result.json",
        "seed-0/checkpoint/trainable.safetensors",
        "seed-0/checkpoint/trainer_state.json", "seed-0/checkpoint/optimizer.bin", "seed-0/checkpoint/scheduler.bin",
        "seed-0/checkpoint/random_states_0.pkl", "seed-0/checkpoint/random_states_1.pkl"}


@pytest.mark.slow  # launches real 2-process runs (about 10 s each)
def test_pbft_two_processes_equal_one_and_resume(tmp_path, data_dir, tiny_dirs, cache_dir):
    """2 processes equal 1; then, as after a kill following the last checkpoint, both resume one epoch more."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from icldistill.methods.pbft import run_pbft

    values = _common(data_dir, tmp_path / "one", model=str(tiny_dirs["student"]), shots=6, **_training())
    run_pbft(build_config(PbftOptions, values), progress=False)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two_dir = tmp_path / "two"
    flags = _flags({**values, "output_dir": str(two_dir)})
    _launch(["pbft", *flags], cache_dir)
    two = json.loads((two_dir / "results.json").read_text())
    _assert_close(one["seeds"]["0"]["eval"], two["seeds"]["0"]["eval"])
    _assert_close(one["seeds"]["0"]["history"], two["seeds"]["0"]["history"])
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    PeftModel.from_pretrained(base, str(two_dir / "seed-0" / "adapter"))  # rank 0's adapter, whole

    # Killed after epoch 2's checkpoint, before the seed's result was written; continued for a 3rd epoch.
    for out in (tmp_path / "one", two_dir):
        (out / "seed-0" / "seed_result.json").unlink()
        (out / "results.json").unlink()
    # A checkpoint records its run's identity, and a resume refuses another run's (a 2-epoch run's here); the
    # checkpoints are made to record the 3-epoch run's identity, as that run's own would after epoch 2.
    from icldistill.errors import ConfigError
    from icldistill.runtime.rundir import identity_of

    longer = build_config(PbftOptions, {**values, "epochs": 3, "resume": True})
    with pytest.raises(ConfigError, match="made by another run"):
        run_pbft(longer, progress=False)
    for out in (tmp_path / "one", two_dir):
        state_file = out / "seed-0" / "checkpoint" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({**state, "identity": identity_of("pbft", longer)}))
    run_pbft(longer, progress=False)
    _launch(["pbft", *flags, "--epochs", "3", "--resume"], cache_dir)
    a, b = (json.loads((out / "results.json").read_text())["seeds"]["0"] for out in (tmp_path / "one", two_dir))
    assert a["resources"]["resumed_from_epoch"] == b["resources"]["resumed_from_epoch"] == 2
    assert len(b["history"]) == 3
    _assert_close(a["eval"], b["eval"])
    _assert_close(a["history"], b["history"])
    _no_leftovers(two_dir)
    assert json.loads((two_dir / "seed-0" / "checkpoint" / "trainer_state.json").read_text())["epochs_done"] == 3


@pytest.mark.slow  # launches a real 2-process run (about 20 s)
def test_gen_distill_two_processes_equal_one_with_the_chunked_loss_and_checkpointing(tmp_path, data_dir, tiny_dirs,
                                                                                     cache_dir):
    """Generation training under DDP: the chunked loss runs the LM head outside the model's (DDP) forward, and
    the 2-process run also recomputes its layers (--gradient-checkpointing): the same history and answers."""
    from icldistill.config import GenDistillOptions
    from icldistill.methods.gen_distill import run_gen_distill

    values = dict(teacher=str(tiny_dirs["teacher"]), student=str(tiny_dirs["student"]), task="gsm8k", shots=2,
                  seeds=[0], limit=4, batch_size=4, max_new_tokens=6, data_dir=str(data_dir),
                  output_dir=str(tmp_path / "one"), dtype="fp32", device="cpu", chat_template="no", signal="token",
                  train_queries=8, dev_queries=0, eval_every=-1, teacher_topk=8,
                  **_training(train_batch_size=4, grad_accum=2))
    run_gen_distill(build_config(GenDistillOptions, values), progress=False)
    _launch(["gen-distill", *_flags({**values, "output_dir": str(tmp_path / "two"), "gradient_checkpointing": True})],
            tmp_path / "cache2")
    a, b = (json.loads((tmp_path / out / "results.json").read_text())["seeds"]["0"] for out in ("one", "two"))
    _assert_close(a["history"], b["history"])
    _assert_close(a["eval"], b["eval"])
    assert a["resources"]["steps"] == b["resources"]["steps"] == 2 * 2
    _no_leftovers(tmp_path / "two")
