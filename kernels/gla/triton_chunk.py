"""Chunked gated linear attention as Triton kernels: forward and hand-written backward.

One program per (batch, head) walks the chunks of BT tokens in order, keeping the d_k x d_v
state S on chip (the math is that of :mod:`.chunk`, with B_i the cumulative log gate inside the
chunk). Per chunk the forward computes

    A_ij = sum_d q_id k_jd exp(B_id - B_jd)        (j <= i, one column j per loop step)
    o    = (q * exp(B)) S + A v
    S   <- diag(exp(B_C)) S + (k * exp(B_C - B))^T v

and writes S at every chunk start to a buffer [B, H, N, d_k, d_v] for the backward pass.
Column j of A uses the exponent sum_{s=j+1..i} g_s, a masked cumsum of the chunk's gates, which
is exp of a non-positive number only: no factorisation exp(B_i) exp(-B_j) that would overflow
for gates near 0 (g very negative). The diagonal j = i is q_i . k_i, with no gate.

The backward program walks the chunks in reverse carrying dS, the gradient of the state at the
chunk's end (initially the gradient of the final state), reloads the chunk's start state and
recomputes A. With dA_ij = do_i . v_j, q already scaled and S the chunk's start state (the
returned dq is scale times the dq below):

    dq  = exp(B) * (do S^T) + sum_{j<i} dA_ij k_j exp(B_i - B_j)   [= dq^]  + dA_ii k_i
    dk  = sum_{i>j} dA_ij q_i exp(B_i - B_j)                      [= dk^]  + dA_jj q_j
          + exp(B_C - B_j) * (v_j dS^T)                            [= dk^S]
    dv  = A^T do + (k * exp(B_C - B)) dS
    dS <- diag(exp(B_C)) dS + (q * exp(B))^T do

The gradient of B_i is q_i dq^_i - k_i dk^_i - k_i dk^S_i (i < C), and row C (the chunk's last
real token) also collects exp(B_C) * rowsum(S * dS) + sum_{i<C} k_i dk^S_i; dg is its reversed
cumsum inside the chunk. The terms left out (the diagonal, and row C's own state write) have an
exponent that is identically zero: they would add +y and -y to the same entry, and in float32
the residue would swamp a gate gradient of order exp(g) when gates are near 0.

Limits: chunk_size 16, 32 or 64 (tl.dot needs every dimension >= 16); d_k, d_v at most 128, any
value (padded on chip to a power of two >= 16 and masked) because one program holds the whole
state; float16, bfloat16 and float32 inputs, computed in float32. No autotuning (the autotuner
needs a GPU driver): block sizes are constexpr, so the kernels also run on CPU tensors under
the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import check_chunk_size
from .naive import check_inputs, compute_dtype

CHUNK_SIZES = (16, 32, 64)
MAX_HEAD_DIM = 128


@triton.jit
def _gla_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, states_ptr, final_ptr, T, scale,
                    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    BT: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    qk_base = bh * T * DK
    v_base = bh * T * DV
    state_offsets = ck[:, None] * DV + cv[None, :]
    state_mask = (ck[:, None] < DK) & (cv[None, :] < DV)
    state = tl.load(h0_ptr + bh * DK * DV + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(T, BT)
    for n in range(n_chunks):
        t = n * BT + rows
        mask_k = (t[:, None] < T) & (ck[None, :] < DK)
        mask_v = (t[:, None] < T) & (cv[None, :] < DV)
        offs_k = qk_base + t[:, None] * DK + ck[None, :]
        offs_v = v_base + t[:, None] * DV + cv[None, :]
        q = tl.load(q_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
        k = tl.load(k_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        cumulative = tl.cumsum(g, 0)
        total = tl.sum(g, 0)

        diagonal = rows[:, None] == rows[None, :]
        attn = tl.where(diagonal, tl.sum(q * k, 1)[:, None], 0.0)
        for j in range(BT):
            row_mask = (ck < DK) & (n * BT + j < T)
            k_j = tl.load(k_ptr + qk_base + (n * BT + j) * DK + ck, mask=row_mask, other=0.0).to(tl.float32)
            after = rows[:, None] > j
            decay = tl.exp(tl.where(after, tl.cumsum(tl.where(after, g, 0.0), 0), float("-inf")))
            column = tl.sum(q * decay * k_j[None, :], 1)
            attn += tl.where(rows[None, :] == j, column[:, None], 0.0)

        tl.store(states_ptr + (bh * n_chunks + n) * DK * DV + state_offsets, state, mask=state_mask)
        o = tl.dot(q * tl.exp(cumulative), state, input_precision="ieee") \
            + tl.dot(attn, v, input_precision="ieee")
        tl.store(o_ptr + offs_v, o, mask=mask_v)
        k_out = k * tl.exp(total[None, :] - cumulative)
        state = tl.exp(total)[:, None] * state + tl.dot(tl.trans(k_out), v, input_precision="ieee")
    tl.store(final_ptr + bh * DK * DV + state_offsets, state, mask=state_mask)


@triton.jit
def _gla_bwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dfinal_ptr, states_ptr,
                    dq_ptr, dk_ptr, dv_ptr, dg_ptr, dh0_ptr, T, scale,
                    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    BT: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    qk_base = bh * T * DK
    v_base = bh * T * DV
    state_offsets = ck[:, None] * DV + cv[None, :]
    state_mask = (ck[:, None] < DK) & (cv[None, :] < DV)
    d_state = tl.load(dfinal_ptr + bh * DK * DV + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(T, BT)
    for step in range(n_chunks):
        n = n_chunks - 1 - step
        last = rows[:, None] == tl.minimum(BT - 1, T - 1 - n * BT)  # the chunk's last real token
        t = n * BT + rows
        mask_k = (t[:, None] < T) & (ck[None, :] < DK)
        mask_v = (t[:, None] < T) & (cv[None, :] < DV)
        offs_k = qk_base + t[:, None] * DK + ck[None, :]
        offs_v = v_base + t[:, None] * DV + cv[None, :]
        q = tl.load(q_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
        k = tl.load(k_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        state = tl.load(states_ptr + (bh * n_chunks + n) * DK * DV + state_offsets, mask=state_mask, other=0.0)
        cumulative = tl.cumsum(g, 0)
        total = tl.sum(g, 0)

        # Strictly lower parts of A, dq, dk (pairs j < i), one column j at a time.
        attn = tl.zeros([BT, BT], dtype=tl.float32)
        dq = tl.zeros([BT, BK], dtype=tl.float32)
        dk = tl.zeros([BT, BK], dtype=tl.float32)
        for j in range(BT):
            row = n * BT + j
            k_j = tl.load(k_ptr + qk_base + row * DK + ck, mask=(ck < DK) & (row < T), other=0.0).to(tl.float32)
            v_j = tl.load(v_ptr + v_base + row * DV + cv, mask=(cv < DV) & (row < T), other=0.0).to(tl.float32)
            after = rows[:, None] > j
            decay = tl.exp(tl.where(after, tl.cumsum(tl.where(after, g, 0.0), 0), float("-inf")))
            q_decay = q * decay
            attn += tl.where(rows[None, :] == j, tl.sum(q_decay * k_j[None, :], 1)[:, None], 0.0)
            d_attn = tl.sum(do * v_j[None, :], 1)  # dA[:, j]; rows i <= j are zeroed by decay
            dq += d_attn[:, None] * decay * k_j[None, :]
            dk += tl.where(rows[:, None] == j, tl.sum(d_attn[:, None] * q_decay, 0)[None, :], 0.0)

        decay_in = tl.exp(cumulative)
        decay_out = tl.exp(total[None, :] - cumulative)
        dq += decay_in * tl.dot(do, tl.trans(state), input_precision="ieee")
        dk_state = decay_out * tl.dot(v, tl.trans(d_state), input_precision="ieee")
        written = tl.where(last, 0.0, k * dk_state)  # k_i * exp(B_C - B_i) * (v_i dS^T), i < C
        into_last = tl.exp(total) * tl.sum(state * d_state, 1) + tl.sum(written, 0)
        d_cumulative = q * dq - k * dk - written + tl.where(last, into_last[None, :], 0.0)
        dg = tl.cumsum(d_cumulative, 0, reverse=True)

        diagonal = rows[:, None] == rows[None, :]
        attn += tl.where(diagonal, tl.sum(q * k, 1)[:, None], 0.0)
        d_diagonal = tl.sum(do * v, 1)[:, None]
        dv = tl.dot(tl.trans(attn), do, input_precision="ieee") \
            + tl.dot(k * decay_out, d_state, input_precision="ieee")
        tl.store(dq_ptr + offs_k, (dq + d_diagonal * k) * scale, mask=mask_k)
        tl.store(dk_ptr + offs_k, dk + d_diagonal * q + dk_state, mask=mask_k)
        tl.store(dv_ptr + offs_v, dv, mask=mask_v)
        tl.store(dg_ptr + offs_k, dg, mask=mask_k)
        d_state = tl.exp(total)[:, None] * d_state + tl.dot(tl.trans(q * decay_in), do, input_precision="ieee")
    tl.store(dh0_ptr + bh * DK * DV + state_offsets, d_state, mask=state_mask)


def _block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


class TritonChunkGLA(torch.autograd.Function):
    """Autograd wrapper: both passes are the kernels above; tensors are [B, H, T, D], contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, chunk_size):
        batch, heads, length, d_k = q.shape
        d_v = v.shape[-1]
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        n_chunks = triton.cdiv(length, chunk_size)
        fp32 = dict(dtype=torch.float32, device=q.device)
        h0 = (torch.zeros(batch, heads, d_k, d_v, **fp32) if initial_state is None
              else initial_state.to(torch.float32).contiguous())
        o = torch.empty(batch, heads, length, d_v, **fp32)
        states = torch.empty(batch, heads, n_chunks, d_k, d_v, **fp32)
        final = torch.empty(batch, heads, d_k, d_v, **fp32)
        _gla_fwd_kernel[(batch * heads,)](q, k, v, g, h0, o, states, final, length, scale,
                                          DK=d_k, DV=d_v, BK=_block(d_k), BV=_block(d_v), BT=chunk_size)
        ctx.save_for_backward(q, k, v, g, states)
        ctx.scale, ctx.chunk_size, ctx.has_initial_state = scale, chunk_size, initial_state is not None
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return o.to(q.dtype), final

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, g, states = ctx.saved_tensors
        batch, heads, length, d_k = q.shape
        d_v = v.shape[-1]
        fp32 = dict(dtype=torch.float32, device=q.device)
        d_o, d_final = d_o.contiguous(), d_final.to(torch.float32).contiguous()  # zeros if unused
        dq, dk, dg = (torch.empty(q.shape, **fp32) for _ in range(3))
        dv = torch.empty(v.shape, **fp32)
        dh0 = torch.empty(batch, heads, d_k, d_v, **fp32)
        _gla_bwd_kernel[(batch * heads,)](q, k, v, g, d_o, d_final, states, dq, dk, dv, dg, dh0,
                                          length, ctx.scale, DK=d_k, DV=d_v, BK=_block(d_k),
                                          BV=_block(d_v), BT=ctx.chunk_size)
        dh0 = dh0.to(ctx.initial_dtype) if ctx.has_initial_state else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), None, dh0, None


def triton_chunk_gla(q, k, v, g, scale=None, initial_state=None, chunk_size=64):
    """Chunked GLA with Triton forward and backward; returns ``(o, final_state)``.

    Same contract as :func:`.chunk.chunk_gla` (``o`` in q's dtype, the final state in float32),
    within the limits in the module docstring; raises ``ValueError`` outside them.
    """
    check_inputs(q, k, v, g, initial_state)
    check_chunk_size(chunk_size)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"triton_chunk_gla: chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
    d_k, d_v = q.shape[-1], v.shape[-1]
    if max(d_k, d_v) > MAX_HEAD_DIM:
        raise ValueError(f"triton_chunk_gla: d_k and d_v must be at most {MAX_HEAD_DIM} "
                         f"(one program holds the d_k x d_v state), got d_k={d_k}, d_v={d_v}")
    if compute_dtype(q.dtype) != torch.float32:
        raise ValueError(f"triton_chunk_gla: inputs must be float16, bfloat16 or float32, got {q.dtype}")
    scale = d_k ** -0.5 if scale is None else float(scale)
    return TritonChunkGLA.apply(q, k, v, g, scale, initial_state, chunk_size)
