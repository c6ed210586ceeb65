"""RMSNorm, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    @staticmethod
    def num_params(dim: int) -> int:
        return dim

    @staticmethod
    def activation_bytes_per_token(dim: int, dtype_bytes: int) -> int:
        """Saved for backward: the float32 input (by ``pow`` and ``*``), the float32 reciprocal
        RMS, and the normalised tensor in the activation dtype (by ``* weight``).

        In float32 the "float32 input" is the input itself; in bfloat16 it is a float32 copy.
        """
        return 4 * dim + 4 + dtype_bytes * dim
