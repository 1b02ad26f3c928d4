"""The teacher's label distribution averaged over its demonstration contexts.

One function, shared by the teacher pass (which caches the T = 1 average) and the loss (which tempers
each context at the loss's temperature). It lives alone so that the teacher-cache key
(``teacher.SIGNAL_CODE``) can cover exactly the code that computes a cached signal, without the losses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def tempered_context_average(context_logprobs: Tensor, temperature: float = 1.0) -> Tensor:
    """The teacher's temperature-T label distribution averaged over its demonstration contexts, as log-probs.

    ``context_logprobs`` is ``(J, batch, C)``: each context's log-distribution over the labels. Each is
    tempered first (``softmax(lp_j / T)``) and the J distributions are then averaged in probability space:
    ``log(mean_j softmax(lp_j / T))``, ``(batch, C)``. Tempering the average instead would sharpen or
    flatten the mixture as a whole, which is not the mixture of tempered teachers; the two agree at T = 1
    and for J = 1. Half precision is upcast to float32 first.
    """
    if context_logprobs.ndim != 3:
        raise ValueError(f"context_logprobs must have shape (J, batch, C), got {tuple(context_logprobs.shape)}.")
    upcast = context_logprobs.to(torch.promote_types(context_logprobs.dtype, torch.float32))
    tempered = torch.log_softmax(upcast / temperature, dim=-1)
    return torch.logsumexp(tempered, dim=0) - math.log(context_logprobs.shape[0])
