"""Reference log-probabilities on answer-position logits, for tests: what the losses' inputs must equal.

``label_log_probs`` (the label words' log-softmax on one position's logits) and ``vocab_log_probs`` (the
full vocabulary's) were the one-token definitions before class scores from whole label words; nothing in
``src/`` uses them any more, and the tests check the production scores against them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from icldistill.training.losses import _check_temperature


def label_log_probs(logits: Tensor, label_token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-softmax over the label words only, at temperature ``temperature``.

    The answer distribution of a verbalised classifier is the softmax of the next-token logits
    restricted to the label words (e.g. " Yes" / " No"); this is the distribution that the teacher
    and the student are compared on in label space, and it works across tokenizers because only the
    label words' ids need to be known in each.

    Args:
        logits: ``(batch, vocab)`` next-token logits at the answer position, any float dtype.
        label_token_ids: ``(C,)`` integer ids of the label words, in class order.
        temperature: softmax temperature T > 0; the logits are divided by T.

    Returns:
        ``(batch, C)`` float32 log-probabilities, ``log_softmax(logits[:, ids] / T)``. The upcast
        happens before the division and the softmax: bf16 keeps only 8 mantissa bits, and a
        log-softmax computed in bf16 is off by up to ~1e-2 (the paper trains in BF16).
    """
    _check_temperature(temperature)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got {tuple(logits.shape)}.")
    if label_token_ids.ndim != 1:
        raise ValueError(f"label_token_ids must have shape (C,), got {tuple(label_token_ids.shape)}.")
    selected = logits.index_select(-1, label_token_ids.to(device=logits.device, dtype=torch.long))
    return torch.log_softmax(selected.float() / temperature, dim=-1)


def vocab_log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Full-vocabulary log-softmax at temperature ``temperature``, in float32.

    Args:
        logits: ``(batch, V)`` next-token logits at the answer position, any float dtype.
        temperature: softmax temperature T > 0.

    Returns:
        ``(batch, V)`` float32 log-probabilities ``log_softmax(logits / T)`` (upcast first, as in
        :func:`label_log_probs`).
    """
    _check_temperature(temperature)
    return torch.log_softmax(logits.float() / temperature, dim=-1)
