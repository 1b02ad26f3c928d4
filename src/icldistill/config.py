"""Every option of every command, with its default and its help, in one place.

The command line, YAML configuration files and the Python API are all built from these dataclasses,
so a default or a help text is stated exactly once. Each field's ``help`` metadata is what
``icld COMMAND --help`` prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from icldistill.errors import ConfigError


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, keep_spaces: bool = False) -> Any:
    """A dataclass field with its help text (and allowed values) attached, for the CLI and validation.

    ``keep_spaces`` keeps the spaces around comma-separated items (label words such as ' Yes' need them).
    """
    meta = {"help": help, "choices": choices, "keep_spaces": keep_spaces}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


# Trackers accelerate integrates (``Accelerator(log_with=...)``); training/tracking.py knows their packages.
TRACKERS = ("none", "tensorboard", "mlflow", "wandb", "aim", "comet_ml", "clearml", "dvclive")


@dataclass
class CommonOptions:
    """Options shared by every method: what to run on, how to prompt, where to write."""

    task: str = option("mnli", "Training task: a name (see `icld tasks`) or a task file (my_task.yaml); "
                               "demonstrations and training queries come from its train data.")
    eval: list[str] | None = option(None, "Evaluation sets, comma-separated: the task's set names (see `icld tasks "
                                    "show TASK`) or data files with the task's columns (default: the task's default_eval, "
                                    "mnli-m,hans-lo for mnli).")
    shots: int = option(16, "Number k of demonstrations (balanced: k / number of classes per class).")
    demo_sampling: str = option("balanced", "How demonstrations are drawn: balanced (k / C per class, shuffled) or "
                                "random (k rows regardless of class, as lm-evaluation-harness draws).",
                                choices=("balanced", "random"))
    demonstrations: str | None = option(None, "A data file of demonstrations (the task's columns and label) used in "
                                        "file order for every seed instead of drawn ones; --shots is then its row count.")
    seeds: list[int] = option([0], "Data seeds, comma-separated; each draws its own demonstrations.")
    pattern: str | None = option(
        None,
        "Prompt pattern (default: the task's, gpt3 for NLI): a name (gpt3, minimal, eval-harness, or a "
        "task's own) or a template with the task's fields, e.g. '{premise} Q: {hypothesis}?'.",
    )
    label_words: list[str] | None = option(
        None,
        "Override the pattern's label words, one per class in the task's class order, comma-separated with "
        "their spaces, e.g. ' Yes, No'; a comma inside a word is written '\\,' (or give a YAML list).",
        keep_spaces=True,
    )
    limit: int | None = option(None, "Evaluate on at most this many queries per evaluation set (seeded sample).")
    batch_size: int = option(16, "Queries scored per forward pass.")
    dtype: str = option("auto", "Model dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.",
                        choices=("auto", "bf16", "fp16", "fp32"))
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:N.")
    data_dir: str | None = option(None, "Directory of JSON Lines data (default: $ICLDISTILL_DATA).")
    data_source: str = option(
        "auto", "Where data comes from: local (data_dir), hub (Hugging Face datasets), auto (local if set).",
        choices=("auto", "local", "hub"),
    )
    cache_dir: str | None = option(None, "Cache for converted models and teacher signals (default: $ICLDISTILL_CACHE or ~/.cache/icldistill).")
    output_dir: str = option("runs/latest", "Directory for results.json, predictions.jsonl and artefacts.")
    overwrite: bool = option(False, "Replace another run found in output_dir (its results, seeds and checkpoints are deleted) instead of refusing.")
    label_score: str = option(
        "sum", "A class's score from its label word's tokens: sum (the word's log-probability, as lm-eval's "
        "multiple choice) or mean (length-normalised). One-token words score the same either way.",
        choices=("sum", "mean"))
    prefix_cache: bool = option(True, "Reuse the demonstrations' key/value cache across queries (--no-prefix-cache scores every full prompt).")
    revision: str | None = option(
        None, "Hub models only: the branch, tag or commit to load (for distill: the student's; see --teacher-revision). "
        "The resolved commit enters the records and the teacher-cache key.")
    trust_remote_code: bool = option(False, "Hub models only: allow a model's own Python code to run (transformers' trust_remote_code).")


@dataclass
class IclOptions(CommonOptions):
    """In-context learning evaluation of one model."""

    model: str = option("smollm2-135m", "Model: packaged name, Hugging Face id, local directory or .gguf file.")


@dataclass
class TrainOptions:
    """Optimisation and parameter-efficiency options shared by PBFT and distillation."""

    epochs: int = option(40, "Training epochs (paper: 40).")
    max_steps: int | None = option(
        None, "Optimiser steps to train for; overrides --epochs (the last epoch may stop part-way). With few "
        "examples an epoch is one or two steps, so methods are compared at equal step budgets through this.")
    lr: float = option(1e-5, "AdamW learning rate (paper: 1e-5).")
    train_batch_size: int = option(8, "Examples per optimiser step (before gradient accumulation is split off).")
    grad_accum: int = option(
        1, "Micro-batches per optimiser step; the micro-batch is train_batch_size / grad_accum examples. Under N "
        "processes the micro-batch size stays the same and each process runs ceil(train_batch_size / N / micro-batch) "
        "of them: the optimiser step, its examples and its gradient are those of one process.")
    warmup_ratio: float = option(0.5, "Fraction of steps with linear warm-up (llmft: 0.5).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).")
    eval_every: int = option(
        0, "Evaluate on the dev split (--dev-queries) during training every N optimiser steps (0: after every "
        "epoch; -1: never). The evaluation sets are scored once, after training, on the selected checkpoint.")
    eval_limit: int | None = option(
        None, "Deprecated and ignored: evaluations during training use the dev split (--dev-queries), never the "
        "evaluation sets. Kept so that older option files still load.")
    dev_queries: int = option(
        32, "Dev split: this many labelled rows carved from the train split, disjoint from the demonstrations, the "
        "training queries and the evaluation sets; used for evaluation during training, for --select and (distill) "
        "for the teacher's ICL-gain check. 0: no dev split (then --select must be last).")
    select: str = option(
        "last", "Which checkpoint is evaluated and saved: last, or best (by --select-metric on the dev split).",
        choices=("last", "best"))
    select_metric: str = option("accuracy", "With --select best: dev accuracy (higher wins) or dev loss (lower wins).",
                                choices=("accuracy", "loss"))
    peft: str = option("lora", "What trains: lora, bitfit, or none (full fine-tuning).", choices=("lora", "bitfit", "none"))
    lora_r: int = option(8, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA scaling alpha.")
    lora_dropout: float = option(0.05, "LoRA dropout.")
    lora_targets: list[str] | None = option(None, "LoRA target modules (default: q_proj,v_proj).")
    bitfit_fallback: str = option(
        "error",
        "When the model has no bias terms: error, or add-bias (zero-initialised biases on the LoRA target layers).",
        choices=("error", "add-bias"),
    )
    train_embeddings: bool = option(False, "Also train the input embeddings and LM head (they are frozen by default).")
    merge: bool = option(False, "Also save a merged plain model (LoRA only).")
    resume: bool = option(False, "Continue from the last checkpoint in output_dir.")
    save_every_epoch: bool = option(True, "Write a resumable checkpoint at the end of every epoch.")
    report_to: str = option(
        "none", "Log training curves (loss, KL/CE, lr, grad norm, dev metrics) through accelerate's trackers to: "
        "none, tensorboard, mlflow, wandb, aim, comet_ml, clearml or dvclive; logs in OUTPUT_DIR/seed-N/logs.",
        choices=TRACKERS)


@dataclass
class PbftOptions(CommonOptions, TrainOptions):
    """Pattern-based fine-tuning on the k support examples."""

    model: str = option("smollm2-135m", "Model to fine-tune: packaged name, Hugging Face id, local directory or .gguf.")


@dataclass
class DistillOptions(CommonOptions, TrainOptions):
    """Context distillation: a student without demonstrations learns the teacher's answers with them."""

    teacher: str = option("gemma3-270m", "Teacher model (sees the k demonstrations).")
    student: str = option("smollm2-135m", "Student model (sees the query alone; this is what trains).")
    train_queries: int = option(64, "Training queries drawn from the train split, disjoint from the demonstrations.")
    alpha: float = option(0.5, "Loss mix: alpha * KL(teacher || student) + (1 - alpha) * CE (paper: 0.5).")
    ce_target: str = option(
        "gold", "Target of the CE term: gold (the training queries' labels, the paper's; they count as labelled "
        "examples) or teacher (the teacher's predicted class: no labels beyond the k demonstrations).",
        choices=("gold", "teacher"))
    teacher_revision: str | None = option(None, "Hub teacher only: the branch, tag or commit to load.")
    temperature: float = option(
        1.0, "Softmax temperature of the KL term (scaled by T^2). With several --teacher-contexts each context's "
        "distribution is tempered before the contexts are averaged.")
    kl_space: str = option("label", "KL over the label-word distribution (label) or the next-token vocabulary (vocab; same tokenizer only).",
                           choices=("label", "vocab"))
    teacher_signal: str = option("cached", "cached: score the teacher once before training; online: keep it loaded.",
                                 choices=("cached", "online"))
    teacher_contexts: int = option(1, "Average the teacher over N independently drawn demonstration sets.")
    teacher_topk: int = option(64, "With kl_space=vocab and a cached signal: keep the teacher's top-k log-probs.")
    teacher_dtype: str = option("auto", "Teacher dtype (auto, bf16, fp16, fp32).", choices=("auto", "bf16", "fp16", "fp32"))


