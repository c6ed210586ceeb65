"""Short causal depthwise convolution over time, followed by SiLU.

Linear-attention layers apply one to each of q, k and v (H3, Mamba, DeltaNet, Gated DeltaNet):
every channel mixes its own last ``size`` positions, which gives the layer cheap access to the
previous few tokens (an n-gram / "shift" feature that the recurrent state is poor at) and so
makes associative recall and induction much easier to learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """``y[t] = silu(sum_j weight[:, j] * x[t - size + 1 + j])`` per channel, with x[<0] = 0.

    ``forward`` maps ``[B, T, channels]`` to the same shape; ``step`` advances one token with a
    state holding the previous ``size - 1`` inputs, ``[B, size - 1, channels]``.
    """

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.empty(channels, 1, size))

    def reset_parameters(self) -> None:
        """U(-1/sqrt(size), 1/sqrt(size)): nn.Conv1d's default for a depthwise kernel (fan-in = size)."""
        bound = self.size ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        # Padding both sides and dropping the last size - 1 outputs keeps only causal windows.
        # The copy to a contiguous [B, T, C] lets the padded conv output be freed: SiLU saves
        # exactly T positions for backward.
        y = F.conv1d(x.mT, self.weight, padding=self.size - 1, groups=x.shape[-1])[..., :T]
        return F.silu(y.mT.contiguous())

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(batch, self.size - 1, self.weight.shape[0], device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t [B, channels]`` -> ``(y_t [B, channels], state)``."""
        window = torch.cat([state, x_t[:, None]], dim=1)  # [B, size, C], oldest first
        y = (window * self.weight[:, 0].T).sum(dim=1)
        return F.silu(y), window[:, 1:]

    @staticmethod
    def num_params(channels: int, size: int) -> int:
        return channels * size

    @staticmethod
    def flops_per_token(channels: int, size: int) -> int:
        """A multiply-accumulate per channel and tap."""
        return 2 * channels * size

    @staticmethod
    def activation_bytes_per_token(channels: int, dtype_bytes: int) -> int:
        """Saved for backward: the input (by the conv) and the conv's output (by SiLU)."""
        return 2 * dtype_bytes * channels
