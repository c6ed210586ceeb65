"""Reference gated linear attention (GLA): the recurrence as written, one token at a time.

Per batch b and head h, with the state S_t in R^{d_k x d_v}, row vectors q_t, k_t in R^{d_k} and
v_t in R^{d_v}, and a per-channel forget gate a_t = exp(g_t) in (0, 1]^{d_k} given in log space
(g_t <= 0):

    S_t = diag(a_t) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

(Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training", 2024.)
``scale`` defaults to d_k ** -0.5 and S_0 to zeros. This loop costs O(T d_k d_v) sequential work
and is the definition the chunked and Triton kernels are checked against, so it computes in
float64 whatever it is given.

It also holds the contract every form shares: :func:`check_inputs` (shapes) and the dtype rule
(:func:`compute_dtype`): work in at least float32, return ``o`` in q's dtype and the state in the
dtype of the computation.
"""

from __future__ import annotations

import torch


def check_inputs(q, k, v, g, initial_state=None) -> None:
    """Raise ``ValueError`` unless the shapes fit the contract.

    q, k, g: [B, H, T, d_k]; v: [B, H, T, d_v]; initial_state: [B, H, d_k, d_v] or ``None``.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    for name, x in (("k", k), ("g", g)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
    batch, heads, length, d_k = q.shape
    if v.shape[:3] != (batch, heads, length):
        raise ValueError(f"v must be [B, H, T, d_v] = [{batch}, {heads}, {length}, d_v], got {tuple(v.shape)}")
    expected = (batch, heads, d_k, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state must be [B, H, d_k, d_v] = {list(expected)}, "
                         f"got {tuple(initial_state.shape)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels work in: float64 stays, anything narrower becomes float32."""
    return torch.promote_types(dtype, torch.float32)


def naive_gla(q, k, v, g, scale=None, initial_state=None):
    """Run the recurrence token by token in float64; return ``(o, final_state)``.

    q, k, g: [B, H, T, d_k]; v: [B, H, T, d_v]; initial_state: [B, H, d_k, d_v] or ``None``.
    ``o`` [B, H, T, d_v] has q's dtype, the state [B, H, d_k, d_v] the dtype of
    :func:`compute_dtype`. Differentiable by autograd.
    """
    check_inputs(q, k, v, g, initial_state)
    batch, heads, length, d_k = q.shape
    out_dtype, state_dtype = q.dtype, compute_dtype(q.dtype)
    scale = d_k ** -0.5 if scale is None else scale
    q, k, v, g = (x.double() for x in (q, k, v, g))
    state = (q.new_zeros(batch, heads, d_k, v.shape[-1]) if initial_state is None
             else initial_state.double())
    outputs = []
    for t in range(length):
        state = g[:, :, t, :, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(scale * (q[:, :, t, None, :] @ state).squeeze(-2))
    o = torch.stack(outputs, dim=2) if outputs else v.new_zeros(batch, heads, 0, v.shape[-1])
    return o.to(out_dtype), state.to(state_dtype)
