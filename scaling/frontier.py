"""Approaches 1 and 2: compute-optimal sizes read off the runs, then N_opt and D_opt as power laws of C.

Approach 1 (training-curve envelope): along log-spaced compute values, every run's loss at that
compute is interpolated from its own curve (log loss linear in log C, inside the run's range
only); the run with the lowest loss is the best size at that compute. The lower envelope's
sizes and tokens are fitted as N_opt = k_N C^a and D_opt = k_D C^b by least squares in log-log.

Approach 2 (IsoFLOP profiles): points of equal compute (one per size per budget, e.g. the ends
of a ladder's decays) are grouped by budget; per budget a parabola in log N is fitted to the
loss and its vertex is the optimal size; N_opt and D_opt = C / (k N_opt) are fitted as power laws.

Both bootstrap their exponents: approach 1 resamples runs, approach 2 resamples points within
each budget. C is each point's own compute; k = C / (N D) is the points' median.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stratagem.scaling.estimate import Estimate
from stratagem.scaling.points import Point, ScalingInputError

BUDGET_TOLERANCE = 0.05  # points whose log10 compute differ by less than this share a budget (12%)
MIN_SIZES_PER_BUDGET = 3  # a parabola needs three sizes


@dataclass
class FrontierFit:
    """A compute-optimal frontier: (C, N_opt, D_opt, loss) rows and their power laws."""

    approach: str
    flops: np.ndarray
    n_opt: np.ndarray
    d_opt: np.ndarray
    loss: np.ndarray
    target_flops: float
    estimates: dict[str, Estimate] = field(default_factory=dict)  # a, b, n_opt and d_opt at the target
    profiles: list[dict] = field(default_factory=list)  # approach 2: each budget's points and parabola
    skipped: list[str] = field(default_factory=list)  # approach 2: budgets left out, and why

    def to_dict(self) -> dict:
        return {"approach": self.approach, "target_flops": self.target_flops,
                "frontier": [{"flops": float(c), "n_opt": float(n), "d_opt": float(d), "loss": float(l)}
                             for c, n, d, l in zip(self.flops, self.n_opt, self.d_opt, self.loss)],
                "estimates": {k: e.to_dict() for k, e in self.estimates.items()}, "profiles": self.profiles,
                "skipped": self.skipped}


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(coefficient, exponent) of y = coefficient x^exponent, least squares in log-log."""
    exponent, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(intercept)), float(exponent)


def _frontier_estimates(flops, n_opt, d_opt, target: float, samples: list[tuple]) -> dict[str, Estimate]:
    """a, b and N_opt, D_opt at `target` from the frontier and from each bootstrap frontier in `samples`."""

    def numbers(c, n, d) -> tuple[float, float, float, float]:
        (kn, a), (kd, b) = power_law(c, n), power_law(c, d)
        return a, b, kn * target ** a, kd * target ** b

    value = numbers(flops, n_opt, d_opt)
    draws = np.array([numbers(*s) for s in samples]) if samples else np.empty((0, 4))
    return {key: Estimate.from_samples(v, draws[:, i]) for i, (key, v) in
            enumerate(zip(("a", "b", "n_opt", "d_opt"), value))}


def flops_per_param_token(points: list[Point], params: str) -> float:
    return float(np.median([p.flops / (p.n(params) * p.tokens) for p in points]))


# --- approach 1 ------------------------------------------------------------------------------------

def envelope(points: list[Point], params: str = "non_embedding", *, grid: int = 200, bootstrap: int = 1000,
             seed: int = 0, target_flops: float = 1e21) -> FrontierFit:
    """The lower envelope of loss against compute over every run's curve (approach 1)."""
    runs = _curves(points, params)
    if len(runs) < 2:
        raise ScalingInputError(f"{len(runs)} run(s) with a curve: the envelope needs runs of at least two sizes")
    low = min(c[0] for _, c, _, _ in runs.values())
    high = max(c[-1] for _, c, _, _ in runs.values())
    flops = np.logspace(np.log10(low), np.log10(high), grid)
    names = sorted(runs)
    frontier = _envelope_at(flops, [runs[r] for r in names])
    if len(set(frontier[1])) < 2:
        raise ScalingInputError("one run is best at every compute: the envelope needs a range of sizes to fit")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        picked = [runs[names[i]] for i in rng.integers(0, len(names), len(names))]
        sample = _envelope_at(flops, picked)
        if len(set(sample[1])) >= 2:
            samples.append(sample[:3])
    fit = FrontierFit("1: envelope of training curves", *frontier, target_flops=target_flops)
    fit.estimates = _frontier_estimates(*frontier[:3], target_flops, samples)
    return fit


