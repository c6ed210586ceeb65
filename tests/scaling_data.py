"""Points drawn from a known law, for the scaling tests and benchmarks.

Runs of sizes N, each evaluated at a common set of compute budgets C (its curve: D = C / (6N) for
the budgets at which it has seen between `min_ratio` and `max_ratio` tokens per parameter), with
log-normal noise on the loss. Every budget thus holds several sizes (an IsoFLOP profile) and every
size a training curve.
"""

from __future__ import annotations

import numpy as np

from stratagem.scaling.allocation import Law
from stratagem.scaling.points import PARAM_KINDS, Point

TINY_LADDER_BASE = ["--model.flavor=tiny", "--data.seq_len=32", "--train.micro_batch_size=4",
                    "--train.global_batch_tokens=256", "--train.schedule=wsd", "--train.warmup_steps=2",
                    "--train.eval_every=0", "--train.eval_batches=2", "--train.decay_fraction=0.25"]

CHINCHILLA = Law(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Hoffmann et al. 2022
BESIROGLU = Law(E=1.82, A=482.0, alpha=0.35, B=2085.4, beta=0.37)  # the replication's refit (2024)
FLAT_DATA = Law(E=2.2, A=120.0, alpha=0.28, B=900.0, beta=0.32)  # a third, data-hungrier shape
LAWS = {"chinchilla": CHINCHILLA, "besiroglu": BESIROGLU, "flat-data": FLAT_DATA}


def law_points(law: Law, *, sizes: int = 9, budgets: int = 8, noise: float = 0.01, seed: int = 0,
               n_range=(1e7, 3e9), c_range=(1e17, 1e20), min_ratio: float = 2.0,
               max_ratio: float = 500.0) -> list[Point]:
    rng = np.random.default_rng(seed)
    points = []
    for n in np.geomspace(*n_range, sizes):
        run = f"n{n:.3g}"
        for c in np.geomspace(*c_range, budgets):
            d = c / (6 * n)
            if min_ratio <= d / n <= max_ratio:
                loss = float(law.loss(n, d) * np.exp(rng.normal(0.0, noise)))
                points.append(Point(run=run, step=len(points), tokens=d, flops=c, loss=loss,
                                    params={kind: float(n) for kind in PARAM_KINDS}))
    return points


def write_tiny_ladder(out, *overrides: str):
    """A ladder of 2 sizes x 2 budgets (a main run and a decay branch per size, 7 to 44 steps of the
    tiny model) written to `out`, for the tests that run a ladder through a scheduler; the Ladder."""
    from stratagem.launcher.config import load_config
    from stratagem.scaling.ladder import design_ladder, write_ladder

    ladder = design_ladder(load_config(None, [*TINY_LADDER_BASE, *overrides]), [4e9, 8e9], sizes=2, span=0.5,
                           min_steps=6)
    write_ladder(ladder, out)
    return ladder
