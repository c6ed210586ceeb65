"""Gated linear attention (GLA): S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

Shapes are [B, H, T, D]; every form returns ``(o, final_state)`` and takes an optional initial
state [B, H, d_k, d_v].

- :func:`naive_gla` (naive.py): the token-by-token reference, float64.
- :func:`chunk_gla` (chunk.py): chunk-parallel pure torch, differentiable by autograd; the CPU path.
- :func:`gla_step` (recurrent.py): one token with an explicit state, for generation.
- :func:`triton_chunk_gla` (triton_chunk.py): Triton forward and backward kernels; the GPU path.
  Imported on first use, so importing this package never imports triton.
- :func:`gla`: dispatches to Triton for CUDA tensors and to :func:`chunk_gla` otherwise.
"""

from __future__ import annotations

from .chunk import chunk_gla
from .naive import naive_gla
from .recurrent import gla_step

__all__ = ["chunk_gla", "gla", "gla_step", "naive_gla", "triton_chunk_gla"]


def __getattr__(name):
    if name == "triton_chunk_gla":
        from .triton_chunk import triton_chunk_gla
        return triton_chunk_gla
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def gla(q, k, v, g, scale=None, initial_state=None, chunk_size=64):
    """GLA on the best available kernel: Triton when q is on a CUDA device, else :func:`chunk_gla`."""
    if q.is_cuda:
        from .triton_chunk import triton_chunk_gla
        return triton_chunk_gla(q, k, v, g, scale, initial_state, chunk_size)
    return chunk_gla(q, k, v, g, scale, initial_state, chunk_size)
