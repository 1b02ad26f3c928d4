"""Loading rows from local files (JSON Lines, CSV, TSV, Parquet) or the Hugging Face hub, validated row by row.

JSON Lines is read here, line by line, so a message can cite the line; CSV, TSV and Parquet go through
``datasets`` (the field's reader), and every row is then validated alike. Every problem names the file,
the row and what to do: a missing column, an empty text, an unknown label, invalid JSON, a truncated
gzip file, an empty file. A file named ``x.jsonl`` is found whether it is stored plain or gzipped.
Rows are returned as :class:`Example`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import random
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from icldistill.errors import ConfigError, DataError
from icldistill.runtime.paths import DATA_ENV, default_data_dir
from icldistill.tasks.spec import Carve, DataSpec

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
    if spec.local is None:  # a hub-only set
        if source == "local":
            raise DataError(f"'{spec.name}' ({spec.origin}) has only a hub source; use --data-source hub or auto.")
        return _carved(_load_hub(spec), spec)
    directory = resolve_data_dir(data_dir)
    if source == "hub" or (source == "auto" and directory is None and spec.base_dir is None
                           and not Path(spec.local).is_absolute()):
        if spec.hub is None:
            raise DataError(f"'{spec.name}' has no Hugging Face source; give a local --data-dir.")
        return _carved(_load_hub(spec), spec)
    path = local_path(spec, directory)
    stat = path.stat()
    return _carved(_load_local_cached(_SpecKey(spec), str(path.resolve()), stat.st_mtime_ns, stat.st_size), spec)


def local_path(spec: DataSpec, directory: Path | None) -> Path:
    """The file of ``spec``: relative to its task file's directory, or to the data directory (built-in tasks).

    ``x.jsonl`` is also found as ``x.jsonl.gz`` and the other way round.
    """
    assert spec.local is not None
    given = Path(spec.local).expanduser()
    if given.is_absolute():
        base = None
    elif spec.base_dir is not None:
        base = Path(spec.base_dir)
    elif directory is None:
        raise DataError(
            f"No data directory for '{spec.name}': pass --data-dir DIR or set ${DATA_ENV} to a directory "
            f"holding {spec.local}, or use --data-source hub."
        )
    else:
        base = directory
    path = given if base is None else base / given
    for candidate in (path, *_alternatives(path)):
        if candidate.exists():
            return candidate
    where = ("the task file's directory " + str(base)) if spec.base_dir is not None else f"--data-dir / ${DATA_ENV}"
    raise DataError(
        f"Data file {path} for '{spec.name}' does not exist. Check {where} "
        f"(it must contain {spec.local}), or use --data-source hub."
    )


def _alternatives(path: Path) -> list[Path]:
    if path.name.endswith(".jsonl"):
        return [path.with_name(path.name + ".gz")]
    if path.name.endswith(".jsonl.gz"):
        return [path.with_name(path.name[:-3])]
    return []


def carve_indices(n: int, carve: Carve) -> list[int]:
    """Row positions of ``carve.part`` in file order: a seeded partition of ``range(n)`` into eval and train."""
    n_eval = int(round(carve.eval_rows * n)) if isinstance(carve.eval_rows, float) else int(carve.eval_rows)
    if not 0 < n_eval < n:
        raise DataError(f"carve: eval_rows {carve.eval_rows} leaves no rows for one part of the {n} rows; "
                        "choose fewer.")
    order = list(range(n))
    random.Random(f"icldistill-carve-{carve.seed}").shuffle(order)
    chosen = order[:n_eval] if carve.part == "eval" else order[n_eval:]
    return sorted(chosen)


def check_carves(train: DataSpec, eval_sets: Mapping[str, DataSpec], origin: str) -> None:
    """Refuse an evaluation set that can share rows with the train set through a carve of the same file.

    A carve is disjoint only as the two halves of one partition: the train entry ``part: train`` and the
    evaluation entry ``part: eval`` with the same ``eval_rows`` and ``seed``. Another seed or size (or one
    side uncarved) would evaluate on training rows, so the task file is refused, naming both entries.
    """
    for name, spec in eval_sets.items():
        if (spec.local is None or spec.local != train.local or spec.base_dir != train.base_dir
                or dict(spec.filter) != dict(train.filter) or (spec.carve is None and train.carve is None)):
            continue
        t, e = train.carve, spec.carve
        if (t is not None and e is not None and t.part == "train" and e.part == "eval"
                and (t.eval_rows, t.seed) == (e.eval_rows, e.seed)):
            continue
        carve = lambda c: ("no carve" if c is None  # noqa: E731
                           else f"carve {{part: {c.part}, eval_rows: {c.eval_rows}, seed: {c.seed}}}")
        raise ConfigError(
            f"{origin}: evaluation set '{name}' and train both read {spec.local} (train: {carve(t)}; '{name}': "
            f"{carve(e)}), so evaluation rows can be training rows. Give both the same eval_rows and seed, with "
            "part: train for train and part: eval for the evaluation set.")


def _carved(loaded: LoadedData, spec: DataSpec) -> LoadedData:
    """The carve part of the rows (the cache holds the whole file; both parts share it)."""
    if spec.carve is None:
        return loaded
    keep = carve_indices(len(loaded.examples), spec.carve)
    c = spec.carve
    logger.info("%s: carve part %s keeps %d of the file's %d usable rows", spec.name, c.part, len(keep),
                len(loaded.examples))
    return LoadedData(spec, tuple(loaded.examples[i] for i in keep), loaded.source,
                      f"{loaded.fingerprint}/{c.part}-{c.eval_rows}-{c.seed}")


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
    if spec.strip:  # other text from the same bytes: caches keyed by the fingerprint must not mix the two
        fingerprint += "+strip"
    rows = (_iter_table(Path(path)) if path.lower().endswith((".csv", ".tsv", ".parquet"))
            else _iter_lines(_decompress(raw, Path(path)), path))
    examples = parse_rows(spec, rows, path)
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
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                            "fix or remove the line.") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, found {type(row).__name__}; "
                            "write one {...} object per line.")
        yield lineno, row


def read_rows(path: str | Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line or row number, row) of any data file, labelled (the task loader) or not (``icld predict``).

    The one reader: JSON Lines line by line (plain or gzipped), CSV / TSV / Parquet through ``datasets``;
    every message names the file and the line. A UTF-8 byte-order mark (Excel's "CSV UTF-8") is
    dropped, so the first column keeps its name.
    """
    path = Path(path)
    if path.name.lower().endswith((".csv", ".tsv", ".parquet")):
        return _iter_table(path)
    return _iter_lines(_decompress(_read_bytes(path), path), str(path))


