"""Unlabelled rows for ``icld predict``: a ``.jsonl``, ``.csv`` or ``.parquet`` file with the task's input columns.

Every row needs each input field of the task's family as a non-empty string; an ``id`` column is
used when present (else the row number). Problems name the file, the row and the fix. No torch here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Sequence

from icldistill.errors import DataError
from icldistill.tasks.data import Example, _iter_lines, _read_bytes

UNLABELLED = -1  # the label of a row that has none
FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def _jsonl_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line, validated as the labelled data files are."""
    yield from _iter_lines(_read_bytes(path), str(path))


def _csv_rows(path: Path, fields: Sequence[str]) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [f for f in fields if f not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column {', '.join(repr(m) for m in missing)} (columns: {reader.fieldnames}); "
                            f"the task needs {', '.join(fields)}. Rename the columns or choose the task with --task.")
        for row in reader:
            yield reader.line_num, row  # the header is line 1


def _parquet_rows(path: Path, fields: Sequence[str]) -> Iterable[tuple[int, dict[str, Any]]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except ImportError:
        raise DataError(f"Reading {path} needs pyarrow: pip install pyarrow (or convert the file to .jsonl).") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable Parquet file ({exc}).") from None
    missing = [f for f in fields if f not in frame.columns]
    if missing:
        raise DataError(f"{path}: no column {', '.join(repr(m) for m in missing)} (columns: {list(frame.columns)}); "
                        f"the task needs {', '.join(fields)}.")
    for i, row in enumerate(frame.to_dict(orient="records"), start=1):
        yield i, row


def read_inputs(path: str | Path, fields: Sequence[str], *, strip: bool = False) -> list[Example]:
    """The rows of ``path`` as unlabelled examples (label :data:`UNLABELLED`), in file order.

    Text is used as the file has it, as the training data is (``strip``: the task's ``strip_fields``). A missing
    or empty field, a non-text value or a duplicate id is an error naming the row ("line" for
    JSON Lines and CSV, "row" for Parquet).
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown input format {suffix or '(none)'}; use {', '.join(FORMATS)}.")
    if not path.is_file():
        raise DataError(f"Input file {path} does not exist.")
    rows = (_csv_rows(path, fields) if suffix == ".csv" else _parquet_rows(path, fields) if suffix == ".parquet"
            else _jsonl_rows(path))
    where = "row" if suffix == ".parquet" else "line"
    examples, seen = [], {}
    for number, row in rows:
        texts = {}
        for name in fields:
            value = row.get(name)
            if name not in row or value is None:
                raise DataError(f"{path}, {where} {number}: missing field '{name}'; every row needs "
                                f"{', '.join(fields)} (the task's input fields).")
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}, {where} {number}: field '{name}' must be non-empty text, got {value!r}; "
                                "fill it in or remove the row.")
            texts[name] = value.strip() if strip else value
        row_id = str(row["id"]) if row.get("id") not in (None, "") else str(len(examples))
        if row_id in seen:
            raise DataError(f"{path}, {where} {number}: duplicate id {row_id!r} (first at {where} {seen[row_id]}).")
        seen[row_id] = number
        examples.append(Example(row_id, texts, UNLABELLED))
    if not examples:
        raise DataError(f"{path} holds no rows.")
    return examples
