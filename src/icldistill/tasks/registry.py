"""The task registry: task definitions as data, found by name or path.

A task is a YAML file (``tasks/taskfile.py`` reads it): its train data, its named evaluation sets,
input columns, classes, patterns and label words, in the manner of lm-evaluation-harness task YAMLs.
The built-in tasks are such files shipped in ``tasks/builtin/``; ``$ICLDISTILL_TASKS`` names more
directories (``os.pathsep``-separated). A variant is ``base: other`` plus the keys that differ.
No torch here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from icldistill.errors import ConfigError, did_you_mean
from icldistill.tasks.spec import (
    BUILTIN_DIR,
    DATA_SUFFIXES,
    TASKS_ENV,
    Carve,
    DataSpec,
    Family,
    HubSource,
    PatternSpec,
    Task,
    builtin_names,
    task_dirs,
    task_files,
)
from icldistill.tasks.taskfile import load_task_file

# The dataclasses and file discovery live in tasks.spec; they are re-exported here, where callers look.
__all__ = [
    "BUILTIN_DIR", "DATA_SUFFIXES", "TASKS_ENV", "Carve", "DataSpec", "Family", "HubSource", "PatternSpec", "Task",
    "builtin_names", "task_dirs", "task_files", "get_task", "get_eval_set", "family_of", "TASKS", "EVAL_SETS",
]


def get_task(name: str) -> Task:
    """A task by name (built-in or in ``$ICLDISTILL_TASKS``) or by the path of its YAML file."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"Task file {path} does not exist; give a task name ({', '.join(task_files())}) "
                              "or a YAML file.")
        return replace(load_task_file(path), ref=str(path.resolve()))
    files = task_files()
    if name not in files:
        raise ConfigError(
            f"Unknown task '{name}'.{did_you_mean(name, files)} Known tasks: {', '.join(files)} (add directories "
            f"with ${TASKS_ENV}, or pass a task file: --task my_task.yaml)."
        )
    return load_task_file(files[name])


def get_eval_set(name: str, task: Task | None = None) -> DataSpec:
    """An evaluation set of ``task`` by name, or a bare data file that follows the task's columns.

    Without a task, the built-in sets are searched by name.
    """
    if task is None:
        if name not in EVAL_SETS:
            raise ConfigError(f"Unknown evaluation set '{name}'. Known sets: {', '.join(EVAL_SETS)}.")
        return EVAL_SETS[name]
    if name in task.eval_sets:
        return task.eval_sets[name]
    if name.endswith(DATA_SUFFIXES):
        path = Path(name).expanduser()
        stem = path.name.split(".")[0]
        return replace(task.train, name=stem, local=str(path.resolve()), hub=None, base_dir=None, carve=None,
                       filter={}, description=f"{path} (read with the columns of task '{task.name}')",
                       origin=f"--eval {name}")
    raise ConfigError(
        f"Unknown evaluation set '{name}' for task '{task.name}'. Its sets are: {', '.join(task.eval_sets)}; "
        f"or give a data file ({', '.join(DATA_SUFFIXES)}) with the task's columns."
    )


def family_of(task: Task) -> Family:
    """The columns, classes and patterns of ``task``."""
    assert task.columns is not None
    return task.columns


class _LazyMapping(Mapping):
    """A read-only mapping computed on first use (reading the task files at import would be a side effect)."""

    def __init__(self, build) -> None:
        self._build = build
        self._cache: dict | None = None

    def _data(self) -> dict:
        if self._cache is None:
            self._cache = self._build()
        return self._cache

    def __getitem__(self, key):
        return self._data()[key]

    def __iter__(self) -> Iterator:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


def _builtin_tasks() -> dict[str, Task]:
    return {name: get_task(name) for name in builtin_names()}


def _builtin_eval_sets() -> dict[str, DataSpec]:
    sets: dict[str, DataSpec] = {}
    for task in TASKS.values():
        for name, spec in task.eval_sets.items():
            sets.setdefault(name, spec)
    return sets


TASKS: Mapping[str, Task] = _LazyMapping(_builtin_tasks)  # the built-in tasks by name
# every built-in task's sets, first definition wins
EVAL_SETS: Mapping[str, DataSpec] = _LazyMapping(_builtin_eval_sets)
