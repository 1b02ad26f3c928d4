"""The methods: ICL evaluation, pattern-based fine-tuning and context distillation.

Each supplies what differs (its data, its loss, its teacher); they share the setup in ``common``,
the scoring in :mod:`icldistill.scoring` and the one training loop in :mod:`icldistill.training`.
"""

from icldistill._lazy import lazy_exports

_EXPORTS = {
    "icl": (
        "run_icl",
    ),
    "pbft": (
        "run_pbft",
    ),
    "distill": (
        "run_distill",
    ),
    "predict": (
        "run_predict",
    ),
    "evaluate": (
        "run_eval",
    ),
    "export": (
        "export_run",
    ),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
