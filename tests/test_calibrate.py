"""Calibration: the NNLS solver against enumeration, and factors recovered from synthetic runs."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from stratagem.launcher.calibrate import corrected_seconds, fit_corrections, nnls, step_terms
from stratagem.launcher.cluster import Link, builtin_cluster
from stratagem.launcher.cost import TERMS, Workload, predict
from stratagem.launcher.hardware import Analytic
from stratagem.model import get_flavor
from stratagem.parallel.plan import uniform_plan


def exhaustive_nnls(a, b):
    """The best least-squares solution over every support set, clipped to x >= 0 supports only."""
    best, best_x = np.inf, None
    n = a.shape[1]
    for k in range(n + 1):
        for support in itertools.combinations(range(n), k):
            x = np.zeros(n)
            if support:
                x[list(support)] = np.linalg.lstsq(a[:, support], b, rcond=None)[0]
            if (x >= -1e-12).all() and np.linalg.norm(a @ x - b) < best:
                best, best_x = np.linalg.norm(a @ x - b), x
    return best_x


@pytest.mark.parametrize("seed", range(20))
def test_nnls_matches_enumeration(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(12, 4)), rng.normal(size=12)
    got, want = nnls(a, b), exhaustive_nnls(a, b)
    assert (got >= 0).all()
    assert np.linalg.norm(a @ got - b) == pytest.approx(np.linalg.norm(a @ want - b), rel=1e-9, abs=1e-12)


def predicted_terms():
    """The step terms of plans that exercise every term but relayout (uniform plans keep one tp)."""
    cfg = dataclasses.replace(get_flavor("tiny-moe"), n_kv_heads=4)
    hw = Analytic(dataclasses.replace(builtin_cluster("h100-sxm", 1), device_memory=10**9,
                                      intra_node=Link(bandwidth=1e9, latency=1e-4)))
    work = Workload.of(cfg, 64, 16)
    plans = [uniform_plan(cfg, 4, tp=tp, pp=pp, dp=dp, ep=ep, micro_batch_size=mb, num_micro_batches=4)
             for tp, pp, dp, ep, mb in [(1, 1, "ddp", 1, 4), (2, 1, "fsdp", 1, 4), (1, 2, "zero2", 2, 4),
                                        (1, 1, "fsdp", 4, 4), (4, 1, "ddp", 1, 4), (1, 2, "ddp", 1, 4),
                                        (2, 2, "fsdp", 1, 4), (1, 1, "zero2", 2, 4), (1, 1, "ddp", 1, 16),
                                        (4, 1, "ddp", 1, 16), (1, 1, "fsdp", 4, 16), (1, 2, "ddp", 1, 16)]]
    return [step_terms(predict(hw, work, plan)) for plan in plans]


def test_fit_recovers_the_factors_that_made_the_measurements():
    preds = predicted_terms()
    true = {"compute": 2.0, "tp": 5.0, "tp_latency": 8.0, "ep": 3.0, "ep_latency": 1.0, "dp": 1.5,
            "dp_latency": 4.0, "relayout": 1.0, "p2p": 1.0, "optimizer": 40.0}
    measured = [corrected_seconds(p, true) for p in preds]
    fitted = fit_corrections(preds, measured)
    assert set(fitted) == set(TERMS)
    for term, factor in true.items():
        assert fitted[term] == pytest.approx(factor, rel=1e-6), term
    assert fitted["relayout"] == 1.0  # no plan here relays out: left as predicted


def test_factors_never_fall_below_one():
    preds = predicted_terms()
    fitted = fit_corrections(preds, [0.5 * sum(p.values()) for p in preds])  # runs faster than predicted
    assert all(f == 1.0 for f in fitted.values())
