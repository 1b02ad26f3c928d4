"""The one scoring path: whole-prompt tokenization (``encoding``), label-word scores after a shared
token prefix with its KV cache reused (``prefix_cache``), scoring whole evaluation sets under a context
(``evalsets``), and the metrics computed
from those scores (``metrics``, numpy only; ``bootstrap``: the one percentile bootstrap of every interval).
"""

from icldistill._lazy import lazy_exports

_EXPORTS = {
    "bootstrap": ("bootstrap_interval",),
    "encoding": (
        "PromptTokens", "tokenize_prompts", "encode_text", "start_tokens", "label_word_tokens",
    ),
    "evalsets": (
        "ContextTooLong", "EncodedPrompts", "encode_prompts", "score_prompts", "evaluate_examples", "evaluate_sets",
    ),
    "metrics": (
        "compute_metrics", "aggregate_seeds", "hans_ood_accuracy",
    ),
    "prefix_cache": (
        "label_token_ids", "last_token_logits", "pad_right",
        "PrefixCache", "Scores", "score_queries", "score_queries_sharded", "rows_forward", "packing_unsupported",
    ),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
