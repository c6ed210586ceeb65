"""Calibration: per-term correction factors of the cost model, fitted to measured step times.

The cost model predicts a step as a sum of terms (`launcher.cost.TERMS`: compute, the transfer and
the latency of each collective family, host copies (offload), optimizer), each from the profile's
micro-benchmarks. Running a real step costs
more than its parts measured alone (hooks and dispatch around every collective, ranks waiting to
be scheduled on shared cores, what a step does beyond the model: gradient clipping, zeroing), and
not by one factor for all terms. `fit_corrections` finds factors f_t >= 1 (a run costs at least
what its parts cost alone: overheads add, they do not subtract) so that ``measured ~ sum_t f_t
x_t`` over measured runs, where x_t is the term's share of the predicted step (`step_terms`), by
non-negative least squares on f_t - 1 and relative errors; terms no run exercises keep 1. The
measured runs and the factors go into the profile (`Profile.observations`, `Profile.corrections`:
`record_run`), and every later prediction from it (`hardware.Measured`) scales its terms by them.
"""

from __future__ import annotations

import datetime

import numpy as np

from stratagem.launcher.cost import TERMS, Prediction


def step_terms(prediction: Prediction) -> dict[str, float]:
    """The predicted step time split by term: each micro-batch term with its share of the bubble."""
    breakdown = prediction.breakdown
    micro = sum(breakdown[t] for t in TERMS if t != "optimizer")
    scale = (micro + breakdown["bubble"]) / micro if micro else 1.0
    return {t: breakdown[t] * (1.0 if t == "optimizer" else scale) for t in TERMS}


def nnls(a: np.ndarray, b: np.ndarray, iterations: int = 500) -> np.ndarray:
    """min |a x - b| subject to x >= 0 (Lawson and Hanson's active-set method)."""
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(iterations):
        gradient = a.T @ (b - a @ x)
        if passive.all() or gradient[~passive].max(initial=0.0) <= 1e-12 * np.abs(a).max() * np.abs(b).max():
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            blocking = passive & (z <= 0)
            alpha = np.min(x[blocking] / (x[blocking] - z[blocking]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x


def fit_corrections(terms: list[dict[str, float]], measured_seconds: list[float]) -> dict[str, float]:
    """Factors (>= 1) per term that best turn steps predicted as `terms` (`step_terms` of each) into
    `measured_seconds` (relative error)."""
    if len(terms) != len(measured_seconds) or not terms:
        raise ValueError(f"{len(terms)} predictions for {len(measured_seconds)} measurements")
    used = [t for t in TERMS if any(row.get(t, 0.0) > 0 for row in terms)]
    measured = np.asarray(measured_seconds, dtype=float)
    a = np.array([[row.get(t, 0.0) for t in used] for row in terms]) / measured[:, None]
    extra = nnls(a, 1.0 - a.sum(axis=1))  # f - 1 per used term
    factors = dict.fromkeys(TERMS, 1.0)
    factors.update((t, 1.0 + float(g)) for t, g in zip(used, extra))
    return factors


def corrected_seconds(terms: dict[str, float], corrections: dict[str, float]) -> float:
    """The step time of a step predicted as `terms` (`step_terms`) with `corrections` applied."""
    return sum(corrections.get(t, 1.0) * x for t, x in terms.items())


def record_run(profile, run: str, plan: str, terms: dict[str, float], measured_seconds: float) -> dict[str, float]:
    """Add a measured step (its uncorrected `step_terms`) to `profile`'s observations and refit its
    corrections to all of them; returns the new corrections (the caller saves the profile)."""
    profile.observations.append({"run": run, "plan": plan, "terms": dict(terms), "measured_s": measured_seconds,
                                 "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    profile.corrections = fit_corrections([o["terms"] for o in profile.observations],
                                          [o["measured_s"] for o in profile.observations])
    return profile.corrections
