"""The scaling-law fits on points drawn from known laws: recovery with honest intervals, the three
approaches' agreement on the compute-optimal exponent, the allocation formulas, pinned and
weighted fits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from stratagem.scaling.allocation import Law
from stratagem.scaling.frontier import envelope, isoflop
from stratagem.scaling.lbfgs import minimize_batch
from stratagem.scaling.parametric import NAMES, fit_law, objective
from stratagem.scaling.points import as_arrays
from tests.scaling_data import LAWS, law_points
from tests.seeds import describe, fresh_seed

# Four starts around Chinchilla-like values: enough for these laws (the default grid's 675 are
# tested once below); it keeps the many bootstrapped fits of this module to seconds each.
FEW_STARTS = {"E": [0.0], "A": [4.0, 10.0], "alpha": [0.5], "B": [4.0, 10.0], "beta": [0.5]}
NOISES = (0.005, 0.01, 0.02)


def central_differences(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """The gradient of `f` at `x` by central differences: scipy's check_grad differences forward,
    whose O(h f'') error near the Huber loss's kink (f'' = 1 / delta = 1000) reaches 1.5e-5."""
    steps = h * np.eye(len(x))
    return np.array([(f(x + step) - f(x - step)) / (2 * h) for step in steps])


def test_gradient_matches_finite_differences():
    """Measured over 1500 random points: central differences within 1.1e-8 of the analytic gradient."""
    seed = fresh_seed(0)
    rng = np.random.default_rng(seed)
    log_n, log_d = rng.uniform(15, 21, 40), rng.uniform(18, 24, 40)
    log_l, w = rng.uniform(0.5, 1.5, 40), rng.uniform(0.5, 2.0, 40)
    thetas = rng.normal([0.5, 6.0, 0.35, 6.0, 0.3], [0.3, 1.0, 0.05, 1.0, 0.05], size=(5, 5))
    values, grads = objective(thetas, log_n, log_d, log_l, w)
    for theta, value, grad in zip(thetas, values, grads):
        f = lambda t: objective(t[None], log_n, log_d, log_l, w)[0][0]  # noqa: E731
        g = lambda t: objective(t[None], log_n, log_d, log_l, w)[1][0]  # noqa: E731
        assert f(theta) == pytest.approx(value, rel=1e-12) and np.allclose(g(theta), grad, rtol=1e-12)  # a batch is its rows
        error = np.linalg.norm(central_differences(f, theta) - grad) / max(1.0, np.linalg.norm(grad))
        assert error < 1e-6, f"{error:.2e} at {theta}, {describe(seed)}"


@pytest.mark.parametrize("name", LAWS)
def test_allocation_matches_numerical_minimum(name):
    """N_opt and D_opt from the closed form minimise L(N, C / 6N) found numerically."""
    law = LAWS[name]
    for c in (1e18, 1e21, 1e24):
        best = minimize_scalar(lambda log_n: law.loss(np.exp(log_n), c / (6 * np.exp(log_n))),
                               bounds=(5, 40), method="bounded", options={"xatol": 1e-10})
        n = np.exp(best.x)
        assert law.n_opt(c) == pytest.approx(n, rel=1e-6)
        assert law.d_opt(c) == pytest.approx(c / (6 * n), rel=1e-6)
        assert law.n_opt(c) * law.d_opt(c) * 6 == pytest.approx(c, rel=1e-12)
        assert law.a + law.b == pytest.approx(1.0)


def test_noise_free_points_give_the_law_back_from_the_default_grid():
    """Without noise the optimum is the law itself; the default grid's starts find it, and the
    report of how many did is consistent."""
    law = LAWS["chinchilla"]
    fit = fit_law(as_arrays(law_points(law, noise=0.0)), bootstrap=0)
    for name in NAMES:
        assert getattr(fit.law, name) == pytest.approx(getattr(law, name), rel=1e-3), name
    assert fit.starts == 3 * 5 * 3 * 5 * 3 and 1 <= fit.reached <= fit.starts
    assert fit.objective < 1e-6


def test_every_parameter_lies_in_its_interval_in_nine_of_ten_fits():
    """3 laws x 8 noise draws (0.5%, 1%, 2%): each parameter inside its 95% bootstrap interval in
    at least 90% of the fits. Fixed seeds: a coverage claim needs many fits, and a fresh draw
    would make the assertion itself random. The benchmark measures it over more."""
    hits = {name: 0 for name in NAMES}
    fits = 0
    for law in LAWS.values():
        for seed in range(8):
            points = law_points(law, seed=seed, noise=NOISES[seed % 3])
            fit = fit_law(as_arrays(points), bootstrap=100, grid=FEW_STARTS, seed=seed)
            for name in NAMES:
                hits[name] += fit.estimates[name].contains(getattr(law, name))
            fits += 1
    coverage = {name: h / fits for name, h in hits.items()}
    assert min(coverage.values()) >= 0.9, coverage