def _same_as(cls: type, name: str, default: Any = dataclasses.MISSING, help: str | None = None) -> Any:
    """The option ``name`` of ``cls`` again (its help and choices, optionally another default): said once."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return option(value if default is dataclasses.MISSING else default, help or f.metadata["help"],
                  choices=f.metadata.get("choices"), keep_spaces=f.metadata.get("keep_spaces", False))


_FROM_MODEL = " (default: the one the model was trained or exported with, else the task's)"


@dataclass
class PredictOptions:
    """Batch inference on unlabelled rows with any loadable model (issue 11)."""

    model: str = option("smollm2-135m", "Model: a training run's seed directory (RUN/seed-N), an exported directory "
                        "(icld export), a packaged name, a Hugging Face id, a local directory or a .gguf file.")
    input: str | None = option(None, "Rows to answer: .jsonl, .csv or .parquet with the task's input columns (and optionally id).")
    output: str = option("predictions.jsonl", "Where the answers go (.jsonl, .csv or .parquet), written atomically.")
    task: str | None = option(None, "Task whose fields, classes and patterns apply (default: the one the model was "
                              "trained or exported with, else mnli).")
    pattern: str | None = _same_as(CommonOptions, "pattern", help="Prompt pattern" + _FROM_MODEL + ".")
    label_words: list[str] | None = _same_as(CommonOptions, "label_words")
    shots: int = _same_as(CommonOptions, "shots", 0, "Demonstrations in each prompt (0 for a trained student; k for an "
                          "ICL teacher, drawn from the task's train split, balanced, with --seed).")
    seed: int = option(0, "Seed of the demonstration draw (with --shots).")
    demonstrations: str | None = _same_as(CommonOptions, "demonstrations")
    label_score: str = option("auto", "How a class's label word is scored: sum or mean of its tokens' log-probabilities; "
                              "auto: as the model was trained (or exported), else sum.", choices=("auto", "sum", "mean"))
    batch_size: int = _same_as(CommonOptions, "batch_size")
    dtype: str = _same_as(CommonOptions, "dtype")
    device: str = _same_as(CommonOptions, "device")
    data_dir: str | None = _same_as(CommonOptions, "data_dir")
    data_source: str = _same_as(CommonOptions, "data_source")
    cache_dir: str | None = _same_as(CommonOptions, "cache_dir")
    prefix_cache: bool = _same_as(CommonOptions, "prefix_cache")


@dataclass
class EvalOptions(CommonOptions):
    """Evaluate a trained student (or any model) on evaluation sets, without training (issue 11)."""

    model: str = option("smollm2-135m", "Model: a training run (directory or RUN/seed-N), a sweep directory (each trained "
                        "cell, written to its eval-<set>/), an exported directory, or any model name.")
    task: str | None = option(None, "Task (default: the one the model was trained or exported with, else mnli).")
    eval: list[str] | None = option(None, "Evaluation sets, comma-separated (default: the task's; see `icld tasks`).")
    shots: int = _same_as(CommonOptions, "shots", 0, "Demonstrations per prompt (0: the trained student answers alone).")
    pattern: str | None = _same_as(CommonOptions, "pattern", help="Prompt pattern" + _FROM_MODEL + ".")
    output_dir: str | None = option(None, "Directory for results.json and predictions.jsonl (default: RUN/eval-SETS for "
                                    "a training run, runs/eval-SETS otherwise).")


# ---------------------------------------------------------------------------------------------
# Turning strings, YAML and dicts into these dataclasses


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of an annotation such as ``list[int] | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a config dataclass (cached: resolving them is slow and they never change)."""
    return get_type_hints(cls)


