"""Loading rows from local JSON Lines files or the Hugging Face hub, validated row by row.

Every problem names the file, the line and what to do: a missing field, an empty text, an unknown
label, invalid JSON, a truncated gzip file, an empty file. Rows are returned as :class:`Example`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import random
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from icldistill.errors import DataError
from icldistill.runtime.paths import DATA_ENV, default_data_dir
from icldistill.tasks.registry import FAMILIES, DataSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One labelled row: its id, its text fields (stripped), its class index and extra metadata."""

    id: str
    fields: Mapping[str, str]
    label: int
    meta: Mapping[str, str] = field(default_factory=dict)

    def text_key(self) -> tuple[str, ...]:
        """The row's text, used to keep demonstrations and queries disjoint."""
        return tuple(self.fields[k] for k in sorted(self.fields))


@dataclass(frozen=True)
class LoadedData:
    """The rows of one data spec and a fingerprint of where they came from."""

    spec: DataSpec
    examples: tuple[Example, ...]
    source: str  # file path or hub id
    fingerprint: str  # sha256 prefix of the file bytes (local) or of the hub id + row ids


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data directory from the option, else from ``$ICLDISTILL_DATA``."""
    if data_dir:
        return Path(data_dir).expanduser()
    return default_data_dir()


def load(spec: DataSpec, data_dir: str | Path | None = None, source: str = "auto") -> LoadedData:
    """Load and validate the rows of ``spec`` from the local directory or the hub.

    ``source``: ``local`` needs a data directory; ``hub`` uses Hugging Face ``datasets``; ``auto``
    uses the local directory when one is configured, else the hub.
    """
    if source not in ("auto", "local", "hub"):
        raise DataError(f"Unknown data source {source!r}; use auto, local or hub (--data-source).")
    directory = resolve_data_dir(data_dir)
    if source == "hub" or (source == "auto" and directory is None):
        if spec.hub is None:
            raise DataError(f"'{spec.name}' has no Hugging Face source; give a local --data-dir.")
        return _load_hub(spec)
    if directory is None:
        raise DataError(
            f"No data directory for '{spec.name}': pass --data-dir DIR or set ${DATA_ENV} to a directory "
            f"holding {spec.local}, or use --data-source hub."
        )
    path = directory / spec.local
    if not path.exists():
        raise DataError(
            f"Data file {path} for '{spec.name}' does not exist. Check --data-dir / ${DATA_ENV} "
            f"(it must contain {spec.local}), or use --data-source hub."
        )
    stat = path.stat()
    return _load_local_cached(_SpecKey(spec), str(path.resolve()), stat.st_mtime_ns, stat.st_size)


class _SpecKey:
    """A hashable stand-in for a DataSpec in the cache key: its mappings make the spec itself unhashable."""

    __slots__ = ("spec", "_key")

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        self._key = repr(spec)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SpecKey) and self._key == other._key


@lru_cache(maxsize=32)
def _load_local_cached(key: _SpecKey, path: str, mtime_ns: int, size: int) -> LoadedData:
    """Parsing is cached per (spec, file version): sweeps and seeds reuse the same rows."""
    spec = key.spec
    raw = _read_bytes(Path(path))
    fingerprint = hashlib.sha256(raw).hexdigest()[:16]  # of the file's bytes, as SOURCES.md lists them
    raw = _decompress(raw, Path(path))
    examples = parse_rows(spec, _iter_lines(raw, path), path)
    logger.info("loaded %d rows of %s from %s", len(examples), spec.name, path)
    return LoadedData(spec, tuple(examples), path, fingerprint)


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc.strerror}. Check the path and its permissions.") from None
    return raw


def _decompress(raw: bytes, path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # corrupt deflate data raises zlib.error
            raise DataError(f"{path} is not a complete gzip file ({exc}); download or copy it again.") from None
    return raw


def _iter_lines(raw: bytes, path: str) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason}); re-encode the file as UTF-8.") from None
    # split on "\n" only: str.splitlines also breaks at U+2028, U+0085 etc., which JSON strings may hold raw
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); fix or remove the line.") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, found {type(row).__name__}; write one {{...}} object per line.")
        yield lineno, row


def parse_rows(spec: DataSpec, rows: Iterable[tuple[int, Mapping[str, Any]]], where: str) -> list[Example]:
    """Validate raw rows against ``spec``: required fields, label mapping, filters, unique ids.

    ``rows`` yields (line number, row); ``where`` names the file in messages.
    """
    family = FAMILIES[spec.family]
    known = ", ".join(repr(k) for k in spec.label_map)
    examples: list[Example] = []
    seen: dict[str, int] = {}
    n_rows = 0
    for lineno, row in rows:
        n_rows += 1
        if any(str(row.get(k)) != v for k, v in spec.filter.items()):
            continue
        for name in ("id", "label", *family.fields):
            if name not in row:
                raise DataError(f"{where}:{lineno}: missing field '{name}'. Every row needs id, label, {', '.join(family.fields)}.")
        label = row["label"]
        if not isinstance(label, str) or label not in spec.label_map:
            raise DataError(
                f"{where}:{lineno}: unknown label {label!r} for '{spec.name}'; expected one of {known}. "
                "Fix the row or choose the evaluation set that matches this file."
            )
        cls = spec.label_map[label]
        if cls is None:
            continue
        texts = {}
        for name in family.fields:
            value = row[name]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}:{lineno}: field '{name}' must be a non-empty string, got {value!r}; fill it in or remove the row.")
            texts[name] = value.strip()
        row_id = str(row["id"])
        if row_id in seen:
            raise DataError(f"{where}:{lineno}: duplicate id {row_id!r} (first on line {seen[row_id]}); ids must be unique.")
        seen[row_id] = lineno
        meta = {k: str(row[k]) for k in spec.meta_fields if k in row}
        examples.append(Example(row_id, texts, cls, meta))
    if n_rows == 0:
        raise DataError(f"{where} is empty; it must hold one JSON object per line.")
    if not examples:
        raise DataError(f"{where}: none of its {n_rows} rows is usable for '{spec.name}' (filters {dict(spec.filter)}).")
    return examples


def _load_hub(spec: DataSpec) -> LoadedData:
    """Read the rows from the Hugging Face hub; integer labels become names via the ClassLabel feature."""
    try:
        import datasets  # optional dependency: pip install 'icldistill[hub]'
    except ImportError:
        raise DataError("Loading from the hub needs the 'datasets' package: pip install 'icldistill[hub]'.") from None
    hub = spec.hub
    assert hub is not None
    try:
        ds = datasets.load_dataset(hub.path, hub.name, split=hub.split)
    except Exception as exc:  # the hub raises many types (network, missing config); report them all alike
        raise DataError(
            f"Cannot load {hub.path}/{hub.name or ''} split {hub.split} from the hub ({exc}). "
            "Without hub access use --data-source local with --data-dir."
        ) from None
    names = getattr(ds.features.get("label"), "names", None)
    columns = {hub.rename.get(c, c) for c in ds.column_names}
    missing = {k: v for k, v in spec.filter.items() if k not in columns}
    if missing:
        # A filter on a field that only the local copy has (SST-2's `full_sentence`, derived when the
        # data was staged) cannot apply to the hub's rows: say so rather than drop every row.
        logger.warning("%s: the hub's %s has no field %s; using its rows unfiltered", spec.name, hub.path,
                       ", ".join(missing))
        spec = dataclasses.replace(spec, filter={k: v for k, v in spec.filter.items() if k not in missing})

    def rows() -> Iterable[tuple[int, dict[str, Any]]]:
        for i, row in enumerate(ds):
            out = {hub.rename.get(k, k): v for k, v in row.items()}
            label = out.get("label")
            if isinstance(label, int):
                if label < 0:  # SNLI marks rows without a gold label with -1
                    continue
                out["label"] = names[label] if names else str(label)
            out.setdefault("id", f"{spec.name}-{out['idx'] if 'idx' in out else i}")
            yield i + 1, out

    examples = parse_rows(spec, rows(), f"{hub.path}:{hub.split}")
    identity = f"{hub.path}/{hub.name}/{hub.split}\n" + "\n".join(ex.id for ex in examples)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return LoadedData(spec, tuple(examples), f"hub:{hub.path}/{hub.name or ''}:{hub.split}", digest)


def subsample(examples: Sequence[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """A seeded sample of at most ``limit`` rows, in file order; the same for every data seed.

    Evaluating every seed on the same queries makes seeds differ only in their demonstrations.
    """
    if limit is None or limit >= len(examples):
        return list(examples)
    rng = random.Random(f"icldistill-eval-sample-{seed}")
    keep = sorted(rng.sample(range(len(examples)), limit))
    return [examples[i] for i in keep]
