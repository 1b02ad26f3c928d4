"""Training: the loss functions (``losses``, pure torch), the one training loop on accelerate (``loop``),
how the teacher's signal is computed and cached (``teacher``), and where a batch's signal comes from, with
the teacher's identity (``signals``).
"""

from icldistill._lazy import lazy_exports

_EXPORTS = {
    "loop": (
        "TrainingDiverged", "TrainResult", "trainable_state", "gathered_trainable_state",
        "find_checkpoint", "fit",
    ),
    "losses": (
        "LossOutput", "class_log_probs", "ce_loss", "kl_loss",
        "distillation_loss", "mix_terms", "topk_vocab_kl", "check_vocab_compatible",
    ),
    "signals": (
        "TeacherSpec", "TeacherPrompts", "SignalSource", "CachedSource", "OnlineSource", "CachedTeacherPass",
        "within_vocab", "tempered_targets", "signal_cache",
    ),
    "teacher": (
        "TeacherSignal", "compute_signal", "signal_key", "SignalCache", "OnlineTeacher",
    ),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
