"""Reading a task file (YAML) into a :class:`~icldistill.tasks.spec.Task`, with one clear error per mistake.

Every problem names the file and the key (``trec.yaml: patterns.question.label_words: ...``): an
unknown key or column, a raw label value given to two classes, a class with no label word, duplicate
or empty label words, a base task that does not exist, an evaluation set whose classes differ from the
train set's. A variant (``base: mnli``) starts from the base's resolved mapping; ``eval`` and
``patterns`` merge by name (``null`` removes an entry), every other key replaces the base's.
"""

from __future__ import annotations

import copy
import string
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from icldistill.errors import ConfigError, did_you_mean
from icldistill.tasks.data import check_carves
from icldistill.tasks.spec import (
    BUILTIN_DIR,
    DATA_SUFFIXES,
    Carve,
    DataSpec,
    Family,
    HubSource,
    PatternSpec,
    Task,
    task_files,
)

TOP_KEYS = ("name", "base", "description", "inputs", "label_column", "id_column", "classes", "drop",
            "content_free", "patterns", "default_pattern", "train", "eval", "default_eval", "strip_fields")
SOURCE_KEYS = ("path", "hub", "filter", "meta_columns", "carve", "description", "classes", "drop")
HUB_KEYS = ("path", "name", "split", "revision", "rename")
CARVE_KEYS = ("part", "eval_rows", "seed")
_MERGED_BY_NAME = ("eval", "patterns")
_DIR_KEY = "_dir"  # where a source's relative path resolves (None: the data directory), kept through merges


class TaskFileError(ConfigError):
    """A task file is malformed; the message names the file and the key."""


def load_task_file(path: str | Path) -> Task:
    """The resolved task defined by the YAML file at ``path`` (variants resolved, everything checked)."""
    path = Path(path).expanduser().resolve()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        raise TaskFileError(f"Task file {path} does not exist.") from None
    return _load_cached(str(path), stamp)


@lru_cache(maxsize=64)
def _load_cached(path: str, _stamp: int) -> Task:
    resolved = resolve_mapping(Path(path))
    task = build_task(resolved, Path(path))
    check_carves(task.train, task.eval_sets, str(path))  # carves that overlap would evaluate on training rows
    return task


