"""Softmax attention with RoPE: causal grouped-query attention, registered as the mixer
"attention", and sliding-window attention (each query sees only the last ``swa_window``
positions), registered as "swa"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stratagem.model.config import ModelConfig
from stratagem.model.layers import register_mixer
from stratagem.model.rope import RotaryEmbedding


@dataclass
class KVCache:
    """Generation state of an attention layer: keys (after RoPE) and values of past positions."""

    k: torch.Tensor  # [B, n_kv_heads, cached positions, head_dim]
    v: torch.Tensor
    pos: int  # position of the next token


@register_mixer("attention")
class Attention(nn.Module):
    """``n_heads`` query heads share ``n_kv_heads`` key/value heads (GQA; MHA when equal).

    The projections are separate bias-free Linear modules (wq, wk, wv, wo) so tensor
    parallelism can shard them column-wise (wq, wk, wv) and row-wise (wo); forward infers the
    number of heads from the projections' widths, so a shard holding fewer heads runs unchanged.
    """

    window: int | None = None  # keys a query sees, its own included; None: all earlier ones

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def init_weights(self, std: float, out_std: float) -> None:
        for w in (self.wq, self.wk, self.wv):
            nn.init.normal_(w.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.rope(self.wq(x).view(B, T, -1, self.head_dim))
        k = self.rope(self.wk(x).view(B, T, -1, self.head_dim))
        v = self.wv(x).view(B, T, -1, self.head_dim)
        return self.wo(self._attend(q, k, v).reshape(B, T, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention on ``[B, T, heads, head_dim]`` tensors; the output is laid out alike."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)

    def init_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        empty = torch.empty(batch, self.wk.out_features // self.head_dim, 0, self.head_dim,
                            device=device, dtype=dtype)
        return KVCache(empty, empty, 0)

    def forward_step(self, x: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One token: ``x [B, dim]`` -> ``(y [B, dim], cache)``; the cache keeps the last
        ``window`` positions (all of them without a window)."""
        B = x.shape[0]
        q = self._rope_at(self.wq(x).view(B, 1, -1, self.head_dim), cache.pos)
        k = self._rope_at(self.wk(x).view(B, 1, -1, self.head_dim), cache.pos)
        v = self.wv(x).view(B, 1, -1, self.head_dim)
        keep = -self.window if self.window is not None else 0
        k = torch.cat([cache.k, k.transpose(1, 2)], dim=2)[:, :, keep:]
        v = torch.cat([cache.v, v.transpose(1, 2)], dim=2)[:, :, keep:]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=True)
        return self.wo(out.reshape(B, -1)), KVCache(k, v, cache.pos + 1)

    def _rope_at(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """RoPE of ``x [B, 1, heads, head_dim]`` at position ``pos``.

        `RotaryEmbedding` rotates positions 0..T-1, so x is rotated as the last entry of a
        zero-padded sequence of pos + 1 positions: O(pos) work, the order of the attention step
        itself.
        """
        return self.rope(F.pad(x, (0, 0, 0, 0, pos, 0)))[:, pos:]

    # -- counts ------------------------------------------------------------------------------

    @classmethod
    def num_params(cls, cfg: ModelConfig) -> int:
        return cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim

    @classmethod
    def _keys_attended(cls, cfg: ModelConfig, seq_len: int) -> int:
        """Query-key pairs of a causal sequence: the token at position t (1-based) sees t keys."""
        return seq_len * (seq_len + 1) // 2

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> int:
        """Forward matmul FLOPs per token (2 per multiply-accumulate; softmax and RoPE not counted).

        Projections: 2 * dim * (n_heads + 2 * n_kv_heads) * head_dim for q, k, v and
        2 * n_heads * head_dim * dim for the output. Scores and values: QK^T and AV each cost
        2 * n_heads * head_dim per query-key pair; causal attention has seq_len (seq_len + 1) / 2
        pairs, so per token together 2 * n_heads * head_dim * (seq_len + 1).
        """
        qkv = 2 * cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        out = 2 * cfg.n_heads * cfg.head_dim * cfg.dim
        scores = 4 * cfg.n_heads * cfg.head_dim * cls._keys_attended(cfg, seq_len) // seq_len
        return qkv + out + scores

    @classmethod
    def activation_bytes_per_token(cls, cfg: ModelConfig, seq_len: int, dtype_bytes: int) -> int:
        """What this implementation saves for backward per token (measured on CPU):

        - the input x (dim), saved by wq, wk and wv;
        - q and k after RoPE, and v (n_heads + 2 * n_kv_heads heads), saved by SDPA. RoPE keeps
          only its cos/sin tables (the tables need no gradient, so its inputs are not saved),
          O(seq_len * head_dim) for the whole batch and not counted;
        - the SDPA output (n_heads heads), saved by SDPA and, as the same storage, by wo: the
          kernel lays it out like q, [B, T, H, D], so the reshape for wo is a view;
        - SDPA's float32 logsumexp, one float per query head. The flash kernel (CPU and GPU)
          keeps no T x T attention matrix, so nothing grows with seq_len.
        """
        heads = (cfg.n_heads + 2 * cfg.n_kv_heads) + cfg.n_heads
        return dtype_bytes * (cfg.dim + heads * cfg.head_dim) + 4 * cfg.n_heads


@register_mixer("swa")
class SlidingWindowAttention(Attention):
    """Attention restricted to the last ``swa_window`` positions, its own included (Mistral,
    Samba, Gated DeltaNet-H2): position t sees s with t - window < s <= t.

    A dense T x T band mask would make every query score all T keys. Instead the sequence is
    cut into blocks of ``window`` queries; a query's window lies within its own block and the
    one before, so each block attends to 2 * window keys through a fixed band mask: O(T * window)
    time and memory, one fused SDPA call for all blocks. Sequences no longer than the window are
    plain causal attention.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.window = cfg.swa_window

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, W = q.shape[0], q.shape[1], self.window
        if T <= W:
            return super()._attend(q, k, v)
        pad = -T % W  # zero queries and keys at the end; no real query sees them (causal)
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        n = (T + pad) // W

        def with_previous_block(x):  # [B, T', heads, D] -> [B * n, heads, 2W, D]
            blocks = x.unflatten(1, (n, W))
            previous = torch.cat([torch.zeros_like(blocks[:, :1]), blocks[:, :-1]], dim=1)
            return torch.cat([previous, blocks], dim=2).flatten(0, 1).transpose(1, 2)

        # Key c of the pair [previous block, own block] is position (j - 1) W + c for block j; the
        # query i of block j (position j W + i) sees it when i < c <= i + W.
        i = torch.arange(W, device=q.device)[:, None]
        c = torch.arange(2 * W, device=q.device)
        mask = ((c > i) & (c <= i + W)).expand(n, W, 2 * W).clone()
        mask[0, :, :W] = False  # block 0 has no previous block
        out = F.scaled_dot_product_attention(
            q.unflatten(1, (n, W)).flatten(0, 1).transpose(1, 2), with_previous_block(k),
            with_previous_block(v), attn_mask=mask.repeat(B, 1, 1)[:, None], enable_gqa=True)
        return out.transpose(1, 2).unflatten(0, (B, n)).flatten(1, 2)[:, :T]

    @classmethod
    def _keys_attended(cls, cfg: ModelConfig, seq_len: int) -> int:
        """Position t (1-based) sees min(t, window) keys.

        These are the pairs that count; the blocked implementation also multiplies the masked
        pairs of its 2 * window keys per query, twice as many as counted once T >> window."""
        w = min(cfg.swa_window, seq_len)
        return w * (w + 1) // 2 + (seq_len - w) * w

    @classmethod
    def activation_bytes_per_token(cls, cfg: ModelConfig, seq_len: int, dtype_bytes: int) -> int:
        """Up to ``swa_window`` tokens, attention's. Beyond, per token of the sequence padded to
        whole blocks (T' = ceil(T / window) * window; the count is per real token, rounded down):

        - the input x (dim), saved by wq, wk and wv;
        - q after RoPE (n_heads heads; a view of RoPE's output, or its padded copy), keys and
          values of each block's 2 * window window (2 * 2 * n_kv_heads heads per query, saved by
          SDPA: the previous block's keys are copied next to the block's own);
        - the SDPA output (n_heads heads; the same storage is saved by wo) and its float32
          logsumexp (one float per head);
        - the band mask, which SDPA saves as a float [B * n, 1, window, 2 * window] tensor: 2 *
          window values per query, in the activation dtype;
        - when T was padded, wo's input: a contiguous copy of the trimmed output (n_heads heads).
        """
        if seq_len <= cfg.swa_window:
            return super().activation_bytes_per_token(cfg, seq_len, dtype_bytes)
        padded = -(-seq_len // cfg.swa_window) * cfg.swa_window
        heads = cfg.n_heads + 4 * cfg.n_kv_heads + cfg.n_heads
        per_padded = dtype_bytes * (heads * cfg.head_dim + 2 * cfg.swa_window) + 4 * cfg.n_heads
        trimmed_copy = cfg.n_heads * cfg.head_dim if padded > seq_len else 0
        return dtype_bytes * (cfg.dim + trimmed_copy) + per_padded * padded // seq_len
