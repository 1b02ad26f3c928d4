"""Attention over a shared prefix computed once for all packed queries, their own attention per block (Hydragen).

A packed pass (``prefix_cache``) puts a batch of queries, each with its label-word branches, into one row
after the prefix's cache. With one dense mask over that row every query token would also be scored
against every *other* query's tokens only to be masked out: at 16 queries of about 50 tokens that is as
much attention as the prefix itself. This attention function, registered in transformers'
``AttentionInterface``, splits each layer's attention exactly in two:

* every packed token against the shared prefix's keys: one matrix product for all queries, no mask
  (except a sliding window, by position distance, on the layers that have one);
* each query block (a query and its branches) against its own tokens, under the block's tree mask;

and merges the two softmaxes with their log-sum-exps (as in Hydragen, Juravsky et al. 2024), which gives
the softmax over the union of the keys. On the CPU each part runs in PyTorch's flash-attention kernel
(which returns the log-sum-exp); elsewhere, and with soft-capping, in plain float32 tensor operations; the
merge is in float32 whatever the model's dtype. The layout of a pass (prefix length, blocks, positions)
is set by ``use_layout`` around the model call; the model's attention modules find this function
through ``config._attn_implementation``, which ``use_layout`` switches and restores. Logit soft-capping
(Gemma 2) is applied as the model's eager attention applies it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

NAME = "icldistill_shared_prefix"
"""The name under which the attention function is registered in transformers' AttentionInterface."""


