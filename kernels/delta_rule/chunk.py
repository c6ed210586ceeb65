"""Chunk-parallel (gated) delta rule in pure torch, via the WY / UT representation.

The recurrence (see :mod:`.naive`) is sequential in t because the write at step t depends on what
S_{t-1} returns for k_t. Splitting the sequence into chunks of C tokens makes everything but one
small state update per chunk parallel (Yang et al., "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length", 2024; the gate as in Gated DeltaNet, Yang et al., 2025).

Inside one chunk, starting from the state S_0, write the update as

    S_t = a_t S_{t-1} + k_t^T u_t,     u_t = beta_t (v_t - a_t k_t S_{t-1})

(u_t is the "pseudo-value" actually written). With the cumulative log decay inside the chunk
G_t = g_1 + ... + g_t, gamma_t = exp(G_t) and Gamma_ti = exp(G_t - G_i), unrolling gives
a_t S_{t-1} = gamma_t S_0 + sum_{i<t} Gamma_ti k_i^T u_i, hence for all t at once

    (I + L) U = diag(beta) V - diag(beta * gamma) K S_0,   L = StrictTril(diag(beta) (K K^T * Gamma))

and with the UT transform T = (I + L)^{-1} (a unit lower-triangular solve):

    U = U~ - W S_0,          U~ = T diag(beta) V,   W = T diag(beta * gamma) K
    O = scale [diag(gamma) Q S_0 + (Tril(Q K^T) * Gamma) U]
    S_C = gamma_C S_0 + K^^T U,    K^ = diag(exp(G_C - G_i)) K  (keys decayed to the chunk end)

U~, W and the masked Q K^T depend only on the chunk's own tokens, so they are computed for all
chunks in a batch. What remains sequential is S_{n+1} = gamma_C S_n + K^_n^T (U~_n - W_n S_n),
two small matmuls per chunk instead of a d_k x d_v update per token.

Numerical stability of the gate: only exp(G_t - G_i) with t >= i (and exp(G_C - G_i)) ever
appears, and since g <= 0 these are in (0, 1]. Nothing divides by gamma_i, which would overflow
for strong decay over a long chunk; the upper triangle of G_t - G_i is set to -inf before the
exponential, so neither the values nor the gradients see exp of a positive number. DeltaNet is the
gate-free case (Gamma = 1, gamma = 1) and skips those products.

A sequence length T that is not a multiple of C is padded with q = k = v = 0, beta = 0, g = 0: a
padded token writes u = 0 and does not decay, so the state is unchanged and the extra outputs
are dropped. Keys are assumed L2-normalised by the caller. Every step is a differentiable torch
op, so autograd provides the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import check_inputs


def check_chunk_size(chunk_size) -> None:
    """Raise ``ValueError`` unless ``chunk_size`` is a positive power of two."""
    if not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size!r}")


def chunk_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, chunk_size=64):
    """Chunked (gated) delta rule; returns ``(o, final_state)`` like :func:`.naive.naive_delta_rule`.

    q, k: [B, H, T, d_k]; v: [B, H, T, d_v]; beta, g (log decay, <= 0): [B, H, T];
    initial_state: [B, H, d_k, d_v] or ``None`` (zeros). Computes in at least float32 with
    autocast off (the triangular solve needs the precision); ``o`` has q's dtype.
    """
    check_inputs(q, k, v, beta, g, initial_state)
    check_chunk_size(chunk_size)
    batch, heads, length, d_k = q.shape
    d_v = v.shape[-1]
    out_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    scale = d_k ** -0.5 if scale is None else scale
    pad = -length % chunk_size

    def chunked(x):  # [B, H, T, ...] -> [B, H, N, C, ...], zero-padded along T
        x = x.to(dtype)
        x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.unflatten(2, (-1, chunk_size))

    with torch.autocast(q.device.type, enabled=False):
        q, k, v, beta = chunked(q) * scale, chunked(k), chunked(v), chunked(beta)[..., None]
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
        kk = k @ k.mT
        qk = (q @ k.mT).masked_fill(~causal, 0.0)
        k_write = beta * k  # rows of diag(beta [* gamma]) K
        if g is None:
            k_to_end, chunk_decay = k, None
        else:
            log_decay = chunked(g).cumsum(-1)  # G_t within each chunk
            gamma = log_decay.exp()[..., None]
            pair_decay = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, -torch.inf).exp()
            kk, qk = kk * pair_decay, qk * pair_decay
            q, k_write = q * gamma, k_write * gamma
            k_to_end = k * (log_decay[..., -1:] - log_decay).exp()[..., None]
            chunk_decay = log_decay[..., -1].exp()[..., None, None]  # gamma_C per chunk
        strict = (beta * kk).tril(-1)
        solved = torch.linalg.solve_triangular(strict, torch.cat([beta * v, k_write], dim=-1),
                                               upper=False, unitriangular=True)
        u_tilde, w = solved.split([d_v, d_k], dim=-1)

        state = (torch.zeros(batch, heads, d_k, d_v, dtype=dtype, device=q.device)
                 if initial_state is None else initial_state.to(dtype))
        starts, writes = [], []
        for n in range(q.shape[2]):
            starts.append(state)
            u = u_tilde[:, :, n] - w[:, :, n] @ state
            writes.append(u)
            if chunk_decay is not None:
                state = state * chunk_decay[:, :, n]
            state = state + k_to_end[:, :, n].mT @ u
        o = q @ torch.stack(starts, dim=2) + qk @ torch.stack(writes, dim=2)
    return o.flatten(2, 3)[:, :, :length].to(out_dtype), state