def test_intervals_shrink_as_points_are_added():
    """From 25 to 225 points every interval narrows, by about 3x (the square root of 9x) in the
    median over the parameters. Per parameter the factor varies widely (A and B are poorly
    determined by 25 points: 1.1x to 1e9x over 13 seeds), and a strictly monotone chain over
    three sizes failed for 3 seeds in 13; this failed for none."""
    law, seed = LAWS["besiroglu"], fresh_seed(1)
    widths = []
    for sizes, budgets in ((5, 5), (15, 15)):
        fit = fit_law(as_arrays(law_points(law, sizes=sizes, budgets=budgets, seed=seed)), bootstrap=100,
                      grid=FEW_STARTS, seed=seed)
        widths.append({name: fit.estimates[name].width / getattr(law, name) for name in NAMES})
    shrink = {name: widths[0][name] / widths[1][name] for name in NAMES}
    assert min(shrink.values()) > 1 and np.median(list(shrink.values())) > 2.5, (shrink, describe(seed))


@pytest.mark.parametrize("name", LAWS)
def test_three_approaches_agree_on_the_exponent(name):
    """Approach 1 (envelope), 2 (IsoFLOP) and 3 (parametric): every pair of 95% intervals of
    a = d log N_opt / d log C overlaps, and each contains the true beta / (alpha + beta)."""
    law, seed = LAWS[name], fresh_seed(2)
    points = law_points(law, sizes=12, budgets=12, seed=seed)
    fits = [fit_law(as_arrays(points), bootstrap=200, grid=FEW_STARTS, seed=seed),
            isoflop(points, bootstrap=200, seed=seed), envelope(points, bootstrap=200, seed=seed)]
    a = [f.estimates["a"] for f in fits]
    for i, est in enumerate(a):
        assert est.contains(law.a), (i + 1, est, law.a, describe(seed))
        for other in a[i + 1:]:
            assert est.overlaps(other), (a, describe(seed))


def test_pinned_parameters_stay_put_and_the_rest_fit():
    law, seed = LAWS["chinchilla"], fresh_seed(3)
    arrays = as_arrays(law_points(law, seed=seed, noise=0.005))
    fit = fit_law(arrays, pinned={"E": law.E, "beta": law.beta}, bootstrap=50, grid=FEW_STARTS, seed=seed)
    assert fit.law.E == pytest.approx(law.E, rel=1e-12) and fit.law.beta == pytest.approx(law.beta, rel=1e-12)
    assert np.ptp(fit.samples[:, NAMES.index("E")]) < 1e-9 * law.E
    assert fit.starts == 2 * 2  # the grid over the three free parameters only
    assert fit.law.alpha == pytest.approx(law.alpha, rel=0.1), describe(seed)


def test_a_weight_of_two_is_the_point_twice():
    arrays = as_arrays(law_points(LAWS["flat-data"], seed=fresh_seed(4)))
    doubled = arrays.take(np.r_[np.arange(len(arrays)), 0])
    weighted = dataclasses.replace(arrays, weight=np.r_[2.0, np.ones(len(arrays) - 1)])
    a, b = (fit_law(x, bootstrap=0, grid=FEW_STARTS).law for x in (doubled, weighted))
    for name in NAMES:
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-5)


def test_law_derived_numbers():
    law = Law(E=1.0, A=100.0, alpha=0.5, B=100.0, beta=0.5)
    # alpha = beta and A = B: G = 1, N_opt = D_opt = sqrt(C / 6)
    derived = law.derived(6e8)
    assert derived["a"] == derived["b"] == 0.5 and derived["G"] == pytest.approx(1.0)
    assert derived["n_opt"] == pytest.approx(1e4 ** 1) and derived["d_opt"] == pytest.approx(1e4)
    assert derived["tokens_per_param"] == pytest.approx(1.0)
    assert derived["loss_at_target"] == pytest.approx(1.0 + 2 * 100 / 100)


def test_batched_lbfgs_solves_each_problem_on_its_own():
    """Rosenbrock valleys with different minima (one per problem), from different starts: every
    problem reaches its own minimum; one already at its minimum stops at once."""
    rng = np.random.default_rng(fresh_seed(5))
    shift = rng.uniform(-1, 1, (6, 2))

    def fg(x, rows):
        u, v = (x - shift[rows]).T + 1.0  # minimum at shift
        value = (1 - u) ** 2 + 100 * (v - u * u) ** 2
        grad = np.stack([-2 * (1 - u) - 400 * u * (v - u * u), 200 * (v - u * u)], axis=1)
        return value, grad

    starts = shift + rng.uniform(-2, 2, (6, 2))
    starts[0] = shift[0]
    result = minimize_batch(fg, starts)
    assert result.converged.all() and result.iterations[0] == 0
    np.testing.assert_allclose(result.x, shift, atol=1e-5)
