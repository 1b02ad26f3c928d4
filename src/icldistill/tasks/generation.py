"""Generation tasks: free-form answers to a template, after a context of demonstrations and/or an instruction.

A task file with ``type: generation`` declares its input columns and template, an optional reference-answer
column (label-free distillation needs none), the teacher's context (``shots`` demonstrations drawn from
train and rendered with their answers, and/or a fixed ``instruction`` text or ``instruction_file``: the
"system-prompt distillation" of prompt baking), stop sequences, ``max_new_tokens``, whether an instruct
model's chat template renders the prompt, and how the final answer is extracted for exact match.
No torch here: a tokenizer is used only through ``apply_chat_template``.
"""

from __future__ import annotations

import os
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icldistill.errors import ConfigError, DataError, did_you_mean
from icldistill.tasks import data as data_mod
from icldistill.tasks.spec import BUILTIN_DIR, Carve, task_dirs, task_files
from icldistill.tasks.taskfile import read_task_yaml

GENERATION_KEYS = ("type", "name", "description", "inputs", "template", "answer_column", "answer_template",
                   "instruction", "instruction_file", "shots", "stop", "max_new_tokens", "chat_template",
                   "extractor", "answer_pattern", "id_column", "train", "eval", "default_eval")
SOURCE_KEYS = ("path", "carve")
GENERATION_DIR = BUILTIN_DIR / "generation"
"""The built-in generation tasks (apart from the classification tasks, whose loader reads BUILTIN_DIR)."""
CHAT_TEMPLATE = ("auto", "yes", "no")
"""``auto``: the tokenizer's chat template when it has one (instruct models), else the plain rendering."""


@dataclass(frozen=True)
class GenerationRow:
    """One query: its id, its input fields, and its reference answer when the data has one."""

    id: str
    fields: Mapping[str, str]
    reference: str | None = None


@dataclass(frozen=True)
class GenerationSource:
    """Where a split's rows live: a file (relative to ``base_dir``, or to the data directory when None) and an
    optional seeded carve of it (a file that is split into train and evaluation rows, as in AG News)."""

    path: str
    base_dir: str | None = None
    carve: Carve | None = None


@dataclass(frozen=True)
class GenerationTask:
    """A generation task file, resolved: what the student answers, and what context the teacher sees."""

    name: str
    inputs: tuple[str, ...]
    template: str
    train: GenerationSource | None = None
    eval: Mapping[str, GenerationSource] = field(default_factory=dict)
    answer_column: str | None = None
    answer_template: str = " {answer}"
    instruction: str = ""
    shots: int = 0
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256
    chat_template: str = "auto"
    extractor: str = "gsm8k"
    answer_pattern: str | None = None
    id_column: str | None = "id"
    description: str = ""

    def query_text(self, row: GenerationRow) -> str:
        """The row's rendered input (no answer): what the student sees, and what ends the teacher's prompt."""
        return self.template.format(**row.fields)

    def demonstration_text(self, row: GenerationRow) -> str:
        if row.reference is None:
            raise ConfigError(f"{self.name}: demonstration {row.id} has no answer ({self.answer_column!r} is empty).")
        return self.query_text(row) + self.answer_template.format(answer=row.reference)


