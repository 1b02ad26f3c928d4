"""Unlabelled rows for ``icld predict``: a ``.jsonl``, ``.csv``, ``.tsv`` or ``.parquet`` file with the task's inputs.

Rows are read by the task loader's one reader (:func:`icldistill.tasks.data.read_rows`: BOM-safe CSV, the
same messages), so a file the task accepts is a file ``predict`` accepts. Every row needs each input
field of the task as non-empty text; the task's id column (``id`` by default) is used where present,
else the row's position. Problems name the file, the row and the fix. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from icldistill.errors import DataError
from icldistill.tasks.data import Example, check_text, read_rows

UNLABELLED = -1  # the label of a row that has none
FORMATS = (".jsonl", ".json", ".jsonl.gz", ".csv", ".tsv", ".parquet")
TABLES = (".csv", ".tsv", ".parquet")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((f for f in FORMATS if name.endswith(f)), path.suffix.lower())


def _checked_columns(path: Path, rows: Iterable[tuple[int, dict[str, Any]]],
                     fields: Sequence[str]) -> Iterable[tuple[int, dict[str, Any]]]:
    """A table's columns are the same on every row: a missing input column is one error naming the columns."""
    for number, row in rows:
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataError(f"{path}: no column {', '.join(repr(m) for m in missing)} (columns: {list(row)}); "
                            f"the task needs {', '.join(fields)}. Rename the columns or choose the task with --task.")
        yield number, row
        yield from rows
        return


def read_inputs(path: str | Path, fields: Sequence[str], *, strip: bool = False,
                id_column: str | None = "id") -> list[Example]:
    """The rows of ``path`` as unlabelled examples (label :data:`UNLABELLED`), in file order.

    Text is used as the file has it, as the training data is (``strip``: the task's ``strip_fields``).
    ``id_column`` (the task's) gives each row its id, else an ``id`` column, else the row's position (0, 1, ...).
    A missing or empty field, a non-text value, an invalid character or a duplicate id is an error naming the row
    (``FILE:LINE``; the header of a CSV is line 1, a Parquet file counts rows from 1).
    """
    path = Path(path).expanduser()
    suffix = _suffix(path)
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown input format {suffix or '(none)'}; use {', '.join(FORMATS)}.")
    if not path.is_file():
        raise DataError(f"Input file {path} does not exist.")
    rows = iter(read_rows(path))
    if suffix in TABLES:
        rows = _checked_columns(path, rows, fields)
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for number, row in rows:
        texts = {}
        for name in fields:
            if row.get(name) is None:
                raise DataError(f"{path}:{number}: missing field '{name}'; every row needs "
                                f"{', '.join(fields)} (the task's input fields).")
            value = check_text(row[name], str(path), number, name)
            texts[name] = value.strip() if strip else value
        given = next((row[c] for c in (id_column, "id") if c and row.get(c) not in (None, "")), None)
        row_id = str(given) if given not in (None, "") else str(len(examples))
        if row_id in seen:
            raise DataError(f"{path}:{number}: duplicate id {row_id!r} (first at line {seen[row_id]}); ids must "
                            "be unique.")
        seen[row_id] = number
        examples.append(Example(row_id, texts, UNLABELLED))
    if not examples:
        raise DataError(f"{path} holds no rows.")
    return examples
