"""Reference delta rule: the recurrence as written, one token at a time.

Per batch b and head h, with the state S_t in R^{d_k x d_v} and row vectors q_t, k_t in R^{d_k},
v_t in R^{d_v}, a write strength beta_t in (0, 1) and an optional decay a_t = exp(g_t) in (0, 1]
(g_t <= 0, given in log space):

    S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t        o_t = scale * q_t S_t

With no gate (a_t = 1) this is DeltaNet; with it, Gated DeltaNet. ``I - beta k^T k`` is a
contraction only when ||k_t|| = 1: every kernel here assumes the caller (the layer) has
L2-normalised the keys and does not check it.

This module builds the d_k x d_k transition matrix ``a_t (I - beta_t k_t^T k_t)`` literally, which
costs O(d_k^2 d_v) per token. That is deliberate: it is the definition, not the rank-1 update that
:func:`~.recurrent.delta_rule_step` uses, so the two check each other and both check the chunked
kernels. It runs in whatever dtype it is given (float64 for tight comparisons).

It also holds :func:`check_inputs`, the shape contract every implementation enforces.
"""

from __future__ import annotations

import torch


def check_inputs(q, k, v, beta, g=None, initial_state=None) -> None:
    """Raise ``ValueError`` unless the shapes fit the contract.

    q, k: [B, H, T, d_k]; v: [B, H, T, d_v]; beta and g: [B, H, T];
    initial_state: [B, H, d_k, d_v].
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, heads, length, d_k = q.shape
    if v.shape[:3] != (batch, heads, length):
        raise ValueError(f"v must be [B, H, T, d_v] = [{batch}, {heads}, {length}, d_v], got {tuple(v.shape)}")
    for name, x in (("beta", beta), ("g", g)):
        if x is not None and x.shape != (batch, heads, length):
            raise ValueError(f"{name} must be [B, H, T] = [{batch}, {heads}, {length}], got {tuple(x.shape)}")
    expected = (batch, heads, d_k, v.shape[-1])
    if initial_state is not None and initial_state.shape != expected:
        raise ValueError(f"initial_state must be [B, H, d_k, d_v] = {list(expected)}, "
                         f"got {tuple(initial_state.shape)}")


def naive_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None):
    """Run the (gated) delta rule token by token; return ``(o, final_state)``.

    Shapes as in :func:`check_inputs`; ``o`` is [B, H, T, d_v]. ``scale`` defaults to d_k ** -0.5,
    ``initial_state`` to zeros. Computes in the inputs' dtype (at least float32).
    """
    check_inputs(q, k, v, beta, g, initial_state)
    batch, heads, length, d_k = q.shape
    out_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    scale = d_k ** -0.5 if scale is None else scale
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    state = (torch.zeros(batch, heads, d_k, v.shape[-1], dtype=dtype, device=q.device)
             if initial_state is None else initial_state.to(dtype))
    eye = torch.eye(d_k, dtype=dtype, device=q.device)
    outputs = []
    for t in range(length):
        k_t, beta_t = k[:, :, t], beta[:, :, t, None, None]
        transition = eye - beta_t * k_t[..., :, None] * k_t[..., None, :]
        if g is not None:
            transition = transition * g[:, :, t, None, None].to(dtype).exp()
        state = transition @ state + beta_t * k_t[..., :, None] * v[:, :, t, None, :]
        outputs.append(scale * (q[:, :, t, None, :] @ state).squeeze(-2))
    return torch.stack(outputs, dim=2).to(out_dtype), state
