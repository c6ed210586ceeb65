"""Approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta to every point (Hoffmann et al. 2022).

As in the paper and its replication (Besiroglu et al. 2024): in log space, with
E = exp(e), A = exp(a), B = exp(b), minimise the Huber loss (delta = 1e-3) of
    LSE(a - alpha log N, b - beta log D, e) - log L
with L-BFGS from every point of a grid of starts and keep the best. Parameters stay unrounded.
Uncertainty: the whole fit repeated on bootstrap resamples of the points (default 1000; a
resample is the points weighted by how often they were drawn), each started from the full fit's
optimum and from the grid start that fits all points best, giving a standard error and a 95%
interval for every parameter and every derived quantity. Parameters can be pinned (held at a
given value) and points weighted. All starts, and all resamples, are solved as one batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from stratagem.scaling.allocation import DEFAULT_FLOPS_PER_PARAM_TOKEN, Law
from stratagem.scaling.estimate import Estimate, resamples
from stratagem.scaling.lbfgs import minimize_batch
from stratagem.scaling.points import Arrays, ScalingInputError

NAMES = ("E", "A", "alpha", "B", "beta")
LOG_SCALE = {"E": True, "A": True, "alpha": False, "B": True, "beta": False}  # fitted as log E, log A, log B
HUBER_DELTA = 1e-3
# Grids of starts over (log E, log A, alpha, log B, beta). "hoffmann" is the paper's 5 x 6 x 5 x
# 6 x 5 = 4500; "default" spans the same ranges with 3 x 5 x 3 x 5 x 3 = 675.
GRIDS = {
    "default": {"E": [-1.0, 0.0, 1.0], "A": [0.0, 6.0, 12.0, 18.0, 24.0], "alpha": [0.25, 0.75, 1.5],
                "B": [0.0, 6.0, 12.0, 18.0, 24.0], "beta": [0.25, 0.75, 1.5]},
    "hoffmann": {"E": [-1.0, -0.5, 0.0, 0.5, 1.0], "A": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
                 "alpha": [0.0, 0.5, 1.0, 1.5, 2.0], "B": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
                 "beta": [0.0, 0.5, 1.0, 1.5, 2.0]},
}
REACHED_TOLERANCE = 1e-6  # a start "reached the optimum" when its objective is within this (relative) of the best
RESAMPLE_BATCH = 250  # bootstrap resamples solved together (bounds memory: batch x points arrays)


@dataclass
class ParametricFit:
    law: Law  # the fit on all points, unrounded
    pinned: dict[str, float]
    objective: float
    grid: dict[str, list[float]]
    starts: int
    reached: int  # starts whose optimum is the best one (to REACHED_TOLERANCE)
    points: int
    samples: np.ndarray  # bootstrap laws: (resamples, 5) in NAMES order, natural units
    flops_per_param_token: float
    target_flops: float
    residuals: np.ndarray  # log L_fitted - log L per point
    estimates: dict[str, Estimate] = field(default_factory=dict)  # every parameter and derived quantity

    def to_dict(self) -> dict:
        return {"law": {n: getattr(self.law, n) for n in NAMES}, "pinned": self.pinned,
                "objective": self.objective, "grid": self.grid, "starts": self.starts, "reached": self.reached,
                "points": self.points, "bootstrap": len(self.samples),
                "flops_per_param_token": self.flops_per_param_token, "target_flops": self.target_flops,
                "estimates": {k: e.to_dict() for k, e in self.estimates.items()},
                "residual_rms": float(np.sqrt(np.mean(self.residuals ** 2)))}


def objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, w: np.ndarray,
              delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Per row of theta (B, 5) = (e, a, alpha, b, beta): the weighted mean Huber loss of the
    log-space residuals over delta (B,), and its gradient (B, 5). `w` is (n,) or per row (B, n).
    Divided by delta so that its scale is that of |residual|."""
    e, a, alpha, b, beta = (theta[:, i:i + 1] for i in range(5))
    t_n, t_d = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t_n, t_d), e)
    p_n, p_d, p_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = p_n + p_d + p_e
    r = top + np.log(total) - log_l
    clipped = np.clip(r, -delta, delta)
    huber = clipped * (r - 0.5 * clipped)  # 0.5 r^2 inside delta, delta (|r| - delta / 2) outside
    w = np.broadcast_to(w, r.shape)
    scale = 1.0 / (delta * w.sum(axis=1))
    dr = w * clipped / total * scale[:, None]  # d value / d residual, times d residual / d term's share
    g_n, g_d = dr * p_n, dr * p_d
    grad = np.stack([(dr * p_e).sum(axis=1), g_n.sum(axis=1), -(g_n @ log_n), g_d.sum(axis=1), -(g_d @ log_d)],
                    axis=1)
    return (w * huber).sum(axis=1) * scale, grad


def _to_theta(values: dict[str, float]) -> np.ndarray:
    return np.array([np.log(values[n]) if LOG_SCALE[n] else values[n] for n in NAMES])


def _to_law(theta: np.ndarray) -> Law:
    return Law(**{n: float(np.exp(t) if LOG_SCALE[n] else t) for n, t in zip(NAMES, theta)})


class _Problem:
    """The objective over the free coordinates of theta (the pinned ones held), for a batch of
    weightings of the same points."""

    def __init__(self, arrays: Arrays, pinned: dict[str, float]):
        self.log_n, self.log_d, self.log_l = np.log(arrays.n), np.log(arrays.d), np.log(arrays.loss)
        self.w = arrays.weight
        self.fixed = _to_theta({**{n: 1.0 for n in NAMES}, **pinned})
        self.free = np.array([n not in pinned for n in NAMES])

    def full(self, x: np.ndarray) -> np.ndarray:
        theta = np.tile(self.fixed, (len(x), 1))
        theta[:, self.free] = x
        return theta

    def solve(self, starts: np.ndarray, weights: np.ndarray | None = None):
        """The optimum from each start (rows), each under its own weights (rows) if given."""
        w = self.w if weights is None else weights * self.w

        def fg(x, rows):
            value, grad = objective(self.full(x), self.log_n, self.log_d, self.log_l, w if w.ndim == 1 else w[rows])
            return value, grad[:, self.free]

        return minimize_batch(fg, starts)


def _grid_starts(grid: dict[str, list[float]], pinned: dict[str, float]) -> np.ndarray:
    axes = [grid[n] for n in NAMES if n not in pinned]
    return np.array(list(itertools.product(*axes)), dtype=float)


def fit_law(arrays: Arrays, *, pinned: dict[str, float] | None = None, grid: dict[str, list[float]] | None = None,
            bootstrap: int = 1000, seed: int = 0, target_flops: float = 1e21,
            flops_per_param_token: float = DEFAULT_FLOPS_PER_PARAM_TOKEN) -> ParametricFit:
    """Fit the law to `arrays` from every grid start, then refit it on `bootstrap` resamples."""
    pinned = dict(pinned or {})
    unknown = sorted(set(pinned) - set(NAMES))
    if unknown:
        raise ScalingInputError(f"pinned parameter {unknown[0]!r}: the law's parameters are {', '.join(NAMES)}")
    free = len(NAMES) - len(pinned)
    if len(arrays) <= free:
        raise ScalingInputError(f"{len(arrays)} points for {free} free parameters: a fit needs more points")
    grid = {n: list(map(float, v)) for n, v in (grid or GRIDS["default"]).items()}
    problem = _Problem(arrays, pinned)
    starts = _grid_starts(grid, pinned)
    ends = problem.solve(starts)
    best = int(np.nanargmin(ends.f))
    best_value, best_x = float(ends.f[best]), ends.x[best]
    reached = int((ends.f <= best_value + REACHED_TOLERANCE * max(abs(best_value), 1e-12)).sum())
    law = _to_law(problem.full(best_x[None])[0])
    samples = _bootstrap(problem, starts[best], best_x, len(arrays), bootstrap, seed)
    residuals = np.log(law.loss(arrays.n, arrays.d)) - np.log(arrays.loss)
    result = ParametricFit(law=law, pinned=pinned, objective=best_value, grid=grid, starts=len(starts),
                           reached=reached, points=len(arrays), samples=samples,
                           flops_per_param_token=flops_per_param_token, target_flops=target_flops,
                           residuals=residuals)
    result.estimates = _estimates(law, samples, target_flops, flops_per_param_token)
    return result


def _bootstrap(problem: _Problem, best_start: np.ndarray, best_x: np.ndarray, n: int, count: int,
               seed: int) -> np.ndarray:
    """One law per resample: the better optimum from the full fit's optimum and from its grid start."""
    out = np.empty((count, len(NAMES)))
    drawn = resamples(n, count, seed)
    for lo in range(0, count, RESAMPLE_BATCH):
        index = drawn[lo:lo + RESAMPLE_BATCH]
        counts = np.stack([np.bincount(row, minlength=n) for row in index]).astype(float)
        runs = [problem.solve(np.tile(start, (len(index), 1)), counts) for start in (best_x, best_start)]
        x = np.where((runs[0].f <= runs[1].f)[:, None], runs[0].x, runs[1].x)
        theta = problem.full(x)
        out[lo:lo + len(index)] = [[getattr(_to_law(t), n) for n in NAMES] for t in theta]
    return out


def _estimates(law: Law, samples: np.ndarray, target_flops: float, k: float) -> dict[str, Estimate]:
    """Every parameter and every derived quantity with its bootstrap spread."""
    out = {n: Estimate.from_samples(getattr(law, n), samples[:, i]) for i, n in enumerate(NAMES)}
    derived = law.derived(target_flops, k)
    with np.errstate(all="ignore"):
        rows = [Law(*row).derived(target_flops, k) for row in samples]
    for key, value in derived.items():
        out[key] = Estimate.from_samples(value, np.array([r[key] for r in rows]))
    return out
