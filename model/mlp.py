"""SwiGLU feed-forward, registered as the ffn "mlp": w2(silu(w1 x) * w3 x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stratagem.model.config import ModelConfig
from stratagem.model.layers import register_ffn


@register_ffn("mlp")
class SwiGLU(nn.Module):
    """w1 is the gate, w3 the up projection, w2 the down projection; no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        nn.init.normal_(self.w3.weight, std=std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    @classmethod
    def num_params(cls, cfg: ModelConfig) -> int:
        return 3 * cfg.dim * cfg.ffn_hidden

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> int:
        """Forward matmul FLOPs per token: three dim x ffn_hidden matmuls (SiLU and * not counted)."""
        return 3 * 2 * cfg.dim * cfg.ffn_hidden

    @classmethod
    def activation_bytes_per_token(cls, cfg: ModelConfig, seq_len: int, dtype_bytes: int) -> int:
        """Saved for backward per token: the input x (by w1 and w3), w1 x (by SiLU), silu(w1 x)
        and w3 x (by the product) and the product (by w2): dim + 4 * ffn_hidden values."""
        return dtype_bytes * (cfg.dim + 4 * cfg.ffn_hidden)
