"""The report's PNG figures (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stratagem.scaling.frontier import FrontierFit  # noqa: E402
from stratagem.scaling.parametric import NAMES, ParametricFit  # noqa: E402
from stratagem.scaling.points import Arrays  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def loss_vs_compute(arrays: Arrays, law: ParametricFit, frontiers: list[FrontierFit], path: Path,
                    entropy: float | None = None) -> Path:
    """Every point coloured by model size, the envelope's frontier and the law's compute-optimal loss."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    order = np.argsort(arrays.n)
    scatter = ax.scatter(arrays.c[order], arrays.loss[order], c=np.log10(arrays.n[order]), cmap="viridis", s=14)
    fig.colorbar(scatter, ax=ax, label="log10 N")
    for frontier in frontiers:
        ax.plot(frontier.flops, frontier.loss, lw=1.5, label=f"approach {frontier.approach}")
    k = law.flops_per_param_token
    c = np.geomspace(arrays.c.min(), max(arrays.c.max(), law.target_flops), 200)
    ax.plot(c, law.law.optimal_loss(c, k), "k--", lw=1.2, label="approach 3: L(N_opt(C), D_opt(C))")
    floors = [arrays.loss.min()]
    if law.law.E > 0.5 * arrays.loss.min():  # a fitted E far below every loss would squash the plot
        ax.axhline(law.law.E, color="grey", lw=0.8, ls=":", label=f"fitted E = {law.law.E:.3f}")
        floors.append(law.law.E)
    if entropy is not None:
        ax.axhline(entropy, color="tab:red", lw=0.8, ls="-.", label=f"corpus entropy {entropy:.3f}")
        floors.append(entropy)
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="loss (nats/token)",
           title=f"Loss against compute (fitted E = {law.law.E:.3g})", ylim=(0.9 * min(floors), 1.1 * arrays.loss.max()))
    ax.legend(fontsize=8)
    return _save(fig, path)


def isoflop_profiles(fit: FrontierFit, path: Path) -> Path:
    """Each budget's losses against N with its parabola and vertex."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = plt.cm.plasma(np.linspace(0, 0.85, len(fit.profiles)))
    for profile, colour in zip(fit.profiles, colours):
        n = np.array(profile["n"])
        ax.scatter(n, profile["loss"], color=colour, s=16)
        x = np.linspace(np.log(n.min()), np.log(n.max()), 100)
        ax.plot(np.exp(x), np.polyval(profile["parabola"], x), color=colour, lw=1.2,
                label=f"C = {profile['flops']:.2g}")
        ax.axvline(profile["n_opt"], color=colour, lw=0.6, ls=":")
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss (nats/token)", title="IsoFLOP profiles")
    ax.legend(fontsize=8)
    return _save(fig, path)


def residuals(arrays: Arrays, fit: ParametricFit, path: Path) -> Path:
    """The fitted surface's residuals (log fitted - log measured) against N and against D."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, x, label in ((axes[0], arrays.n, "parameters N"), (axes[1], arrays.d, "tokens D")):
        ax.scatter(x, fit.residuals * 100, s=12, c=np.log10(arrays.c), cmap="cividis")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel=label)
    axes[0].set_ylabel("residual (% of loss)")
    fig.suptitle(f"Residuals of L(N, D); rms {np.sqrt(np.mean(fit.residuals ** 2)) * 100:.2f}%")
    return _save(fig, path)


def bootstrap_distributions(fit: ParametricFit, path: Path) -> Path:
    """Histograms of every bootstrapped parameter and of a, with the fit and its 95% interval."""
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    a = fit.samples[:, NAMES.index("beta")] / (fit.samples[:, NAMES.index("alpha")]
                                               + fit.samples[:, NAMES.index("beta")])
    columns = [*(fit.samples[:, i] for i in range(len(NAMES))), a]
    for ax, name, values in zip(axes.flat, [*NAMES, "a"], columns):
        estimate = fit.estimates[name]
        ax.hist(values[np.isfinite(values)], bins=40, color="tab:blue", alpha=0.75)
        ax.axvline(estimate.value, color="k", lw=1.2)
        for bound in (estimate.low, estimate.high):
            ax.axvline(bound, color="tab:red", lw=0.8, ls="--")
        ax.set_title(f"{name} = {estimate.value:.4g}", fontsize=10)
    fig.suptitle(f"{len(fit.samples)} bootstrap fits; 95% intervals dashed")
    return _save(fig, path)
