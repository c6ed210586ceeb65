"""Chunked (gated) delta rule as Triton kernels: forward and backward.

Same algorithm and notation as :mod:`.chunk` (read its docstring first). One program per
(batch, head) walks the chunks in order, keeping the d_k x d_v state on chip:

forward, per chunk n with start state S (stored to ``states[n]`` for the backward):
    T = (I + L)^{-1} by forward substitution in registers (row i = e_i - L[i, :] T),
    U~ = T diag(beta) V,  W = T diag(beta gamma) K,  U = U~ - W S,
    O = diag(gamma) Q S + (Tril(Q K^T) * Gamma) U,   S <- gamma_C S + K^^T U.

backward, chunks in reverse, carrying dS = dLoss/d(state at the end of the chunk), which starts
as the gradient of the returned final state: the chunk's quantities are recomputed from the
saved start state S, then the chunk's forward is differentiated step by step:

    dU  = P^T dO + K^ dS                              (P = Tril(Q K^T) * Gamma, K^ = diag(exp(G_C - G)) K)
    dS_start = (diag(gamma) Q)^T dO + gamma_C dS - W^T dU
    dW  = -dU S^T;  for a solve X = T B: dB = T^T dX and dL = -StrictTril(dB X^T), summed over
          both solves (X = U~ with B = diag(beta) V, X = W with B = diag(beta gamma) K)
    dQ, dK, dV, dbeta by the product rule through O, P, L, U~, W and K^;
    dG (cumulative log decay) collects d/dG of gamma_t, Gamma_ti = exp(G_t - G_i) (row sum minus
    column sum of dGamma * Gamma) and of gamma_C and K^ (which depend on the chunk's last G_C);
    dg = reverse cumulative sum of dG within the chunk.

The gate-free case (DeltaNet) runs the same code with g = 0 (Gamma = gamma = 1), so there is one
kernel pair for both; ``HAS_G`` only decides whether g is read and dg written (the compiler then
drops the dG terms, which nothing uses).

Limits (checked in :func:`triton_chunk_delta_rule`): chunk_size is 16, 32 or 64 and d_k, d_v are
at most 128 (padded to powers of two >= 16, as tl.dot needs), since one program keeps the whole
state and a chunk's tiles in registers; tensors are float32, bfloat16 or float16 and computed in
float32 (tl.dot with ``input_precision="ieee"``, no TF32), the final state is float32. No
autotuning: the block sizes are constexpr, so the kernels also run under ``TRITON_INTERPRET=1``
on CPU tensors, which is how they are tested on machines without a GPU. Parallelism is one
program per (batch, head): correct first, not yet tuned on a GPU (splitting d_v across programs
in the forward, num_warps and a blocked triangular solve are the obvious next steps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import check_chunk_size
from .naive import check_inputs

MAX_HEAD_DIM = 128
CHUNK_SIZES = (16, 32, 64)


@triton.jit
def _load_rows(ptr, bh, rows, cols, T, D: tl.constexpr):
    """Load a [len(rows), len(cols)] tile of a contiguous [B*H, T, D] tensor as float32, zero-padded."""
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    return tl.load(ptr + (bh * T + rows[:, None]) * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _chunk_ut(q, k, v, beta, g, bh, n, T, scale,
              DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
              BV: tl.constexpr, HAS_G: tl.constexpr):
    """Load chunk n and compute its state-independent quantities (see the module docstring).

    Returns Q (scaled), K, V, beta, G (cumulative log decay), G_C, Gamma (zero above the
    diagonal), K K^T, T = (I + L)^{-1}, U~ and W.
    """
    local = tl.arange(0, BT)
    rows = n * BT + local
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    q_c = _load_rows(q, bh, rows, rk, T, DK) * scale
    k_c = _load_rows(k, bh, rows, rk, T, DK)
    v_c = _load_rows(v, bh, rows, rv, T, DV)
    b = tl.load(beta + bh * T + rows, mask=rows < T, other=0.0).to(tl.float32)
    if HAS_G:
        g_c = tl.load(g + bh * T + rows, mask=rows < T, other=0.0).to(tl.float32)
    else:
        g_c = tl.zeros([BT], dtype=tl.float32)
    G = tl.cumsum(g_c, 0)
    G_end = tl.sum(g_c, 0)
    causal = local[:, None] >= local[None, :]
    decay = tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
    kk = tl.dot(k_c, tl.trans(k_c), input_precision="ieee")
    strict = tl.where(local[:, None] > local[None, :], b[:, None] * kk * decay, 0.0)
    # Forward substitution: rows of T below i are still identity rows, and L[i, j] = 0 for j >= i.
    t_inv = tl.where(local[:, None] == local[None, :], 1.0, 0.0)
    for i in range(1, BT):
        l_i = tl.sum(tl.where(local[:, None] == i, strict, 0.0), axis=0)
        t_inv = tl.where(local[:, None] == i, t_inv - tl.sum(l_i[:, None] * t_inv, axis=0)[None, :], t_inv)
    u_tilde = tl.dot(t_inv, b[:, None] * v_c, input_precision="ieee")
    w = tl.dot(t_inv, (b * tl.exp(G))[:, None] * k_c, input_precision="ieee")
    return q_c, k_c, v_c, b, G, G_end, decay, kk, t_inv, u_tilde, w


@triton.jit
def _state_offsets(DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    return rk[:, None] * DV + rv[None, :], (rk[:, None] < DK) & (rv[None, :] < DV)


@triton.jit
def _fwd_kernel(q, k, v, beta, g, s0, o, s_final, states, T, scale,
                DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, HAS_G: tl.constexpr, HAS_S0: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    n_chunks = tl.cdiv(T, BT)
    s_offs, s_mask = _state_offsets(DK, DV, BK, BV)
    if HAS_S0:
        S = tl.load(s0 + bh * DK * DV + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    rv = tl.arange(0, BV)
    for n in range(n_chunks):
        tl.store(states + (bh * n_chunks + n) * DK * DV + s_offs, S, mask=s_mask)
        q_c, k_c, v_c, b, G, G_end, decay, kk, t_inv, u_tilde, w = _chunk_ut(
            q, k, v, beta, g, bh, n, T, scale, DK, DV, BT, BK, BV, HAS_G)
        u = u_tilde - tl.dot(w, S, input_precision="ieee")
        p = tl.dot(q_c, tl.trans(k_c), input_precision="ieee") * decay
        o_c = tl.exp(G)[:, None] * tl.dot(q_c, S, input_precision="ieee") + tl.dot(p, u, input_precision="ieee")
        rows = n * BT + tl.arange(0, BT)
        tl.store(o + (bh * T + rows[:, None]) * DV + rv[None, :], o_c,
                 mask=(rows[:, None] < T) & (rv[None, :] < DV))
        k_end = k_c * tl.exp(G_end - G)[:, None]
        S = tl.exp(G_end) * S + tl.dot(tl.trans(k_end), u, input_precision="ieee")
    tl.store(s_final + bh * DK * DV + s_offs, S, mask=s_mask)


@triton.jit
def _bwd_kernel(q, k, v, beta, g, states, do, ds_final, dq, dk, dv, dbeta, dg, ds0, T, scale,
                DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, HAS_G: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    n_chunks = tl.cdiv(T, BT)
    s_offs, s_mask = _state_offsets(DK, DV, BK, BV)
    dS = tl.load(ds_final + bh * DK * DV + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    local = tl.arange(0, BT)
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    for back in range(n_chunks):
        n = n_chunks - 1 - back
        S = tl.load(states + (bh * n_chunks + n) * DK * DV + s_offs, mask=s_mask, other=0.0)
        q_c, k_c, v_c, b, G, G_end, decay, kk, t_inv, u_tilde, w = _chunk_ut(
            q, k, v, beta, g, bh, n, T, scale, DK, DV, BT, BK, BV, HAS_G)
        rows = n * BT + local
        do_c = _load_rows(do, bh, rows, rv, T, DV)
        gamma = tl.exp(G)
        to_end = tl.exp(G_end - G)
        u = u_tilde - tl.dot(w, S, input_precision="ieee")
        qk = tl.dot(q_c, tl.trans(k_c), input_precision="ieee")
        p = qk * decay
        k_end = k_c * to_end[:, None]

        # Output O = diag(gamma) Q S + P U and end state S' = gamma_C S + K^^T U.
        du = tl.dot(tl.trans(p), do_c, input_precision="ieee") + tl.dot(k_end, dS, input_precision="ieee")
        dp = tl.dot(do_c, tl.trans(u), input_precision="ieee") * decay
        dqs = tl.dot(do_c, tl.trans(S), input_precision="ieee")
        dq_c = gamma[:, None] * dqs + tl.dot(dp, k_c, input_precision="ieee")
        dk_c = tl.dot(tl.trans(dp), q_c, input_precision="ieee")
        dG = gamma * tl.sum(dqs * q_c, axis=1)
        d_pair = dp * qk  # dLoss/dGamma_ij * Gamma_ij, from P
        dk_end = tl.dot(u, tl.trans(dS), input_precision="ieee")
        dk_c += to_end[:, None] * dk_end
        from_end = to_end * tl.sum(k_c * dk_end, axis=1)
        dG -= from_end
        dG_end = tl.sum(from_end, axis=0) + tl.exp(G_end) * tl.sum(tl.sum(S * dS, axis=1), axis=0)
        dS_start = (tl.dot(tl.trans(gamma[:, None] * q_c), do_c, input_precision="ieee")
                    + tl.exp(G_end) * dS - tl.dot(tl.trans(w), du, input_precision="ieee"))

        # U = U~ - W S with U~ = T diag(beta) V, W = T diag(beta gamma) K, T = (I + L)^{-1}.
        dw = -tl.dot(du, tl.trans(S), input_precision="ieee")
        db_v = tl.dot(tl.trans(t_inv), du, input_precision="ieee")
        db_k = tl.dot(tl.trans(t_inv), dw, input_precision="ieee")
        dv_c = b[:, None] * db_v
        k_dot = tl.sum(db_k * k_c, axis=1)
        db = tl.sum(db_v * v_c, axis=1) + gamma * k_dot
        dk_c += (b * gamma)[:, None] * db_k
        dG += b * gamma * k_dot

        # L = StrictTril(diag(beta) (K K^T * Gamma)).
        dl = -(tl.dot(db_v, tl.trans(u_tilde), input_precision="ieee")
               + tl.dot(db_k, tl.trans(w), input_precision="ieee"))
        dl = tl.where(local[:, None] > local[None, :], dl, 0.0)
        db += tl.sum(dl * kk * decay, axis=1)
        e = b[:, None] * dl * decay
        dk_c += tl.dot(e, k_c, input_precision="ieee") + tl.dot(tl.trans(e), k_c, input_precision="ieee")
        d_pair += e * kk

        mask_k = (rows[:, None] < T) & (rk[None, :] < DK)
        offs_k = (bh * T + rows[:, None]) * DK + rk[None, :]
        tl.store(dq + offs_k, dq_c * scale, mask=mask_k)
        tl.store(dk + offs_k, dk_c, mask=mask_k)
        tl.store(dv + (bh * T + rows[:, None]) * DV + rv[None, :], dv_c,
                 mask=(rows[:, None] < T) & (rv[None, :] < DV))
        tl.store(dbeta + bh * T + rows, db, mask=rows < T)
        if HAS_G:
            # Gamma_ij = exp(G_i - G_j): +row sums, -column sums; then g -> G is a cumulative sum.
            dG += tl.sum(d_pair, axis=1) - tl.sum(d_pair, axis=0)
            dg_c = tl.sum(tl.where(local[None, :] >= local[:, None], dG[None, :], 0.0), axis=1) + dG_end
            tl.store(dg + bh * T + rows, dg_c, mask=rows < T)
        dS = dS_start
    tl.store(ds0 + bh * DK * DV + s_offs, dS, mask=s_mask)


def _block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


class _TritonChunkDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, chunk_size):
        batch, heads, length, d_k = q.shape
        d_v = v.shape[-1]
        n_chunks = triton.cdiv(length, chunk_size)
        o = torch.empty_like(v, dtype=q.dtype)
        final_state = torch.empty(batch, heads, d_k, d_v, dtype=torch.float32, device=q.device)
        states = torch.empty(batch * heads, n_chunks, d_k, d_v, dtype=torch.float32, device=q.device)
        _fwd_kernel[(batch * heads,)](
            q, k, v, beta, g, initial_state, o, final_state, states, length, scale,
            DK=d_k, DV=d_v, BT=chunk_size, BK=_block(d_k), BV=_block(d_v),
            HAS_G=g is not None, HAS_S0=initial_state is not None)
        ctx.save_for_backward(q, k, v, beta, g, initial_state, states)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, final_state

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, beta, g, initial_state, states = ctx.saved_tensors
        batch, heads, length, d_k = q.shape
        d_v = v.shape[-1]
        dq, dk, dv, dbeta = (torch.empty_like(x) for x in (q, k, v, beta))
        dg = None if g is None else torch.empty_like(g)
        ds0 = torch.empty(batch, heads, d_k, d_v, dtype=torch.float32, device=q.device)
        _bwd_kernel[(batch * heads,)](
            q, k, v, beta, g, states, do.contiguous(), d_final_state.contiguous(),
            dq, dk, dv, dbeta, dg, ds0, length, ctx.scale,
            DK=d_k, DV=d_v, BT=ctx.chunk_size, BK=_block(d_k), BV=_block(d_v), HAS_G=g is not None)
        ds0 = None if initial_state is None else ds0.to(initial_state.dtype)
        return dq, dk, dv, dbeta, dg, ds0, None, None


def triton_chunk_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, chunk_size=64):
    """Chunked (gated) delta rule with Triton forward and backward; returns ``(o, final_state)``.

    Same contract as :func:`.chunk.chunk_delta_rule` within the limits in the module docstring;
    differentiable w.r.t. q, k, v, beta, g and initial_state. ``final_state`` is float32.
    """
    check_inputs(q, k, v, beta, g, initial_state)
    check_chunk_size(chunk_size)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"triton_chunk_delta_rule supports chunk_size in {CHUNK_SIZES}, got {chunk_size}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"triton_chunk_delta_rule supports d_k, d_v <= {MAX_HEAD_DIM}, "
                         f"got {q.shape[-1]} and {v.shape[-1]}")
    for x in (q, k, v, beta, g, initial_state):
        if x is not None and x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"triton_chunk_delta_rule takes float32, bfloat16 or float16, got {x.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, beta, g, initial_state = (None if x is None else x.contiguous()
                                       for x in (q, k, v, beta, g, initial_state))
    return _TritonChunkDeltaRule.apply(q, k, v, beta, g, initial_state, scale, chunk_size)