@dataclass
class Layout:
    """Where each packed token sits: the prefix length and the query blocks of one packed row.

    index (B, W): for each block, the row positions of its tokens, padded by repeating its last one;
    valid (B, W): which of those are real; allowed (B, W, W): which of its block's tokens each token sees;
    positions (M,): each packed token's absolute position (for sliding windows); last: the largest of them.
    """

    prefix: int
    index: torch.Tensor
    valid: torch.Tensor
    allowed: torch.Tensor
    positions: torch.Tensor
    last: int
    _memo: dict = field(default_factory=dict, repr=False)  # the masks, built once per pass, not per layer

    @classmethod
    def build(cls, prefix: int, starts: Sequence[int], lengths: Sequence[int], positions: torch.Tensor,
              allowed_rows: torch.Tensor) -> Layout:
        """Blocks ``[starts[b], starts[b] + lengths[b])`` of the packed row; ``allowed_rows`` (M, M) is the
        row's within-row visibility (a token sees only tokens of its own block)."""
        device = positions.device
        width = max(lengths)
        offsets = torch.arange(width, device=device)
        start = torch.tensor(list(starts), dtype=torch.long, device=device)
        length = torch.tensor(list(lengths), dtype=torch.long, device=device)
        valid = offsets[None, :] < length[:, None]
        index = start[:, None] + torch.minimum(offsets[None, :], length[:, None] - 1)
        allowed = allowed_rows[index[:, :, None], index[:, None, :]] & valid[:, None, :] & valid[:, :, None]
        allowed |= torch.eye(width, dtype=torch.bool, device=device)[None] & ~valid[:, :, None]  # padding sees itself
        return cls(prefix, index, valid, allowed, positions, int(positions.max()))

    def prefix_bias(self, per_group: int, window: int | None, dtype: torch.dtype
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The additive mask of the prefix part (None: every token sees every prefix key) and its empty rows."""
        if window is None or self.last < window:
            return None, None
        key = ("prefix", per_group, window, dtype)
        if key not in self._memo:
            device = self.positions.device
            far = (self.positions[:, None] - torch.arange(self.prefix, device=device)[None, :]) >= window  # (M, P)
            far = far.repeat(per_group, 1)  # a key group's heads side by side, as the queries are
            bias = _bias(~far, dtype)[None, None]
            self._memo[key] = (bias, far.all(dim=-1, keepdim=True)[None, None])
        return self._memo[key]

    def own_bias(self, per_group: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask of the blocks' own part, (B, 1, g * W, W)."""
        key = ("own", per_group, window, dtype)
        if key not in self._memo:
            seen = self.allowed
            if window is not None:
                pos = self.positions[self.index]
                seen = seen & ((pos[:, :, None] - pos[:, None, :]) < window)
            self._memo[key] = _bias(seen.repeat(1, per_group, 1), dtype)[:, None]
        return self._memo[key]


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("icldistill_shared_prefix_layout", default=None)


_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_fused_checked: dict[torch.dtype, bool] = {}


def _attend_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                 softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.matmul(torch.exp(scores - lse.clamp_min(torch.finfo(torch.float32).min)), v.float())
    return out, lse


def _fused_usable(q: torch.Tensor) -> bool:
    """PyTorch's CPU flash-attention kernel returns the log-sum-exp this merge needs, but it is a private
    operator: it is used only on the CPU, and only once a first call has matched the plain math."""
    if _FUSED is None or q.device.type != "cpu":
        return False
    if q.dtype not in _fused_checked:
        g = torch.Generator().manual_seed(0)
        a, b, c = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
        bias = torch.zeros(2, 1, 5, 5).masked_fill(torch.rand(2, 1, 5, 5, generator=g) < 0.3, float("-inf"))
        bias[..., 0] = 0.0
        try:
            out, lse = _FUSED(a.to(q.dtype), b.to(q.dtype), c.to(q.dtype), attn_mask=bias.to(q.dtype), scale=0.5)
            ref_out, ref_lse = _attend_math(a.to(q.dtype), b.to(q.dtype), c.to(q.dtype), bias, 0.5, None)
            tol = 1e-5 if q.dtype == torch.float32 else 5e-2
            ok = (torch.allclose(out.float(), ref_out, atol=tol)
                  and torch.allclose(lse.float().unsqueeze(-1), ref_lse, atol=tol))
        except (RuntimeError, TypeError):
            ok = False
        _fused_checked[q.dtype] = ok
    return _fused_checked[q.dtype]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
            softcap: float | None, empty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias) v and each row's log-sum-exp, both float32.

    q (B, G, N, D); k, v (B, G, S, D); bias (B or 1, 1, N, S), 0 or -inf in q's dtype, or None; empty
    (B or 1, 1, N, 1): the rows whose keys are all masked (their log-sum-exp is -inf, their output
    weighed by zero in the merge).
    """
    if softcap is None and _fused_usable(q):
        out, lse = _FUSED(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=bias, scale=scale)
        out, lse = out.float(), lse.float().unsqueeze(-1)
        if empty is not None:  # the kernel's value for a row with no visible key is not -inf: make it so
            lse = lse.masked_fill(empty, float("-inf"))
            out = out.masked_fill(empty, 0.0)
        return out, lse
    return _attend_math(q, k, v, bias, scale, softcap)


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            sliding_window: int | None = None, softcap: float | None = None, **kwargs
                            ) -> tuple[torch.Tensor, None]:
    """query (1, H, M, D); key, value (1, G, P + M, D) with the prefix's P keys first. Returns (1, M, H, D)."""
    layout = _LAYOUT.get()
    if layout is None:
        raise RuntimeError(f"the {NAME} attention runs only inside scoring.shared_attention.use_layout")
    _, heads, m, dim = query.shape
    groups = key.shape[1]
    per_group = heads // groups  # query heads h = group * per_group + j share key head `group`
    scale = scaling if scaling is not None else dim ** -0.5
    p = layout.prefix
    window = sliding_window or None
    device = query.device

    # Every packed token against the shared prefix: one product for all, a key group's heads side by side.
    if p:
        bias, empty = layout.prefix_bias(per_group, window, query.dtype)
        prefix_out, prefix_lse = _attend(query.reshape(1, groups, per_group * m, dim), key[:, :, :p], value[:, :, :p],
                                         bias, scale, softcap, empty)
        prefix_out = prefix_out.view(groups, per_group, m, dim)
        prefix_lse = prefix_lse.view(groups, per_group, m, 1)

    # Each block (a query and its branches) against its own tokens, blocks padded to one width.
    blocks, width = layout.index.shape
    own_q = query[0].view(groups, per_group, m, dim)[:, :, layout.index]  # (G, g, B, W, D)
    own_q = own_q.permute(2, 0, 1, 3, 4).reshape(blocks, groups, per_group * width, dim)
    own_k = key[0, :, p:][:, layout.index].transpose(0, 1)  # (B, G, W, D)
    own_v = value[0, :, p:][:, layout.index].transpose(0, 1)
    own_out, own_lse = _attend(own_q, own_k, own_v, layout.own_bias(per_group, window, query.dtype), scale, softcap)
    own_out = own_out.view(blocks, groups, per_group, width, dim).permute(1, 2, 0, 3, 4)[:, :, layout.valid]
    own_lse = own_lse.view(blocks, groups, per_group, width, 1).permute(1, 2, 0, 3, 4)[:, :, layout.valid]

    # Back to row order (a block's padding repeats its last token and is not written), then the merge.
    flat = layout.index[layout.valid]
    out = torch.empty((groups, per_group, m, dim), dtype=torch.float32, device=device)
    lse = torch.empty((groups, per_group, m, 1), dtype=torch.float32, device=device)
    out[:, :, flat], lse[:, :, flat] = own_out, own_lse
    if p:  # weights exp(prefix_lse) : exp(lse), i.e. sigmoid(prefix_lse - lse) for the prefix (0 where it saw nothing)
        out = torch.lerp(out, prefix_out, torch.sigmoid(prefix_lse - lse))
    return out.reshape(heads, m, dim).transpose(0, 1)[None].to(query.dtype), None


AttentionInterface.register(NAME, shared_prefix_attention)


@contextlib.contextmanager
def use_layout(model: torch.nn.Module, layout: Layout) -> Iterator[None]:
    """Run the model's attention as shared-prefix attention for ``layout`` inside the block, then restore it."""
    config = model.config
    previous = config._attn_implementation
    token = _LAYOUT.set(layout)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _LAYOUT.reset(token)
