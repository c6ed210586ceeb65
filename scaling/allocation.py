"""Compute-optimal allocation under L(N, D) = E + A / N^alpha + B / D^beta with compute C = k N D.

Minimising L subject to k N D = C (Hoffmann et al. 2022, eq. 4) gives
    N_opt(C) = G (C/k)^a,   D_opt(C) = G^-1 (C/k)^b,
    a = beta / (alpha + beta),  b = alpha / (alpha + beta),  G = (alpha A / (beta B))^(1 / (alpha + beta)).
k is 6 in the usual 6ND convention; a run's own k is its training FLOPs per token over N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_FLOPS_PER_PARAM_TOKEN = 6.0


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def a(self) -> float:
        """The exponent of N_opt in C."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """The exponent of D_opt in C."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def n_opt(self, c, k: float = DEFAULT_FLOPS_PER_PARAM_TOKEN):
        return self.G * np.power(np.asarray(c, dtype=float) / k, self.a)

    def d_opt(self, c, k: float = DEFAULT_FLOPS_PER_PARAM_TOKEN):
        return np.power(np.asarray(c, dtype=float) / k, self.b) / self.G

    def optimal_loss(self, c, k: float = DEFAULT_FLOPS_PER_PARAM_TOKEN):
        return self.loss(self.n_opt(c, k), self.d_opt(c, k))

    def derived(self, target_flops: float, k: float = DEFAULT_FLOPS_PER_PARAM_TOKEN) -> dict[str, float]:
        """The allocation's numbers at `target_flops`: exponents, G, N_opt, D_opt, tokens per parameter, loss."""
        n, d = float(self.n_opt(target_flops, k)), float(self.d_opt(target_flops, k))
        return {"a": self.a, "b": self.b, "G": self.G, "n_opt": n, "d_opt": d, "tokens_per_param": d / n,
                "loss_at_target": float(self.loss(n, d))}
