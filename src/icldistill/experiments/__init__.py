"""Experiments: experiment files and their grids (``grid``), running every cell resumably (``sweep``),
gathering what the cells wrote into tables (``results``), and re-running a finished run (``reproduce``);
paired comparisons of runs (``compare``) and later evaluations of a sweep's trained cells (``evaluate``).
"""

from icldistill._lazy import lazy_exports

_EXPORTS = {
    "compare": (
        "compare_runs", "mcnemar_exact", "paired_bootstrap", "read_predictions", "sweep_paired",
    ),
    "evaluate": (
        "evaluate_sweep",
    ),
    "grid": (
        "Method", "METHODS", "Cell", "Experiment", "ExperimentError", "load_experiment", "expand",
        "model_label", "Validation", "validate_file",
    ),
    "reproduce": (
        "compare_metrics", "reproduce",
    ),
    "results": (
        "collect", "collect_subcases", "aggregate",
    ),
    "sweep": (
        "cell_dir", "cell_status", "sweep_progress", "CellLock", "SweepEvent", "SweepSummary",
        "run_cell", "write_sweep_record", "run_sweep",
    ),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