def _fields_of(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _need(raw: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or (isinstance(value, (str, list)) and not value):
        raise ConfigError(f"{where}: {key}: give a non-empty {kind.__name__} (got {value!r}).")
    return value


def parse_generation_task(raw: Mapping[str, Any], path: Path) -> GenerationTask:
    """A ``type: generation`` task file's mapping, checked key by key; errors name the file and the key."""
    where = str(path)
    unknown = [k for k in raw if k not in GENERATION_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' for a generation task "
                          f"(keys: {', '.join(GENERATION_KEYS)}).")
    inputs = tuple(_need(raw, "inputs", list, where))
    template = _need(raw, "template", str, where)
    missing = [f for f in _fields_of(template) if f not in inputs]
    if missing:
        raise ConfigError(f"{where}: template: {{{missing[0]}}} is not among the inputs ({', '.join(inputs)}).")
    instruction = str(raw.get("instruction") or "")
    if raw.get("instruction_file"):
        file = (path.parent / str(raw["instruction_file"])).expanduser()
        try:
            instruction = file.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"{where}: instruction_file: cannot read {file}: {err.strerror}.") from None
    chat = str(raw.get("chat_template", "auto")).lower()
    chat = {"true": "yes", "false": "no"}.get(chat, chat)
    if chat not in CHAT_TEMPLATE:
        raise ConfigError(f"{where}: chat_template: use one of {', '.join(CHAT_TEMPLATE)} (got {chat!r}).")
    shots, max_new = int(raw.get("shots", 0)), int(raw.get("max_new_tokens", 256))
    if shots < 0 or max_new < 1:
        raise ConfigError(f"{where}: shots must be >= 0 and max_new_tokens >= 1 (got {shots}, {max_new}).")
    if shots and not raw.get("answer_column"):
        raise ConfigError(f"{where}: shots: demonstrations need answers; set answer_column.")
    stop = raw.get("stop") or []
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    eval_sets = raw.get("eval") or {}
    if not isinstance(eval_sets, Mapping) or not eval_sets:
        raise ConfigError(f"{where}: eval: give a mapping of set names to files (at least one).")
    base = None if path.parent.resolve() == GENERATION_DIR.resolve() else str(path.parent)
    train = _source(raw["train"], base, f"{where}: train") if raw.get("train") else None
    return GenerationTask(
        name=str(raw.get("name") or path.stem), inputs=inputs, template=template, train=train,
        eval={str(k): _source(v, base, f"{where}: eval.{k}") for k, v in eval_sets.items()},
        answer_column=raw.get("answer_column"),
        answer_template=str(raw.get("answer_template", " {answer}")), instruction=instruction, shots=shots,
        stop=stop, max_new_tokens=max_new, chat_template=chat, extractor=str(raw.get("extractor", "gsm8k")),
        answer_pattern=raw.get("answer_pattern"), id_column=raw.get("id_column", "id"),
        description=str(raw.get("description", "")))


def _source(value: Any, base_dir: str | None, where: str) -> GenerationSource:
    """A ``train`` / ``eval`` entry: a path, or ``{path, carve: {part, eval_rows, seed}}``."""
    if isinstance(value, str) and value:
        return GenerationSource(value, base_dir)
    if not isinstance(value, Mapping) or not isinstance(value.get("path"), str):
        raise ConfigError(f"{where}: give a file path, or a mapping with path (and carve).")
    unknown = [k for k in value if k not in SOURCE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (keys: {', '.join(SOURCE_KEYS)}).")
    carve = None
    if value.get("carve") is not None:
        c = value["carve"]
        if not isinstance(c, Mapping) or c.get("part") not in ("train", "eval") or "eval_rows" not in c:
            raise ConfigError(f"{where}: carve: give part (train or eval) and eval_rows (and seed).")
        carve = Carve(str(c["part"]), c["eval_rows"], int(c.get("seed", 0)))
    return GenerationSource(value["path"], base_dir, carve)


def generation_task_files() -> dict[str, Path]:
    """Generation task name -> file: the built-in ones, then ``type: generation`` files in ``$ICLDISTILL_TASKS``."""
    found = {p.stem: p for p in sorted(GENERATION_DIR.glob("*.yaml"))}
    for directory in task_dirs()[1:]:
        for candidate in sorted(directory.glob("*.y*ml")) if directory.is_dir() else []:
            if candidate.stem not in found and is_generation_file(candidate):
                found[candidate.stem] = candidate
    return found


def is_generation_file(path: Path) -> bool:
    """Whether a YAML task file declares ``type: generation`` (unreadable files are not: their loader says why)."""
    try:
        raw = read_task_yaml(path)  # parsed once: loading the task afterwards reads no file again
    except ConfigError:
        return False
    return raw.get("type") == "generation"


def get_generation_task(name: str) -> GenerationTask:
    """A generation task by name (built-in or in ``$ICLDISTILL_TASKS``) or by the path of its YAML file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"Task file {path} does not exist.")
    else:
        files = generation_task_files()
        if name not in files and name in task_files():
            raise ConfigError(f"'{name}' is a classification task: run it with icl, pbft or distill. Generation "
                              f"tasks: {', '.join(files) or 'none'}.")
        if name not in files:
            raise ConfigError(f"Unknown generation task '{name}'.{did_you_mean(name, files)} Known generation tasks: "
                              f"{', '.join(files) or 'none'} (or pass a task file with type: generation).")
        path = files[name]
    raw = read_task_yaml(path)  # one reader of task files, with its messages (unreadable, not YAML, not a mapping)
    if raw.get("type") != "generation":
        raise ConfigError(f"{path}: not a generation task (it needs type: generation); classification tasks run "
                          "with icl / pbft / distill.")
    return parse_generation_task(raw, path)


def load_rows(task: GenerationTask, source: GenerationSource, data_dir: str | Path | None = None
              ) -> list[GenerationRow]:
    """The rows of one split, read by the one reader (``tasks.data.read_rows``) and carved when asked."""
    given = Path(_expand(source.path, task)).expanduser()
    if source.base_dir is not None and not given.is_absolute():
        path = Path(source.base_dir) / given
    elif given.is_absolute():
        path = given
    else:
        directory = data_mod.resolve_data_dir(data_dir)
        if directory is None:
            raise DataError(f"{task.name}: no data directory for {source.path}: pass --data-dir or set "
                            "$ICLDISTILL_DATA.")
        path = directory / given
    if not path.exists():
        raise DataError(f"{task.name}: data file {path} does not exist.")
    records = [row for _, row in data_mod.read_rows(path)]
    if source.carve is not None:
        records = [records[i] for i in data_mod.carve_indices(len(records), source.carve)]
    return rows_from_records(task, records, str(path))


def _expand(path: str, task: GenerationTask) -> str:
    """``${ICLDISTILL_DATA}/x.jsonl`` style paths: environment variables expanded; an unset one is an error."""
    expanded = os.path.expandvars(path)
    if "$" in expanded:
        raise DataError(f"{task.name}: {path}: set the environment variable it names (e.g. ICLDISTILL_DATA) or "
                        "give the path without it.")
    return expanded


def rows_from_records(task: GenerationTask, records: Sequence[Mapping[str, Any]], where: str) -> list[GenerationRow]:
    """Rows of a data file (already parsed into mappings) as the task reads them; a missing column names its row."""
    rows = []
    for number, record in enumerate(records, start=1):
        absent = [c for c in task.inputs if record.get(c) in (None, "")]
        if absent:
            raise ConfigError(f"{where}: row {number}: column {absent[0]!r} is missing or empty.")
        row_id = str(record.get(task.id_column, number)) if task.id_column else str(number)
        reference = record.get(task.answer_column) if task.answer_column else None
        rows.append(GenerationRow(row_id, {c: str(record[c]) for c in task.inputs},
                                  None if reference in (None, "") else str(reference)))
    return rows


def draw_demonstrations(task: GenerationTask, train: Sequence[GenerationRow], seed: int,
                        exclude: frozenset[str] = frozenset()) -> list[GenerationRow]:
    """The seed's ``shots`` demonstrations: rows with an answer, none whose query is an evaluation query."""
    pool = [r for r in train if r.reference is not None and task.query_text(r) not in exclude]
    if len(pool) < task.shots:
        raise ConfigError(f"{task.name}: {task.shots} demonstrations wanted, {len(pool)} usable training rows.")
    return random.Random(f"icldistill-generation-{seed}").sample(pool, task.shots)


def uses_chat_template(task: GenerationTask, tokenizer: Any) -> bool:
    """Whether prompts go through the tokenizer's chat template (``auto``: when the tokenizer has one)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if task.chat_template == "yes" and not has:
        raise ConfigError(f"{task.name}: chat_template: yes, but the tokenizer has no chat template.")
    return has if task.chat_template == "auto" else task.chat_template == "yes"


def render_prompt(task: GenerationTask, row: GenerationRow, demonstrations: Sequence[GenerationRow],
                  tokenizer: Any = None, *, with_instruction: bool = True) -> str:
    """The prompt text that ends where the answer starts.

    The teacher's prompt is ``instruction + demonstrations + query``; the student's is the query alone
    (``demonstrations=()`` and ``with_instruction=False``). With a chat template the instruction is the
    system turn, each demonstration a user/assistant pair, the query the last user turn.
    """
    instruction = task.instruction if with_instruction else ""
    if tokenizer is not None and uses_chat_template(task, tokenizer):
        messages = [{"role": "system", "content": instruction}] if instruction else []
        for demo in demonstrations:
            messages += [{"role": "user", "content": task.query_text(demo)},
                         {"role": "assistant", "content": task.answer_template.format(answer=demo.reference).strip()}]
        messages.append({"role": "user", "content": task.query_text(row)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [instruction] if instruction else []
    parts += [task.demonstration_text(d) for d in demonstrations]
    parts.append(task.query_text(row))
    return "\n\n".join(parts)
