"""Chunk-parallel gated linear attention in pure torch (autograd provides the backward pass).

Split the sequence into chunks of C tokens. Inside a chunk, let B_i = g_1 + ... + g_i be the
cumulative log gate from the chunk start to token i (inclusive, a vector over d_k). Unrolling
S_t = diag(a_t) S_{t-1} + k_t^T v_t from the chunk's start state S gives, for every token at once,

    o_i = scale * [ (q_i * exp(B_i)) S  +  sum_{j <= i} A_ij v_j ],
    A_ij = sum_d q_id k_jd exp(B_id - B_jd)
    S'   = diag(exp(B_C)) S + sum_j (k_j * exp(B_C - B_j))^T v_j

Everything but the hand-off S -> S' (a decay and an add per chunk) is parallel over tokens and
chunks.

Stability. Since g <= 0, every factor above is exp of a non-positive number, but the usual
rewrite A = (Q * exp(B)) (K * exp(-B))^T is not: exp(-B_j) overflows float32 once B_j < -88
(a gate of exp(-20) does that in five tokens). Here no exp of a positive number is ever formed.
A is built by recursive halving (secondary chunking down to single tokens): every pair j < i of
a chunk lies in the two halves L (holding j) and R (holding i) of exactly one block of the
binary split, and at the boundary m between those halves

    exp(B_i - B_j) = exp(b_i) * exp(t_j),   b_i = g_{m+1} + ... + g_i,   t_j = g_{j+1} + ... + g_m

so the block A_RL is one matmul (q_R * exp(b_R)) (k_L * exp(t_L))^T of two factors in (0, 1]; a
product that underflows to 0 was below float32's range anyway. The diagonal is q_i . k_i. The
state update uses exp(B_C) and exp(B_C - B_j), the latter also summed from j+1 to C directly (a
reversed cumsum). Per level this costs O(T d_k) elementwise work plus matmuls, log2(C) levels.

No exponent is ever a difference of two cumulative sums. That also keeps the gate gradient
accurate for gates near 0: an exponent that is identically zero (j = i, or j = C) computed as
B_j - B_j would make autograd add +y - y, with y of order 1, to the gradient of g, and the
rounding residue would swamp the true gradient, which is of order exp(g).

A sequence length T that is not a multiple of C is zero-padded (q = k = v = 0, g = 0): a padded
token writes nothing and does not decay, so the state is unchanged; its outputs are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import check_inputs, compute_dtype


def check_chunk_size(chunk_size) -> None:
    """Raise ``ValueError`` unless ``chunk_size`` is a positive power of two."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size!r}")


def _suffix_sum(x):
    """sum_{s > j} x_s along dim -2 (exclusive, reversed cumsum; the last row is exactly 0)."""
    return F.pad(x[..., 1:, :].flip(-2).cumsum(-2).flip(-2), (0, 0, 0, 1))


def _intra_chunk(q, k, g):
    """A_ij = sum_d q_id k_jd exp(B_id - B_jd) for j <= i, 0 above the diagonal.

    q, k, g: [..., C, d_k] with C a power of two; returns [..., C, C]. Built bottom-up by
    doubling the block size: two neighbouring blocks L, R of s tokens merge into one of 2s with
    A_LL, A_RR from the previous level and the new block A_RL = (q_R * exp(b_R)) (k_L * exp(t_L))^T.
    """
    attn = (q * k).sum(-1)[..., None, None]  # [..., C, 1, 1]: blocks of one token
    size = 1
    while size < q.shape[-2]:
        (q_left, q_right), (k_left, k_right), (g_left, g_right) = (
            x.unflatten(-2, (-1, 2, size)).unbind(-3) for x in (q, k, g))  # [..., C / 2s, s, d_k]
        cross = (q_right * g_right.cumsum(-2).exp()) @ (k_left * _suffix_sum(g_left).exp()).mT
        a_left, a_right = attn.unflatten(-3, (-1, 2)).unbind(-3)  # [..., C / 2s, s, s]
        attn = torch.cat([torch.cat([a_left, torch.zeros_like(a_left)], -1),
                          torch.cat([cross, a_right], -1)], -2)
        size *= 2
    return attn.squeeze(-3)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, chunk_size=64):
    """Chunked GLA; returns ``(o, final_state)`` like :func:`.naive.naive_gla`.

    q, k, g (log gates, <= 0): [B, H, T, d_k]; v: [B, H, T, d_v]; initial_state:
    [B, H, d_k, d_v] or ``None`` (zeros). ``chunk_size`` must be a power of two. Computes in at
    least float32 with autocast off; ``o`` has q's dtype, the state the computation's dtype.
    Differentiable w.r.t. q, k, v, g and initial_state.
    """
    check_inputs(q, k, v, g, initial_state)
    check_chunk_size(chunk_size)
    batch, heads, length, d_k = q.shape
    d_v = v.shape[-1]
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    scale = d_k ** -0.5 if scale is None else scale
    pad = -length % chunk_size

    def chunked(x):  # [B, H, T, D] -> [B, H, N, C, D], zero-padded along T
        return F.pad(x.to(dtype), (0, 0, 0, pad)).unflatten(2, (-1, chunk_size))

    with torch.autocast(q.device.type, enabled=False):
        q, k, v, g = chunked(q) * scale, chunked(k), chunked(v), chunked(g)
        attn = _intra_chunk(q, k, g)
        writes = (k * _suffix_sum(g).exp()).mT @ v  # [B, H, N, d_k, d_v]
        cumulative = g.cumsum(-2)  # B_i
        chunk_decay = cumulative[..., -1, :, None].exp()  # exp(B_C): [B, H, N, d_k, 1]

        state = (q.new_zeros(batch, heads, d_k, d_v) if initial_state is None
                 else initial_state.to(dtype))
        starts = []
        for decay, write in zip(chunk_decay.unbind(2), writes.unbind(2)):  # unbind: one backward copy, not N
            starts.append(state)
            state = decay * state + write
        o = attn @ v
        if starts:
            o = o + (q * cumulative.exp()) @ torch.stack(starts, dim=2)
    return o.flatten(2, 3)[:, :, :length].to(out_dtype), state
