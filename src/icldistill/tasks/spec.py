"""What a task is: the frozen dataclasses a task file resolves to, and where task files are found.

Kept apart from the reader (``taskfile``) and the lookups (``registry``) so that both import it and
neither imports the other. No torch here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TASKS_ENV = "ICLDISTILL_TASKS"
BUILTIN_DIR = Path(__file__).parent / "builtin"
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class HubSource:
    """Where the rows live on the Hugging Face hub (used with ``--data-source hub`` or a hub-only set)."""

    path: str
    name: str | None
    split: str
    rename: Mapping[str, str] = field(default_factory=dict)  # hub column -> our column name
    revision: str | None = None


@dataclass(frozen=True)
class Carve:
    """A seeded, disjoint train / evaluation split carved out of one file (AG News has only a test file).

    The same (seed, eval_rows) on the same rows always gives the same partition, so a train spec with
    ``part: train`` and an evaluation spec with ``part: eval`` never share a row.
    """

    part: str  # "train" or "eval"
    eval_rows: int | float  # a number of rows, or a fraction in (0, 1)
    seed: int = 0


@dataclass(frozen=True)
class DataSpec:
    """One set of rows and how to read them.

    ``label_map`` maps the raw label (as a string) to a class index; ``None`` drops the row (binarised
    MNLI drops ``neutral``). Any label not in the map is an error, never silently dropped.
    ``local`` is relative to ``base_dir`` (the task file's directory), or to the data directory when
    ``base_dir`` is None (built-in tasks).
    """

    name: str
    family: str  # the task whose columns and classes these rows follow
    local: str | None  # path of the file; None for a hub-only set
    hub: HubSource | None
    label_map: Mapping[str, int | None]
    filter: Mapping[str, str] = field(default_factory=dict)  # keep rows whose column equals the value
    meta_fields: tuple[str, ...] = ()  # carried to predictions and breakdowns (HANS heuristic, subcase)
    description: str = ""
    fields: tuple[str, ...] = ()  # input columns
    label_column: str = "label"
    id_column: str | None = "id"  # None: the row number is the id
    id_required: bool = True  # False: the id column is used where a row has it, else the row number
    base_dir: str | None = None
    carve: Carve | None = None
    origin: str = ""  # the task file and key that defined this set, for messages
    # Text is used as the data has it (the lineage keeps trailing spaces, and lm-eval sees them); a task
    # file's `strip_fields: true` strips outer whitespace from every input field.
    strip: bool = False


@dataclass(frozen=True)
class PatternSpec:
    """A prompt template and its label words (one per class, in class order)."""

    template: str
    label_words: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """What rows of one task look like: input columns, class names, prompt patterns."""

    name: str
    fields: tuple[str, ...]
    classes: tuple[str, ...]
    patterns: Mapping[str, PatternSpec]
    content_free: Mapping[str, str]  # column values of the content-free input for contextual calibration


@dataclass(frozen=True)
class Task:
    """A training task: its columns, classes and patterns, its train data, its evaluation sets."""

    name: str
    family: str
    train: DataSpec
    default_eval: tuple[str, ...]
    default_pattern: str
    description: str = ""
    columns: Family | None = None  # the resolved family (always set by the task file reader)
    eval_sets: Mapping[str, DataSpec] = field(default_factory=dict)
    path: str = ""  # the task file
    definition: Mapping[str, object] = field(default_factory=dict)  # the resolved YAML mapping
    ref: str = ""  # what finds this task again with get_task: its name, or its file's path

    def __post_init__(self) -> None:
        if not self.ref:
            object.__setattr__(self, "ref", self.name)


def task_dirs() -> list[Path]:
    """The built-in directory, then every directory named in ``$ICLDISTILL_TASKS``."""
    extra = [Path(p).expanduser() for p in os.environ.get(TASKS_ENV, "").split(os.pathsep) if p.strip()]
    return [BUILTIN_DIR, *extra]


def task_files() -> dict[str, Path]:
    """Task name -> file over all task directories; a later directory cannot shadow a built-in name."""
    found: dict[str, Path] = {}
    for directory in task_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
            found.setdefault(path.stem, path)
    return found


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
