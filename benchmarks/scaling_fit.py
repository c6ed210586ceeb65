"""The scaling-law fit's speed and the honesty of its intervals.

1. Speed: approach 3 on 300 points drawn from Chinchilla's law (1% log-normal noise) with the
   default grid (675 L-BFGS starts) and 1000 bootstrap resamples, timed end to end (goal: < 60 s
   on 2 cores); and, side by side in the same run, the batched L-BFGS against scipy's L-BFGS-B
   one start at a time on the same grid starts (the ratio, and whether both reach the same best).
2. Coverage: over 3 laws x `--seeds` noise draws (0.5%, 1%, 2% in turn) on the tests' grid of
   points, how often each parameter and a = beta / (alpha + beta) lies inside its 95% interval,
   and how often all five do at once. Writes benchmarks/results/scaling_fit.json.

    .venv/bin/python benchmarks/scaling_fit.py [--points 300] [--bootstrap 1000] [--seeds 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.scaling_data

from stratagem.scaling.parametric import GRIDS, NAMES, _grid_starts, _Problem, fit_law, objective  # noqa: E402
from stratagem.scaling.points import Arrays, as_arrays  # noqa: E402
from tests.scaling_data import CHINCHILLA, LAWS, law_points  # noqa: E402

import report  # noqa: E402  benchmarks/report.py, beside this script


def random_points(count: int, seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    n, d = 10 ** rng.uniform(7, 9.5, count), 10 ** rng.uniform(8.5, 11, count)
    loss = CHINCHILLA.loss(n, d) * np.exp(rng.normal(0, 0.01, count))
    return Arrays(n, d, 6 * n * d, loss, np.ones(count))


def speed(points: int, bootstrap: int, scipy_starts: int) -> dict:
    arrays = random_points(points, seed=0)
    began = time.perf_counter()
    fit = fit_law(arrays, bootstrap=bootstrap)
    seconds = time.perf_counter() - began
    problem = _Problem(arrays, {})
    starts = _grid_starts(GRIDS["default"], {})[:: len(_grid_starts(GRIDS["default"], {})) // scipy_starts]
    began = time.perf_counter()
    batched = problem.solve(starts)
    batched_s = time.perf_counter() - began

    def one(theta):
        value, grad = objective(theta[None], problem.log_n, problem.log_d, problem.log_l, problem.w)
        return value[0], grad[0]

    began = time.perf_counter()
    scipy_f = [minimize(one, s, jac=True, method="L-BFGS-B", options={"ftol": 1e-13, "gtol": 1e-8}).fun
               for s in starts]
    scipy_s = time.perf_counter() - began
    return {"points": points, "bootstrap": bootstrap, "grid_starts": fit.starts, "seconds": round(seconds, 2),
            "goal_seconds": 60, "reached": fit.reached, "law": {n: getattr(fit.law, n) for n in NAMES},
            "batched_vs_scipy": {"starts": len(starts), "batched_s": round(batched_s, 3), "scipy_s": round(scipy_s, 3),
                                 "speedup": round(scipy_s / batched_s, 1),
                                 "best_objective_batched": float(batched.f.min()),
                                 "best_objective_scipy": float(min(scipy_f))}}


def coverage(seeds: int, bootstrap: int) -> dict:
    names = (*NAMES, "a")
    hits = {name: 0 for name in names}
    joint = fits = 0
    began = time.perf_counter()
    for law in LAWS.values():
        for seed in range(seeds):
            fit = fit_law(as_arrays(law_points(law, seed=1000 + seed, noise=(0.005, 0.01, 0.02)[seed % 3])),
                          bootstrap=bootstrap, seed=seed)
            inside = {name: fit.estimates[name].contains(getattr(law, name)) for name in names}
            for name in names:
                hits[name] += inside[name]
            joint += all(inside[name] for name in NAMES)
            fits += 1
    return {"fits": fits, "bootstrap": bootstrap, "laws": list(LAWS), "noise": [0.005, 0.01, 0.02],
            "coverage": {name: round(h / fits, 3) for name, h in hits.items()},
            "all_five_at_once": round(joint / fits, 3), "seconds": round(time.perf_counter() - began, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--scipy-starts", type=int, default=45, help="grid starts solved both ways")
    parser.add_argument("--seeds", type=int, default=30, help="noise draws per law for the coverage")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling_fit.json"))
    args = parser.parse_args()
    result = {"machine": report.machine(), "speed": speed(args.points, args.bootstrap, args.scipy_starts),
              "interval_coverage": coverage(args.seeds, args.bootstrap)}
    report.write(result, args.out)


if __name__ == "__main__":
    main()
