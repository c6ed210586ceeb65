"""Rotary position embedding (RoPE) on consecutive pairs of a head's channels.

Channels (x[2i], x[2i+1]) at position m are rotated by the angle m * theta^(-2i / head_dim),
so a query at position m and a key at position n have a dot product that depends on their
positions only through m - n.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Applies RoPE to ``[B, T, heads, head_dim]`` tensors.

    The cos/sin tables are non-persistent buffers (never in a state_dict: they are a function of
    the config), built for the longest sequence seen so far and sliced for shorter ones.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("cos", torch.empty(0, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim // 2), persistent=False)

    def _tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos.shape[0] < seq_len or self.cos.device != device:
            exponent = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
            inv_freq = self.theta ** -exponent
            angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
            self.cos, self.sin = angles.cos(), angles.sin()
        return self.cos[:seq_len], self.sin[:seq_len]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H, D = x.shape
        cos, sin = self._tables(T, x.device)
        cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]  # [T, 1, D/2]
        pairs = x.view(B, T, H, D // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return rotated.view(B, T, H, D)