def _curves(points: list[Point], params: str) -> dict[str, tuple[float, np.ndarray, np.ndarray, float]]:
    """Per run with at least two points: (N, its compute sorted, its loss, tokens per FLOP)."""
    by_run: dict[str, list[Point]] = {}
    for p in points:
        by_run.setdefault(p.run, []).append(p)
    out = {}
    for run, pts in by_run.items():
        pts = sorted(pts, key=lambda p: p.flops)
        if len(pts) >= 2:
            out[run] = (pts[0].n(params), np.array([p.flops for p in pts]), np.array([p.loss for p in pts]),
                        pts[-1].tokens / pts[-1].flops)
    return out


def _envelope_at(flops: np.ndarray, runs: list[tuple[float, np.ndarray, np.ndarray, float]]):
    """(C, N, D, loss) of the best run at each compute some run reaches."""
    losses = np.full((len(runs), len(flops)), np.inf)
    for i, (_, c, loss, _) in enumerate(runs):
        inside = (flops >= c[0]) & (flops <= c[-1])
        losses[i, inside] = np.exp(np.interp(np.log(flops[inside]), np.log(c), np.log(loss)))
    best = losses.argmin(axis=0)
    covered = np.isfinite(losses.min(axis=0))
    best = best[covered]
    c = flops[covered]
    n = np.array([runs[i][0] for i in best])
    d = c * np.array([runs[i][3] for i in best])
    return c, n, d, losses.min(axis=0)[covered]


# --- approach 2 ------------------------------------------------------------------------------------

def isoflop(points: list[Point], params: str = "non_embedding", *, bootstrap: int = 1000, seed: int = 0,
            target_flops: float = 1e21) -> FrontierFit:
    """IsoFLOP profiles: per budget a parabola of loss in log N, its vertex the optimal size (approach 2)."""
    k = flops_per_param_token(points, params)
    budgets = group_by_budget(points)
    usable = [b for b in budgets if len({p.n(params) for p in b}) >= MIN_SIZES_PER_BUDGET]
    if len(usable) < 2:
        raise ScalingInputError(f"{len(usable)} compute budget(s) with {MIN_SIZES_PER_BUDGET}+ sizes: "
                                f"IsoFLOP profiles need at least two")
    rows, profiles, skipped, kept_groups = [], [], [], []
    for group in usable:
        c = float(np.exp(np.mean([np.log(p.flops) for p in group])))
        x = np.log([p.n(params) for p in group])
        y = np.array([p.loss for p in group])
        vertex = _vertex(x, y)
        if vertex is None:
            skipped.append(f"budget {c:.3g} FLOPs: its sizes do not bracket a minimum of the loss")
            continue
        kept_groups.append(group)
        rows.append((c, np.exp(vertex[0]), c / (k * np.exp(vertex[0])), vertex[1]))
        profiles.append({"flops": c, "n": np.exp(x).tolist(), "loss": y.tolist(),
                         "parabola": np.polyfit(x, y, 2).tolist(), "n_opt": float(np.exp(vertex[0]))})
    if len(rows) < 2:
        raise ScalingInputError(f"{len(rows)} compute budget(s) whose sizes bracket the loss's minimum: IsoFLOP "
                                f"profiles need two; add sizes on both sides of the optimum")
    usable = kept_groups
    flops, n_opt, d_opt, loss = map(np.array, zip(*rows))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        vertices = []
        for group, c in zip(usable, flops):
            pick = [group[i] for i in rng.integers(0, len(group), len(group))]
            x = np.log([p.n(params) for p in pick])
            vertex = _vertex(x, np.array([p.loss for p in pick])) if len(set(x)) >= 3 else None
            vertices.append(vertex)
        kept = [(c, v) for c, v in zip(flops, vertices) if v is not None]
        if len(kept) >= 2:
            c = np.array([c for c, _ in kept])
            n = np.exp([v[0] for _, v in kept])
            samples.append((c, n, c / (k * n)))
    fit = FrontierFit("2: IsoFLOP profiles", flops, n_opt, d_opt, loss, target_flops=target_flops,
                      profiles=profiles, skipped=skipped)
    fit.estimates = _frontier_estimates(flops, n_opt, d_opt, target_flops, samples)
    return fit


def _vertex(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """(x, y) at the minimum of the least-squares parabola through (x, y); None if it opens
    downwards or its minimum lies outside the sizes (an extrapolation, not a measurement)."""
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return None
    x0 = -c1 / (2 * c2)
    if not x.min() <= x0 <= x.max():
        return None
    return float(x0), float(c0 + c1 * x0 + c2 * x0 * x0)


def group_by_budget(points: list[Point]) -> list[list[Point]]:
    """Points clustered by compute: sorted by log10 C, a new budget where the gap exceeds the tolerance."""
    ordered = sorted(points, key=lambda p: p.flops)
    groups: list[list[Point]] = []
    for p in ordered:
        if groups and np.log10(p.flops) - np.log10(groups[-1][-1].flops) < BUDGET_TOLERANCE:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups
