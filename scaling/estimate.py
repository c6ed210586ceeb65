"""Point estimates with bootstrap uncertainty: the value fitted on all points, the standard
error and the 95% percentile interval of the same quantity refitted on resampled points."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float
    low: float
    high: float

    @classmethod
    def from_samples(cls, value: float, samples: np.ndarray) -> Estimate:
        """`value` from all points; the spread from bootstrap `samples` (non-finite ones dropped)."""
        samples = np.asarray(samples, dtype=float)
        samples = samples[np.isfinite(samples)]
        if samples.size < 2:
            return cls(float(value), float("nan"), float("nan"), float("nan"))
        tail = (1 - LEVEL) / 2 * 100
        low, high = np.percentile(samples, [tail, 100 - tail])
        return cls(float(value), float(samples.std(ddof=1)), float(low), float(high))

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def overlaps(self, other: Estimate) -> bool:
        return self.low <= other.high and other.low <= self.high

    @property
    def width(self) -> float:
        return self.high - self.low

    def to_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.4g} ± {self.stderr:.2g} [{self.low:.4g}, {self.high:.4g}]"


def resamples(n: int, count: int, seed: int) -> np.ndarray:
    """`count` bootstrap resamples of `n` points: a (count, n) array of indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))
