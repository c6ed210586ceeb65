"""One token of gated linear attention, for generation.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

O(d_k d_v) per token with the state passed in and out explicitly, so a decoder can keep one
state per layer and sequence. Starting from the final state of :func:`.chunk.chunk_gla` over a
prompt continues that sequence exactly.
"""

from __future__ import annotations

import torch

from .naive import compute_dtype


def gla_step(q_t, k_t, v_t, g_t, state, scale=None):
    """Advance the state by one token; return ``(o_t, new_state)``.

    q_t, k_t, g_t: [B, H, d_k]; v_t: [B, H, d_v]; state: [B, H, d_k, d_v] (``None`` means
    zeros). ``o_t`` [B, H, d_v] has q_t's dtype; the new state has the dtype of the computation
    (at least float32). ``scale`` defaults to d_k ** -0.5.
    """
    if q_t.dim() != 3 or k_t.shape != q_t.shape or g_t.shape != q_t.shape or v_t.shape[:2] != q_t.shape[:2]:
        raise ValueError(f"q_t, k_t, g_t must be [B, H, d_k] and v_t [B, H, d_v], got q_t {tuple(q_t.shape)}, "
                         f"k_t {tuple(k_t.shape)}, g_t {tuple(g_t.shape)}, v_t {tuple(v_t.shape)}")
    expected = (*q_t.shape, v_t.shape[-1])
    if state is not None and tuple(state.shape) != expected:
        raise ValueError(f"state must be [B, H, d_k, d_v] = {list(expected)}, got {tuple(state.shape)}")
    out_dtype, dtype = q_t.dtype, compute_dtype(q_t.dtype)
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    q_t, k_t, v_t, g_t = (x.to(dtype) for x in (q_t, k_t, v_t, g_t))
    state = torch.zeros(expected, dtype=dtype, device=q_t.device) if state is None else state.to(dtype)
    state = g_t.exp()[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    o_t = scale * (q_t[..., None, :] @ state).squeeze(-2)
    return o_t.to(out_dtype), state