def resolve_mapping(path: Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The task file's mapping with its ``base`` chain merged in (the base first)."""
    if str(path) in seen:
        chain = " -> ".join(Path(p).name for p in (*seen, str(path)))
        raise TaskFileError(f"{path}: base: the variants form a cycle ({chain}).")
    raw = read_task_yaml(path)
    if raw.get("type") == "generation":
        raise TaskFileError(f"{path} is a generation task (type: generation): run it with icld generate or "
                            "icld gen-distill, not with the classification commands.")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise TaskFileError(f"{path}: unknown key "
                            f"'{unknown[0]}'.{did_you_mean(unknown[0], TOP_KEYS, or_list='Valid keys')}")
    own_dir = None if path.parent == BUILTIN_DIR.resolve() else str(path.parent)
    raw = _annotate_dirs(raw, own_dir, path)
    raw = {"name": path.stem, **raw}  # first, so that `icld tasks show` prints it first
    base_name = raw.pop("base", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str) or not base_name.strip():
        raise TaskFileError(f"{path}: base: must be the name or file of a task, got {base_name!r}.")
    base_path = _find_base(base_name, path)
    base = resolve_mapping(base_path, (*seen, str(path)))
    merged = dict(base)
    for key, value in raw.items():
        if key in _MERGED_BY_NAME and isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            entries = dict(base[key])
            for name, entry in value.items():
                if entry is None:
                    entries.pop(name, None)
                else:
                    entries[name] = entry
            merged[key] = entries
        else:
            merged[key] = value
    return merged


def _find_base(name: str, path: Path) -> Path:
    if name.endswith((".yaml", ".yml")):
        candidate = (path.parent / name).expanduser()
        if candidate.is_file():
            return candidate.resolve()
    files = task_files()
    if name in files:
        return files[name].resolve()
    raise TaskFileError(
        f"{path}: base: task '{name}' does not exist.{did_you_mean(name, files)} Known tasks: {', '.join(files)} "
        "(or give a task file path relative to this file)."
    )


def read_task_yaml(path: Path) -> dict[str, Any]:
    """The mapping a task file holds, read and parsed once per version of the file in a process.

    ``icld tasks`` asks each file whether it is a generation task and then loads it, and every variant
    loads its base again: all of them get this one parse (a copy: callers may change what they get)."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise TaskFileError(f"Task file {path} cannot be read: {exc}.") from None
    return copy.deepcopy(_parse_task_yaml(path.resolve(), stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=256)
def _parse_task_yaml(path: Path, _mtime_ns: int, _size: int) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFileError(f"Task file {path} cannot be read: {exc}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise TaskFileError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}).") from None
    if not isinstance(data, dict):
        raise TaskFileError(f"{path}: a task file holds a mapping of keys (inputs, classes, patterns, train, ...), "
                            f"not a {type(data).__name__}.")
    return data


def _annotate_dirs(raw: dict[str, Any], own_dir: str | None, path: Path) -> dict[str, Any]:
    """Tag each data source with the directory its relative path resolves against and the key it came from."""
    raw = dict(raw)
    if isinstance(raw.get("train"), Mapping):
        raw["train"] = {**raw["train"], _DIR_KEY: own_dir, "_origin": f"{path}: train"}
    if isinstance(raw.get("eval"), Mapping):
        raw["eval"] = {name: ({**entry, _DIR_KEY: own_dir, "_origin": f"{path}: eval.{name}"}
                              if isinstance(entry, Mapping) else entry)
                       for name, entry in raw["eval"].items()}
    return raw


def public_mapping(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved definition without the bookkeeping keys (what ``icld tasks show`` prints)."""
    if isinstance(resolved, Mapping):
        return {k: public_mapping(v) for k, v in resolved.items() if not str(k).startswith("_")}
    if isinstance(resolved, list):
        return [public_mapping(v) for v in resolved]
    return resolved


# ---------------------------------------------------------------------------------------------- building


def build_task(d: Mapping[str, Any], path: Path) -> Task:
    """Check every key of a resolved mapping and build the task."""
    where = str(path)
    name = _text(d.get("name"), where, "name")
    inputs = _text_list(d.get("inputs"), where, "inputs")
    if not inputs:
        raise TaskFileError(f"{where}: inputs: list the input columns, e.g. inputs: [text].")
    label_column = _text(d.get("label_column", "label"), where, "label_column")
    # Without id_column, a row's 'id' is its id where it has one, else its row number.
    id_column = d.get("id_column", "id")
    if id_column is not None:
        id_column = _text(id_column, where, "id_column")
    classes, label_map = _classes(d.get("classes"), d.get("drop"), where, "classes")
    patterns = _patterns(d.get("patterns"), inputs, classes, where)
    default_pattern = d.get("default_pattern", next(iter(patterns)))
    if default_pattern not in patterns:
        raise TaskFileError(f"{where}: default_pattern: '{default_pattern}' is not one of the patterns "
                            f"({', '.join(patterns)}).")
    content_free = d.get("content_free", {c: "N/A" for c in inputs})
    if not isinstance(content_free, Mapping) or set(content_free) != set(inputs):
        raise TaskFileError(f"{where}: content_free: give one text per input column ({', '.join(inputs)}), "
                            f"e.g. {{{', '.join(f'{c}: N/A' for c in inputs)}}}.")
    family = Family(name, tuple(inputs), tuple(classes), MappingProxyType(patterns),
                    MappingProxyType({k: str(v) for k, v in content_free.items()}))
    strip = d.get("strip_fields", False)
    if not isinstance(strip, bool):
        raise TaskFileError(f"{where}: strip_fields: true or false (strip outer whitespace from the input fields), "
                            f"got {strip!r}.")
    common = {"fields": tuple(inputs), "label_column": label_column, "id_column": id_column,
              "id_required": "id_column" in d, "strip": strip}
    if not isinstance(d.get("train"), Mapping):
        raise TaskFileError(f"{where}: train: give the training data as a mapping with a path (or hub).")
    train = _source(d["train"], f"{name}-train", name, classes, label_map, common, "train")
    evals_raw = d.get("eval") or {}
    if not isinstance(evals_raw, Mapping) or not evals_raw:
        raise TaskFileError(f"{where}: eval: give at least one named evaluation set, e.g. eval: "
                            f"{{test: {{path: test.csv}}}}.")
    eval_sets = {}
    for set_name, entry in evals_raw.items():
        if not isinstance(entry, Mapping):
            raise TaskFileError(f"{where}: eval.{set_name}: must be a mapping with a path (or hub), got {entry!r}.")
        eval_sets[str(set_name)] = _source(entry, str(set_name), name, classes, label_map, common, f"eval.{set_name}")
    default_eval = _text_list(d.get("default_eval", list(eval_sets)), where, "default_eval")
    for set_name in default_eval:
        if set_name not in eval_sets:
            raise TaskFileError(f"{where}: default_eval: '{set_name}' is not an evaluation set "
                                f"({', '.join(eval_sets)}).")
    return Task(name, name, train, tuple(default_eval), default_pattern, str(d.get("description", "")), family,
                MappingProxyType(eval_sets), where, MappingProxyType(public_mapping(d)))


def _source(entry: Mapping[str, Any], name: str, task: str, classes: list[str], task_map: dict[str, int | None],
            common: dict[str, Any], key: str) -> DataSpec:
    origin = entry.get("_origin", key)
    where = origin.rsplit(": ", 1)[0]
    unknown = [k for k in entry if not str(k).startswith("_") and k not in SOURCE_KEYS]
    if unknown:
        raise TaskFileError(f"{origin}: unknown key "
                            f"'{unknown[0]}'.{did_you_mean(unknown[0], SOURCE_KEYS, or_list='Valid keys')}")
    local = entry.get("path")
    hub = _hub(entry.get("hub"), origin)
    if local is None and hub is None:
        raise TaskFileError(f"{origin}: give a data file (path: rows.csv) or a hub dataset (hub: "
                            f"{{path: ..., split: ...}}).")
    if local is not None and not str(local).endswith(DATA_SUFFIXES):
        raise TaskFileError(f"{origin}: path: '{local}' is not a {', '.join(DATA_SUFFIXES)} file.")
    label_map = task_map
    if "classes" in entry or "drop" in entry:
        own, label_map = _classes(entry.get("classes", _names_only(classes, task_map)), entry.get("drop"),
                                  where, f"{key}.classes")
        if own != classes:
            raise TaskFileError(f"{origin}: classes: this set's classes ({', '.join(own)}) differ from the train set's "
                                f"({', '.join(classes)}); an evaluation set must have the same classes in the same "
                                "order.")
    filters = entry.get("filter") or {}
    if not isinstance(filters, Mapping):
        raise TaskFileError(f"{origin}: filter: must map a column to the value rows must have, e.g. "
                            f"{{heuristic: lexical_overlap}}.")
    meta = _text_list(entry.get("meta_columns", []), where, f"{key}.meta_columns")
    return DataSpec(name, task, None if local is None else str(local), hub, MappingProxyType(dict(label_map)),
                    MappingProxyType({str(k): str(v) for k, v in filters.items()}), tuple(meta),
                    str(entry.get("description", "")), base_dir=entry.get(_DIR_KEY),
                    carve=_carve(entry.get("carve"), origin), origin=origin, **common)




def _names_only(classes: list[str], task_map: dict[str, int | None]) -> dict[str, list[str]]:
    """The task's class -> raw values mapping, so a set that overrides only ``drop`` keeps the classes."""
    out: dict[str, list[str]] = {c: [] for c in classes}
    for raw, index in task_map.items():
        if index is not None:
            out[classes[index]].append(raw)
    return out


def _classes(value: Any, drop: Any, where: str, key: str) -> tuple[list[str], dict[str, int | None]]:
    """Class names in order and the raw label -> class index map (``None`` drops the row)."""
    if isinstance(value, list):
        value = {str(c): [c] for c in value}
    if not isinstance(value, Mapping) or len(value) < 2:
        raise TaskFileError(f"{where}: {key}: list at least two classes, each with its raw label values, e.g. "
                            "classes: {positive: [pos, 1], negative: [neg, 0]}, or classes: [World, Sports].")
    names = [str(c) for c in value]
    label_map: dict[str, int | None] = {}
    for index, (name, raws) in enumerate(value.items()):
        raws = raws if isinstance(raws, list) else [raws]
        if not raws:
            raise TaskFileError(f"{where}: {key}.{name}: give the raw label values of this class, e.g. [{name}].")
        for raw in raws:
            raw = _raw(raw)
            if raw in label_map:
                raise TaskFileError(f"{where}: {key}.{name}: label value '{raw}' is already given to class "
                                    f"'{names[label_map[raw]]}'; each raw value maps to one class.")
            label_map[raw] = index
    for raw in (drop if isinstance(drop, list) else [] if drop is None else [drop]):
        raw = _raw(raw)
        if raw in label_map:
            raise TaskFileError(f"{where}: drop: label value '{raw}' is both dropped and a value of class "
                                f"'{names[label_map[raw]]}'.")
        label_map[raw] = None
    return names, label_map


def _raw(value: Any) -> str:
    """Raw label values compare as text, as the rows' labels do: YAML ``1`` and a CSV's ``1`` are the same value."""
    return str(value)


def _patterns(value: Any, inputs: list[str], classes: list[str], where: str) -> dict[str, PatternSpec]:
    if not isinstance(value, Mapping) or not value:
        raise TaskFileError(f"{where}: patterns: give at least one pattern with a template and label words.")
    patterns = {}
    for name, spec in value.items():
        key = f"patterns.{name}"
        if not isinstance(spec, Mapping) or "template" not in spec:
            raise TaskFileError(f"{where}: {key}: a pattern needs a template and label_words.")
        extra = [k for k in spec if k not in ("template", "label_words")]
        if extra:
            raise TaskFileError(f"{where}: {key}: unknown key '{extra[0]}' (a pattern has template and label_words).")
        template = str(spec["template"])
        check_template(template, inputs, f"{where}: {key}.template")
        words = label_words_of(spec.get("label_words"), classes, f"{where}: {key}.label_words")
        patterns[str(name)] = PatternSpec(template, words)
    return patterns


def check_template(template: str, inputs: list[str] | tuple[str, ...], where: str) -> None:
    """Every placeholder is an input column, every input column is used, no conversions or format specs."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TaskFileError(f"{where}: template {template!r} is malformed ({exc}); write literal braces as "
                            f"'{{{{' and '}}}}'.") from None
    used = {field for _, field, _, _ in parsed if field is not None}
    odd = [f for _, f, spec, conv in parsed if f is not None and (spec or conv)]
    if odd:
        raise TaskFileError(f"{where}: placeholder {{{odd[0]}}} takes no conversion or format spec; write plain "
                            f"{{column}}.")
    unknown = sorted(used - set(inputs))
    if unknown:
        raise TaskFileError(f"{where}: unknown column {{{unknown[0]}}} in the template; the input columns are "
                            f"{', '.join(inputs)} (add it to inputs, or write literal braces as '{{{{' and '}}}}').")
    missing = [c for c in inputs if c not in used]
    if missing:
        raise TaskFileError(f"{where}: the template does not use input column {{{missing[0]}}}.")


def label_words_of(value: Any, classes: list[str] | tuple[str, ...], where: str) -> tuple[str, ...]:
    """Label words in class order from a list (class order) or a class -> word mapping; distinct and non-empty."""
    if isinstance(value, Mapping):
        unknown = [str(c) for c in value if str(c) not in classes]
        if unknown:
            raise TaskFileError(f"{where}: '{unknown[0]}' is not a class ({', '.join(classes)}).")
        missing = [c for c in classes if c not in {str(k) for k in value}]
        if missing:
            raise TaskFileError(f"{where}: class '{missing[0]}' has no label word; give one word per class.")
        words = [value[c] if c in value else value[next(k for k in value if str(k) == c)] for c in classes]
    elif isinstance(value, list):
        if len(value) != len(classes):
            raise TaskFileError(f"{where}: {len(value)} label words for {len(classes)} classes ({', '.join(classes)}); "
                                "give one per class, in class order, or a class: word mapping.")
        words = value
    else:
        raise TaskFileError(f"{where}: give one label word per class, e.g. "
                            f"{{{', '.join(f'{c}: {c}' for c in classes)}}}.")
    words = [w if isinstance(w, str) else str(w) for w in words]
    for c, w in zip(classes, words):
        if not w.strip():
            raise TaskFileError(f"{where}: the label word of class '{c}' is empty.")
    seen: dict[str, str] = {}
    for c, w in zip(classes, words):
        if w in seen:
            raise TaskFileError(f"{where}: classes '{seen[w]}' and '{c}' have the same label word {w!r}; label words "
                                "must differ.")
        seen[w] = c
    return tuple(words)


def _hub(value: Any, origin: str) -> HubSource | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, Mapping) or "path" not in value:
        raise TaskFileError(f"{origin}: hub: give at least the dataset id, e.g. hub: "
                            f"{{path: fancyzhx/ag_news, split: test}}.")
    unknown = [k for k in value if k not in HUB_KEYS]
    if unknown:
        raise TaskFileError(f"{origin}: hub: unknown key "
                            f"'{unknown[0]}'.{did_you_mean(unknown[0], HUB_KEYS, or_list='Valid keys')}")
    rename = value.get("rename") or {}
    return HubSource(str(value["path"]), None if value.get("name") is None else str(value["name"]),
                     str(value.get("split", "train")), MappingProxyType({str(k): str(v) for k, v in rename.items()}),
                     None if value.get("revision") is None else str(value["revision"]))


def _carve(value: Any, origin: str) -> Carve | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) - set(CARVE_KEYS) or value.get("part") not in ("train", "eval"):
        raise TaskFileError(f"{origin}: carve: give part (train or eval), eval_rows (a count or a fraction) and seed, "
                            "e.g. carve: {part: eval, eval_rows: 1000, seed: 0}.")
    rows = value.get("eval_rows")
    is_number = isinstance(rows, (int, float)) and not isinstance(rows, bool)
    if not is_number or rows <= 0 or (isinstance(rows, float) and rows >= 1):
        raise TaskFileError(f"{origin}: carve.eval_rows: a positive number of rows or a fraction in (0, 1), got "
                            f"{rows!r}.")
    seed = value.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TaskFileError(f"{origin}: carve.seed: an integer, got {seed!r}.")
    return Carve(str(value["part"]), rows, seed)


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TaskFileError(f"{where}: {key}: must be a non-empty text, got {value!r}.")
    return value


def _text_list(value: Any, where: str, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise TaskFileError(f"{where}: {key}: must be a list of names, got {value!r}.")
    return list(value)