def _iter_table(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """Rows of a CSV, TSV or Parquet file through ``datasets``; row numbers count the header as line 1.

    Every CSV cell is read as text (string features from the header, no NA guessing), so a label ``1``
    or a text ``N/A`` reaches validation as written.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"Reading {path.suffix} files needs the 'datasets' package: pip install datasets.") from None
    datasets.disable_progress_bars()
    kind = "parquet" if path.suffix.lower() == ".parquet" else "csv"
    kwargs: dict[str, Any] = {}
    if kind == "csv":
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        header = _csv_header(path, delimiter)
        kwargs = {"delimiter": delimiter, "keep_default_na": False, "na_filter": False, "encoding": "utf-8-sig",
                  "features": datasets.Features({name: datasets.Value("string") for name in header})}
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True, **kwargs)
    except Exception as exc:  # pandas / pyarrow parse errors come in many types; each names the line
        cause = exc.__cause__ or exc
        if "corresponds to no data" in str(cause):
            raise DataError(f"{path} holds no rows (a header alone); add one row per example below it.") from None
        raise DataError(f"{path}: cannot be read as {path.suffix[1:].upper()} ({str(cause).strip()}); "
                        "fix the row it names (quotes, column count) and try again.") from None
    first = 2 if kind == "csv" else 1
    return ((i + first, {k: v for k, v in row.items() if k is not None}) for i, row in enumerate(ds))


def _csv_header(path: Path, delimiter: str) -> list[str]:
    """The header's column names (a byte-order mark dropped); a header alone is an error that says so."""
    import csv

    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, [])
            has_rows = any(row for row in reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason}); re-encode the file as UTF-8.") from None
    except csv.Error as exc:
        raise DataError(f"{path}: cannot be read as CSV ({exc}); fix the quotes of the row it names.") from None
    if not header:
        raise DataError(f"{path} is empty; it must hold a header line and one row per line.")
    if len(set(header)) != len(header) or any(not h.strip() for h in header):
        raise DataError(f"{path}:1: the header must name every column once, got {header}.")
    if not has_rows:
        raise DataError(f"{path} holds no rows (a header alone: {delimiter.join(header)}); add one row per example "
                        "below it.")
    return header


