"""Causal grouped-query self-attention with RoPE, registered as the mixer "attention"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stratagem.model.config import ModelConfig
from stratagem.model.layers import register_mixer
from stratagem.model.rope import RotaryEmbedding


@register_mixer("attention")
class Attention(nn.Module):
    """``n_heads`` query heads share ``n_kv_heads`` key/value heads (GQA; MHA when equal).

    The projections are separate bias-free Linear modules (wq, wk, wv, wo) so tensor
    parallelism can shard them column-wise (wq, wk, wv) and row-wise (wo); forward infers the
    number of heads from the projections' widths, so a shard holding fewer heads runs unchanged.
    """

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
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    @classmethod
    def num_params(cls, cfg: ModelConfig) -> int:
        return cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> int:
        """Forward matmul FLOPs per token (2 per multiply-accumulate; softmax and RoPE not counted).

        Projections: 2 * dim * (n_heads + 2 * n_kv_heads) * head_dim for q, k, v and
        2 * n_heads * head_dim * dim for the output. Causal attention: the token at position t
        (1-based) attends to t keys, t = (seq_len + 1) / 2 on average, so QK^T and AV each cost
        2 * n_heads * head_dim * (seq_len + 1) / 2, together 2 * n_heads * head_dim * (seq_len + 1).
        """
        qkv = 2 * cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        out = 2 * cfg.n_heads * cfg.head_dim * cfg.dim
        scores = 2 * cfg.n_heads * cfg.head_dim * (seq_len + 1)
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
