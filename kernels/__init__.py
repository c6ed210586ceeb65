"""Chunked linear-attention kernels: torch (CPU) and Triton (GPU), with naive references.

One subpackage per recurrence, each with the same layout side by side: ``naive`` (the
token-by-token definition), ``chunk`` (chunk-parallel torch), ``recurrent`` (one step, for
generation) and ``triton_chunk`` (Triton forward and backward).

- :mod:`.gla`: gated linear attention, ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`` —
  ``naive_gla``, ``chunk_gla``, ``gla_step``, ``triton_chunk_gla`` and the dispatcher ``gla``.
- :mod:`.delta_rule`: the (gated) delta rule.

Importing this package imports nothing: triton in particular is loaded only when a Triton kernel
is first used, so the Triton interpreter can still be switched on (TRITON_INTERPRET=1) first.
"""
