"""The task registry: where each data set lives, which fields it has, how its labels map to classes.

Declarative, in the manner of lm-evaluation-harness task YAMLs: a task names its training data, its
classes and its prompt patterns; an evaluation set names its data and the label mapping onto the same
classes. A variant is a small override of a base entry (``dataclasses.replace``). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from icldistill.errors import ConfigError


@dataclass(frozen=True)
class HubSource:
    """Where the same rows live on the Hugging Face hub (used with ``--data-source hub``)."""

    path: str
    name: str | None
    split: str
    rename: Mapping[str, str] = field(default_factory=dict)  # hub column -> our field name


@dataclass(frozen=True)
class DataSpec:
    """One file of rows and how to read it.

    ``label_map`` maps the raw label string to a class index; ``None`` drops the row (binarised MNLI
    drops ``neutral``). Any label not in the map is an error, never silently dropped.
    """

    name: str
    family: str  # rows of one family share fields and classes, so a task's prompts apply to them
    local: str  # path relative to the data directory
    hub: HubSource | None
    label_map: Mapping[str, int | None]
    filter: Mapping[str, str] = field(default_factory=dict)  # keep rows whose field equals the value
    meta_fields: tuple[str, ...] = ()  # carried to predictions and breakdowns (HANS heuristic, subcase)
    description: str = ""


@dataclass(frozen=True)
class PatternSpec:
    """A prompt template and its label words (one per class, in class order)."""

    template: str
    label_words: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """What rows of one family look like: input fields, class names, prompt patterns."""

    name: str
    fields: tuple[str, ...]
    classes: tuple[str, ...]
    patterns: Mapping[str, PatternSpec]
    content_free: Mapping[str, str]  # field values of the content-free input for contextual calibration


@dataclass(frozen=True)
class Task:
    """A training task: its family (fields, classes, patterns), its train data, its default evaluation sets."""

    name: str
    family: str
    train: DataSpec
    default_eval: tuple[str, ...]
    default_pattern: str
    description: str = ""


# Patterns from the llmft lineage (Mosbach et al. 2023); see PROTOCOL.md.
_NLI_PATTERNS = MappingProxyType({
    "gpt3": PatternSpec("{premise} question: {hypothesis} Yes or No? answer:", (" Yes", " No")),
    "minimal": PatternSpec("{premise} {hypothesis} ?", (" Yes", " No")),
    "eval-harness": PatternSpec("{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", (" True", " False")),
})

_SENTIMENT_PATTERNS = MappingProxyType({
    "review": PatternSpec("Review: {sentence}\nSentiment:", (" positive", " negative")),
    "minimal": PatternSpec("{sentence} It was", (" great", " terrible")),
})

FAMILIES: Mapping[str, Family] = MappingProxyType({
    "nli": Family(
        "nli", ("premise", "hypothesis"), ("entailment", "non-entailment"), _NLI_PATTERNS,
        MappingProxyType({"premise": "N/A", "hypothesis": "N/A"}),
    ),
    "sentiment": Family(
        "sentiment", ("sentence",), ("positive", "negative"), _SENTIMENT_PATTERNS,
        MappingProxyType({"sentence": "N/A"}),
    ),
})

_MNLI_BINARY = MappingProxyType({"entailment": 0, "contradiction": 1, "neutral": None})
_MNLI_NONENT = MappingProxyType({"entailment": 0, "contradiction": 1, "neutral": 1})
_GLUE_BINARY = MappingProxyType({"entailment": 0, "not_entailment": 1})
_HANS = MappingProxyType({"entailment": 0, "non-entailment": 1})
_GLUE_PAIR = MappingProxyType({"sentence1": "premise", "sentence2": "hypothesis"})

_mnli_train = DataSpec(
    "mnli-train", "nli", "mnli/train_subset.jsonl.gz", HubSource("nyu-mll/glue", "mnli", "train"), _MNLI_BINARY,
    description="MNLI train (binarised: neutral dropped)",
)
_mnli_m = DataSpec(
    "mnli-m", "nli", "mnli/validation_matched.jsonl.gz", HubSource("nyu-mll/glue", "mnli", "validation_matched"),
    _MNLI_BINARY, description="MNLI validation_matched, binarised (6,692 rows)",
)
_hans = DataSpec(
    "hans", "nli", "hans/heuristics_evaluation_set.jsonl.gz", HubSource("jhu-cogsci/hans", None, "validation"), _HANS,
    meta_fields=("heuristic", "subcase"), description="HANS evaluation set, all 30 subcases (30,000 rows)",
)

EVAL_SETS: Mapping[str, DataSpec] = MappingProxyType({
    "mnli-m": _mnli_m,
    "mnli-m-nonent": replace(_mnli_m, name="mnli-m-nonent", label_map=_MNLI_NONENT,
                             description="MNLI validation_matched, neutral+contradiction = non-entailment"),
    "hans": _hans,
    "hans-lo": replace(_hans, name="hans-lo", filter=MappingProxyType({"heuristic": "lexical_overlap"}),
                       description="HANS lexical_overlap heuristic (10,000 rows), the lineage's OOD set"),
    "hans-sub": replace(_hans, name="hans-sub", filter=MappingProxyType({"heuristic": "subsequence"}),
                        description="HANS subsequence heuristic (10,000 rows)"),
    "hans-const": replace(_hans, name="hans-const", filter=MappingProxyType({"heuristic": "constituent"}),
                          description="HANS constituent heuristic (10,000 rows)"),
    "rte": DataSpec("rte", "nli", "rte/validation.jsonl", HubSource("nyu-mll/glue", "rte", "validation", _GLUE_PAIR),
                    _GLUE_BINARY, description="RTE validation (277 rows)"),
    "snli": DataSpec("snli", "nli", "snli/validation.jsonl.gz", HubSource("stanfordnlp/snli", None, "validation"),
                     _MNLI_BINARY, description="SNLI validation, binarised"),
    "cb": DataSpec("cb", "nli", "cb/validation.jsonl", HubSource("aps/super_glue", "cb", "validation"),
                   _MNLI_BINARY, description="CommitmentBank validation, binarised (neutral dropped)"),
    "wnli": DataSpec("wnli", "nli", "wnli/validation.jsonl", HubSource("nyu-mll/glue", "wnli", "validation", _GLUE_PAIR),
                     _GLUE_BINARY, description="WNLI validation (71 rows)"),
    "sst2": DataSpec("sst2", "sentiment", "sst2/validation.jsonl", HubSource("nyu-mll/glue", "sst2", "validation"),
                     MappingProxyType({"positive": 0, "negative": 1}), description="SST-2 validation (872 rows)"),
})

TASKS: Mapping[str, Task] = MappingProxyType({
    "mnli": Task("mnli", "nli", _mnli_train, ("mnli-m", "hans-lo"), "gpt3",
                 "MNLI binarised: entailment -> ' Yes', contradiction -> ' No', neutral dropped"),
    "mnli-nonent": Task("mnli-nonent", "nli", replace(_mnli_train, name="mnli-nonent-train", label_map=_MNLI_NONENT),
                        ("mnli-m-nonent", "hans-lo"), "gpt3", "MNLI with neutral+contradiction as non-entailment"),
    "rte": Task("rte", "nli", DataSpec("rte-train", "nli", "rte/train.jsonl.gz",
                                       HubSource("nyu-mll/glue", "rte", "train", _GLUE_PAIR), _GLUE_BINARY),
                ("rte", "hans-lo"), "gpt3", "RTE (GLUE)"),
    "cb": Task("cb", "nli", DataSpec("cb-train", "nli", "cb/train.jsonl", HubSource("aps/super_glue", "cb", "train"),
                                     _MNLI_BINARY), ("cb",), "gpt3", "CommitmentBank, binarised"),
    "wnli": Task("wnli", "nli", DataSpec("wnli-train", "nli", "wnli/train.jsonl",
                                         HubSource("nyu-mll/glue", "wnli", "train", _GLUE_PAIR), _GLUE_BINARY),
                 ("wnli",), "gpt3", "WNLI (GLUE)"),
    "sst2": Task("sst2", "sentiment", DataSpec("sst2-train", "sentiment", "sst2/train.jsonl.gz",
                                               HubSource("nyu-mll/glue", "sst2", "train"),
                                               MappingProxyType({"positive": 0, "negative": 1}),
                                               filter=MappingProxyType({"full_sentence": "True"})),
                 ("sst2",), "review", "SST-2 sentiment (demonstrations from full training sentences)"),
})


def get_task(name: str) -> Task:
    """Look up a training task; unknown names list the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"Unknown task '{name}'. Known tasks: {', '.join(TASKS)}.") from None


def get_eval_set(name: str, task: Task | None = None) -> DataSpec:
    """Look up an evaluation set, checking that it has the same fields and classes as ``task``."""
    try:
        spec = EVAL_SETS[name]
    except KeyError:
        raise ConfigError(f"Unknown evaluation set '{name}'. Known sets: {', '.join(EVAL_SETS)}.") from None
    if task is not None and spec.family != task.family:
        raise ConfigError(
            f"Evaluation set '{name}' ({spec.family}) does not fit task '{task.name}' ({task.family}); "
            f"pick sets of the same kind, e.g. {', '.join(task.default_eval)}."
        )
    return spec


def family_of(task: Task) -> Family:
    return FAMILIES[task.family]