def check_text(value: Any, where: str, lineno: int, name: str) -> str:
    """``value`` as a row's text field: a non-empty string that is valid Unicode, else an error naming the row.

    A JSON escape such as ``"\\ud800"`` decodes to a lone surrogate, which no tokenizer can encode.
    """
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}:{lineno}: field '{name}' must be non-empty text, got {value!r}; "
                        "fill it in or remove the row.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}:{lineno}: field '{name}' holds an invalid character {value[exc.start]!r} at "
                        f"position {exc.start} (a lone surrogate, e.g. a JSON \\ud800 escape); fix or remove "
                        "the row.") from None
    return value


def parse_rows(spec: DataSpec, rows: Iterable[tuple[int, Mapping[str, Any]]], where: str) -> list[Example]:
    """Validate raw rows against ``spec``: required fields, label mapping, filters, unique ids.

    ``rows`` yields (line number, row); ``where`` names the file in messages.
    """
    known = ", ".join(repr(k) for k in spec.label_map)
    examples: list[Example] = []
    seen: dict[str, int] = {}
    n_rows = 0
    needed = (*((spec.id_column,) if spec.id_column and spec.id_required else ()), spec.label_column, *spec.fields)
    task_note = f" (columns named in {spec.origin})" if spec.origin else ""
    for lineno, row in rows:
        n_rows += 1
        if any(_raw_text(row.get(k)) != v for k, v in spec.filter.items()):
            continue
        for name in needed:
            if name not in row:
                raise DataError(f"{where}:{lineno}: missing field '{name}'{task_note}. Every row needs "
                                f"{', '.join(needed)}.")
        label = row[spec.label_column]
        raw = None if label is None or isinstance(label, (dict, list, float)) else _raw_text(label)
        if raw is None or raw not in spec.label_map:
            raise DataError(
                f"{where}:{lineno}: unknown label {label!r} for '{spec.name}'; expected one of {known}. "
                "Fix the row, map the value to a class (or drop it) in the task file, or choose the evaluation "
                "set that matches this file."
            )
        cls = spec.label_map[raw]
        if cls is None:
            continue
        texts = {}
        for name in spec.fields:
            value = check_text(row[name], where, lineno, name)
            texts[name] = value.strip() if spec.strip else value  # as the data has it, unless the task asks
        row_id = str(row[spec.id_column]) if spec.id_column and spec.id_column in row else str(lineno)
        if row_id in seen:
            raise DataError(f"{where}:{lineno}: duplicate id {row_id!r} (first on line {seen[row_id]}); "
                            "ids must be unique.")
        seen[row_id] = lineno
        meta = {k: str(row[k]) for k in spec.meta_fields if k in row}
        examples.append(Example(row_id, texts, cls, meta))
    if n_rows == 0:
        raise DataError(f"{where} is empty; it must hold one JSON object per line (or, for CSV, a header and rows).")
    if not examples:
        raise DataError(f"{where}: none of its {n_rows} rows is usable for '{spec.name}' "
                        f"(filters {dict(spec.filter)}).")
    return examples


def _raw_text(value: Any) -> str:
    """Labels and filter values compare as text: a JSON ``1`` and a task file's ``1`` are the same value."""
    return str(value)


def _load_hub(spec: DataSpec) -> LoadedData:
    """Read the rows from the Hugging Face hub; integer labels become names via the ClassLabel feature."""
    try:
        import datasets  # optional dependency: pip install 'icldistill[hub]'
    except ImportError:
        raise DataError("Loading from the hub needs the 'datasets' package: pip install 'icldistill[hub]'.") from None
    hub = spec.hub
    assert hub is not None
    try:
        extra = {"revision": hub.revision} if hub.revision else {}
        ds = datasets.load_dataset(hub.path, hub.name, split=hub.split, **extra)
    except Exception as exc:  # the hub raises many types (network, missing config); report them all alike
        raise DataError(
            f"Cannot load {hub.path}/{hub.name or ''} split {hub.split} from the hub ({exc}). "
            "Without hub access use --data-source local with --data-dir."
        ) from None
    original = {v: k for k, v in hub.rename.items()}.get(spec.label_column, spec.label_column)
    names = getattr(ds.features.get(original), "names", None)
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
            label = out.get(spec.label_column)
            if isinstance(label, int) and not isinstance(label, bool):
                if label < 0:  # SNLI marks rows without a gold label with -1
                    continue
                out[spec.label_column] = names[label] if names else str(label)
            if spec.id_column:
                out.setdefault(spec.id_column, f"{spec.name}-{out['idx'] if 'idx' in out else i}")
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
