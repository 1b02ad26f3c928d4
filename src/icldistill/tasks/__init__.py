"""The task layer: tasks as YAML files (``taskfile``, built-ins in ``builtin/``) found by name or path
(``registry``), loading and validating rows (``data``), and prompt patterns with seeded demonstration
sampling (``prompts``). Imports no torch or transformers.
"""

from icldistill._lazy import lazy_exports

_EXPORTS = {
    "data": (
        "Example", "LoadedData", "resolve_data_dir", "load", "parse_rows", "subsample",
    ),
    "prompts": (
        "SEPARATOR", "Pattern", "resolve_pattern", "sample_demonstrations", "context_rng",
        "demonstration_prefix", "check_label_words_tokenize_apart",
    ),
    "registry": (
        "HubSource", "Carve", "DataSpec", "PatternSpec", "Family", "Task", "EVAL_SETS", "TASKS",
        "get_task", "get_eval_set", "family_of", "task_files",
    ),
    "taskfile": ("TaskFileError", "load_task_file"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
