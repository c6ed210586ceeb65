"""The delta-rule family: DeltaNet and Gated DeltaNet as one kernel set with an optional gate.

    S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    o_t = scale * q_t S_t

with a_t = exp(g_t) for Gated DeltaNet and a_t = 1 (``g=None``) for DeltaNet. Keys are
L2-normalised by the caller. Shapes: q, k [B, H, T, d_k], v [B, H, T, d_v], beta and g [B, H, T],
state [B, H, d_k, d_v]; every sequence function returns ``(o, final_state)``.

- :func:`naive_delta_rule`: the definition, token by token (reference, float64-capable).
- :func:`chunk_delta_rule`: chunk-parallel pure torch (WY / UT representation), autograd.
- :func:`delta_rule_step`: one token, for generation.
- :func:`triton_chunk_delta_rule`: Triton forward and backward kernels (GPU, or CPU under
  ``TRITON_INTERPRET=1``); triton is imported only when this name is first used.
- :func:`delta_rule`: Triton on CUDA tensors, the torch chunked kernel otherwise.
"""

from __future__ import annotations

from .chunk import chunk_delta_rule
from .naive import naive_delta_rule
from .recurrent import delta_rule_step

__all__ = ["chunk_delta_rule", "delta_rule", "delta_rule_step", "naive_delta_rule", "triton_chunk_delta_rule"]


def __getattr__(name):
    if name == "triton_chunk_delta_rule":
        from .triton_chunk import triton_chunk_delta_rule

        return triton_chunk_delta_rule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, chunk_size=64):
    """Dispatch: :func:`triton_chunk_delta_rule` when ``q.is_cuda``, else :func:`chunk_delta_rule`."""
    if q.is_cuda:
        from .triton_chunk import triton_chunk_delta_rule

        return triton_chunk_delta_rule(q, k, v, beta, g, scale, initial_state, chunk_size)
    return chunk_delta_rule(q, k, v, beta, g, scale, initial_state, chunk_size)
