"""The model layer: resolving a name to a ready model and tokenizer (``loading``), the real pretrained
models that arrive through the package index (``packaged``), and what trains (``adapters``: LoRA, BitFit, full).
"""

from icldistill._lazy import lazy_exports

_EXPORTS = {
    "adapters": (
        "TrainableSummary", "summarise", "apply_lora", "prepare_trainable",
    ),
    "loading": (
        "LoadedModel", "resolve_device", "resolve_dtype", "max_sequence_length", "load_model",
        "model_identity", "load_tokenizer",
    ),
    "packaged": (
        "PackagedModel", "PACKAGED_MODELS", "fetch_packaged", "list_models",
    ),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
