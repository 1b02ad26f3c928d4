"""The split shared-prefix attention equals one dense softmax over the prefix and the packed row, under its mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from icldistill.scoring import shared_attention as sa


def _dense(query, key, value, allowed, scale, softcap):
    """The reference: repeat the key heads, one masked softmax over all P + M keys (float64)."""
    groups = key.shape[1]
    rep = query.shape[1] // groups
    k = key.repeat_interleave(rep, dim=1).double()
    v = value.repeat_interleave(rep, dim=1).double()
    scores = query.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)  # (1, M, H, D)


def _row(prefix: int, blocks: list[list[int]]):
    """A packed row of query blocks, each block given as its branch lengths (the first is the query)."""
    positions, segment, parent, starts = [], [], [], []
    n_seg = 0
    for block in blocks:
        starts.append(len(positions))
        q_seg = n_seg
        for b, length in enumerate(block):
            first = prefix if b == 0 else prefix + block[0]
            positions += range(first, first + length)
            segment += [n_seg] * length
            parent += [-1 if b == 0 else q_seg] * length
            n_seg += 1
    pos, seg, par = (torch.tensor(x) for x in (positions, segment, parent))
    within = ((seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])) | (par[:, None] == seg[None, :])
    lengths = [b - a for a, b in zip(starts, starts[1:] + [len(positions)])]
    return pos, within, starts, lengths


@settings(max_examples=40, deadline=None)
@given(prefix=st.integers(0, 20),
       blocks=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3), min_size=1, max_size=5),
       groups=st.sampled_from([(2, 2), (4, 2), (4, 1)]), window=st.sampled_from([None, 3, 8, 100]),
       softcap=st.sampled_from([None, 2.0]), fused=st.booleans(), seed=st.integers(0, 1000))
def test_split_attention_equals_the_dense_masked_softmax(prefix, blocks, groups, window, softcap, fused, seed):
    """Both ways of computing a part (PyTorch's CPU flash kernel, which returns the log-sum-exp, and the plain
    math used elsewhere and for soft-capping), including tokens that a sliding window cuts off the prefix."""
    heads, kv_heads = groups
    pos, within, starts, lengths = _row(prefix, blocks)
    m, dim = len(pos), 8
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, heads, m, dim, generator=g) * 2
    key = torch.randn(1, kv_heads, prefix + m, dim, generator=g) * 2
    value = torch.randn(1, kv_heads, prefix + m, dim, generator=g)
    key_pos = torch.cat([torch.arange(prefix), pos])
    allowed = torch.cat([torch.ones(m, prefix, dtype=torch.bool), within], dim=1)
    if window is not None:
        allowed &= (pos[:, None] - key_pos[None, :]) < window
    layout = sa.Layout.build(prefix, starts, lengths, pos, within)
    token, kernel = sa._LAYOUT.set(layout), sa._FUSED
    sa._FUSED = kernel if fused else None
    try:
        out, _ = sa.shared_prefix_attention(None, query, key, value, None, scaling=0.3, sliding_window=window,
                                            softcap=softcap)
    finally:
        sa._LAYOUT.reset(token)
        sa._FUSED = kernel
    expected = _dense(query, key, value, allowed[None, None], 0.3, softcap)
    assert out.shape == (1, m, heads, dim)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_outside_a_layout_it_refuses_to_run():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="use_layout"):
        sa.shared_prefix_attention(None, q, q, q, None)


def test_use_layout_restores_the_attention_implementation_even_after_an_error():
    from tiny import make_model

    model = make_model("llama", 32)
    before = model.config._attn_implementation
    pos, within, starts, lengths = _row(2, [[3]])
    with pytest.raises(ValueError):
        with sa.use_layout(model, sa.Layout.build(2, starts, lengths, pos, within)):
            assert model.config._attn_implementation == sa.NAME
            raise ValueError("boom")
    assert model.config._attn_implementation == before
    assert sa._LAYOUT.get() is None