def parse_value(cls: type, name: str, value: Any, source: str = "options") -> Any:
    """Convert ``value`` (a CLI string or a YAML scalar/list) to the type of field ``name`` of ``cls``."""
    tp, optional = _base_type(field_types(cls)[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{source}: option '{name}' cannot be empty.")
    try:
        if typing.get_origin(tp) is list:
            (item_tp,) = typing.get_args(tp)
            if isinstance(value, str):
                items = split_list(value)
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:  # a YAML scalar for a list option: `seeds: 0`
                items = [value]
            keep = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("keep_spaces")
            parsed = [_scalar(item_tp, v if keep or not isinstance(v, str) else v.strip()) for v in items]
            if any(isinstance(v, str) and not v.strip() for v in parsed):
                raise ValueError(value)
            return parsed
        if isinstance(value, (list, tuple, dict)):
            raise ValueError(value)
        return _scalar(tp, value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{source}: option '{name}': cannot read {value!r} as {_type_name(field_types(cls)[name])}."
        ) from None


def split_list(text: str) -> list[str]:
    """Split a comma-separated option value; ``\\,`` is a comma inside an item (a label word such as ' 1,000')."""
    return [item.replace("\\,", ",") for item in re.split(r"(?<!\\),", text)]


def _scalar(tp: Any, value: Any) -> Any:
    """One value of type ``tp``: bools only from bool-like words, ints only from integral numbers."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if isinstance(value, bool):  # YAML `true` is not a number of shots
        raise ValueError(value)
    if tp is int:
        number = float(value) if isinstance(value, (str, float)) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(value)
        return int(number)
    if tp is float:
        return float(value)
    return tp(value)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "text"}
    base, optional = _base_type(tp)
    if typing.get_origin(base) is list:
        text = f"a comma-separated list of {names.get(typing.get_args(base)[0], 'values')}"
    else:
        text = names.get(base, str(base))
    return text + (" (or none)" if optional else "")


def build_config(cls: type, values: dict[str, Any] | None = None, *, source: str = "options") -> Any:
    """Instantiate config class ``cls`` from a mapping, with type conversion and helpful errors.

    Keys may use dashes or underscores. Unknown keys fail with the closest valid names.
    """
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, raw_value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else f" Valid keys: {', '.join(sorted(names))}."
            raise ConfigError(f"{source}: unknown option '{raw_key}'.{hint}")
        if key in kwargs:
            raise ConfigError(f"{source}: option '{key}' is given twice (as '{raw_key}' and another spelling).")
        kwargs[key] = parse_value(cls, key, raw_value, source)
    config = cls(**kwargs)
    validate(config, source=source)
    return config


def validate(config: Any, *, source: str = "options") -> None:
    """Check choices and ranges; raise ConfigError naming the option and the fix."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{source}: option '{f.name}' is {value!r}; choose one of {', '.join(choices)}.")
    positive = ["shots", "batch_size", "epochs", "train_batch_size", "grad_accum", "lora_r", "train_queries",
                "teacher_contexts", "teacher_topk"]
    for name in positive:
        if hasattr(config, name) and getattr(config, name) < (0 if name == "shots" else 1):
            raise ConfigError(f"{source}: option '{name}' must be {'>= 0' if name == 'shots' else '>= 1'}, got {getattr(config, name)}.")
    for name in ("limit", "eval_limit"):
        if getattr(config, name, None) is not None and getattr(config, name) < 1:
            raise ConfigError(f"{source}: option '{name}' must be a positive number of queries.")
    if hasattr(config, "alpha") and not 0.0 <= config.alpha <= 1.0:
        raise ConfigError(f"{source}: option 'alpha' must lie in [0, 1], got {config.alpha}.")
    if hasattr(config, "temperature") and not config.temperature > 0:
        raise ConfigError(f"{source}: option 'temperature' must be > 0, got {config.temperature}.")
    if hasattr(config, "train_batch_size") and config.train_batch_size % config.grad_accum:
        raise ConfigError(
            f"{source}: train_batch_size ({config.train_batch_size}) must be a multiple of grad_accum ({config.grad_accum})."
        )
    if hasattr(config, "lr") and not 0 < config.lr < float("inf"):
        raise ConfigError(f"{source}: option 'lr' must be a positive finite number, got {config.lr}.")
    ranges = {"warmup_ratio": (0.0, 1.0), "lora_dropout": (0.0, 1.0), "max_grad_norm": (0.0, float("inf")),
              "eval_every": (-1, float("inf")), "weight_decay": (0.0, float("inf")), "alpha": (0.0, 1.0)}
    for name, (low, high) in ranges.items():
        if hasattr(config, name) and not low <= getattr(config, name) <= high:
            raise ConfigError(f"{source}: option '{name}' must lie in [{low}, {high}], got {getattr(config, name)}.")
    if getattr(config, "max_steps", None) is not None and config.max_steps < 1:
        raise ConfigError(f"{source}: option 'max_steps' must be >= 1 (or none to train --epochs), got {config.max_steps}.")
    if hasattr(config, "dev_queries") and config.dev_queries < 0:
        raise ConfigError(f"{source}: option 'dev_queries' must be >= 0, got {config.dev_queries}.")
    if getattr(config, "select", "last") == "best" and getattr(config, "dev_queries", 0) == 0:
        raise ConfigError(f"{source}: --select best needs a dev split: set --dev-queries N (N >= 1).")
    if hasattr(config, "seeds") and not config.seeds:
        raise ConfigError(f"{source}: option 'seeds' needs at least one seed.")
    if hasattr(config, "eval") and config.eval is not None and not config.eval:
        raise ConfigError(f"{source}: option 'eval' needs at least one evaluation set.")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {path} cannot be read: {exc}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of option: value, not a {type(data).__name__}.")
    return data


def to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-serialisable dict of a config (recorded next to every result)."""
    return dataclasses.asdict(config)
