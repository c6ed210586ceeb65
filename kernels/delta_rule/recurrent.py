"""One token of the (gated) delta rule, for generation.

The update S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t is applied as a rank-1
correction instead of forming the d_k x d_k transition:

    S' = a_t S_{t-1}                       (decay; a_t = exp(g_t), 1 without a gate)
    S_t = S' + beta_t k_t^T (v_t - k_t S')  (move the value stored under k_t towards v_t)

which costs O(d_k d_v) per token. ``v_t - k_t S'`` is the error of what the memory currently
returns for the key k_t; the delta rule writes back a beta_t fraction of it. Keys are assumed
L2-normalised by the caller.
"""

from __future__ import annotations

import torch


def delta_rule_step(q_t, k_t, v_t, beta_t, state, g_t=None, scale=None):
    """Advance the state by one token; return ``(o_t, new_state)``.

    q_t, k_t: [B, H, d_k]; v_t: [B, H, d_v]; beta_t and g_t: [B, H]; state: [B, H, d_k, d_v]
    (``None`` means zeros). ``o_t = scale * q_t S_t`` is [B, H, d_v]; ``scale`` defaults to
    d_k ** -0.5. The new state has the dtype of the computation (at least float32); ``o_t`` has
    q_t's dtype.
    """
    if q_t.dim() != 3 or q_t.shape != k_t.shape or v_t.shape[:2] != q_t.shape[:2]:
        raise ValueError(f"q_t, k_t must be [B, H, d_k] and v_t [B, H, d_v], got "
                         f"{tuple(q_t.shape)}, {tuple(k_t.shape)}, {tuple(v_t.shape)}")
    for name, x in (("beta_t", beta_t), ("g_t", g_t)):
        if x is not None and x.shape != q_t.shape[:2]:
            raise ValueError(f"{name} must be [B, H] = {list(q_t.shape[:2])}, got {tuple(x.shape)}")
    expected = (*q_t.shape, v_t.shape[-1])
    if state is not None and state.shape != expected:
        raise ValueError(f"state must be [B, H, d_k, d_v] = {list(expected)}, got {tuple(state.shape)}")
    out_dtype, dtype = q_t.dtype, torch.promote_types(q_t.dtype, torch.float32)
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    q_t, k_t, v_t, beta_t = (x.to(dtype) for x in (q_t, k_t, v_t, beta_t))
    if state is None:
        state = torch.zeros(expected, dtype=dtype, device=q_t.device)
    state = state.to(dtype)
    if g_t is not None:
        state = state * g_t.to(dtype).exp()[..., None, None]
    error = v_t - (k_t[..., None, :] @ state).squeeze(-2)
    state = state + (beta_t[..., None, None] * k_t[..., :, None]) * error[..., None, :]
    o_t = scale * (q_t[..., None, :] @ state).squeeze(-2)
    return o_t.to(out_dtype), state
