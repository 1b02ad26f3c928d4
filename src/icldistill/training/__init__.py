"""Training: the loss functions (``losses``, pure torch), the one training loop on accelerate (``loop``),
and where the teacher's signal comes from, online or cached (``teacher``).
"""

from icldistill._lazy import lazy_exports

_EXPORTS = {
    "loop": (
        "TrainingDiverged", "TrainResult", "trainable_state", "gathered_trainable_state",
        "find_checkpoint", "fit",
    ),
    "losses": (
        "LossOutput", "label_log_probs", "class_log_probs", "vocab_log_probs", "ce_loss", "kl_loss",
        "distillation_loss", "topk_vocab_kl", "check_vocab_compatible",
    ),
    "teacher": (
        "TeacherSignal", "compute_signal", "signal_key", "SignalCache", "OnlineTeacher",
    ),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
