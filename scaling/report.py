"""The fit's outputs: report.md (tables and plots), fit.json (every number) and a printed summary."""

from __future__ import annotations

import json
from pathlib import Path

from stratagem.scaling import plots
from stratagem.scaling.analysis import Analysis
from stratagem.scaling.estimate import Estimate
from stratagem.scaling.parametric import NAMES, ParametricFit
from stratagem.scaling.points import as_arrays, fingerprint

DERIVED = ("a", "b", "G", "n_opt", "d_opt", "tokens_per_param", "loss_at_target")
DERIVED_LABELS = {"a": "a (N_opt ∝ C^a)", "b": "b (D_opt ∝ C^b)", "G": "G", "n_opt": "N_opt at target",
                  "d_opt": "D_opt at target", "tokens_per_param": "tokens per parameter",
                  "loss_at_target": "loss at target"}


def write_report(analysis: Analysis, out: str | Path) -> dict[str, Path]:
    """Write report.md, fit.json and the PNGs into `out`; the paths written, by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = as_arrays(analysis.points, analysis.options.params)
    isoflop = [f for f in analysis.frontiers if f.approach.startswith("2")]
    written = {
        "loss_vs_compute": plots.loss_vs_compute(arrays, analysis.law, analysis.frontiers,
                                                 out / "loss_vs_compute.png", analysis.entropy),
        "residuals": plots.residuals(arrays, analysis.law, out / "residuals.png"),
    }
    if isoflop:
        written["isoflop"] = plots.isoflop_profiles(isoflop[0], out / "isoflop.png")
    if len(analysis.law.samples):
        written["bootstrap"] = plots.bootstrap_distributions(analysis.law, out / "bootstrap.png")
    (out / "fit.json").write_text(json.dumps(to_json(analysis), indent=1))
    (out / "report.md").write_text(markdown(analysis, {k: p.name for k, p in written.items()}))
    return {**written, "json": out / "fit.json", "report": out / "report.md"}


def to_json(analysis: Analysis) -> dict:
    options = analysis.options
    return {"sources": analysis.sources, "options": vars(options) | {"pinned": dict(options.pinned)},
            "points": len(analysis.points), "curve_points": len(analysis.curves),
            "runs": len({p.run for p in analysis.points}), "data_fingerprint": fingerprint(analysis.points),
            "corpus_entropy": analysis.entropy, "approach_3": analysis.law.to_dict(),
            "frontiers": [f.to_dict() for f in analysis.frontiers],
            "families": {name: fit.to_dict() for name, fit in analysis.families.items()},
            "notes": analysis.notes}


def _num(x: float) -> str:
    return f"{x:.4g}"


def _row(name: str, e: Estimate) -> str:
    return f"| {name} | {_num(e.value)} | {_num(e.stderr)} | [{_num(e.low)}, {_num(e.high)}] |"


def _law_table(fit: ParametricFit) -> list[str]:
    lines = ["| quantity | value | std. error | 95% interval |", "|---|---|---|---|"]
    lines += [_row(n + (" (pinned)" if n in fit.pinned else ""), fit.estimates[n]) for n in NAMES]
    lines += [_row(DERIVED_LABELS[k], fit.estimates[k]) for k in DERIVED]
    return lines


def markdown(analysis: Analysis, figures: dict[str, str]) -> str:
    fit, options = analysis.law, analysis.options
    law = fit.law
    lines = [
        "# Scaling-law fit", "",
        f"Sources: {', '.join(analysis.sources)}. "
        f"{len(analysis.points)} points ({options.points}) from {len({p.run for p in analysis.points})} runs; "
        f"approach 1 reads {len(analysis.curves)} points of the training curves. N counts "
        f"{options.params.replace('_', '-')} parameters; C is each run's own training FLOPs "
        f"(C / (N D) = {fit.flops_per_param_token:.3g} here, 6 in the usual convention). "
        f"Data fingerprint {fingerprint(analysis.points)}.", "",
        "## Approach 3: L(N, D) = E + A / N^alpha + B / D^beta", "",
        f"Huber loss (delta 1e-3) on log loss, L-BFGS from each of {fit.starts} grid starts "
        f"({' x '.join(str(len(v)) for n, v in fit.grid.items() if n not in fit.pinned)} over "
        f"{', '.join(f'{n} {v}' for n, v in fit.grid.items() if n not in fit.pinned)}; E, A and B as logs); "
        f"{fit.reached} of them reached the best objective ({fit.objective:.6g}). "
        f"Intervals: {len(fit.samples)} bootstrap resamples of the points, each refitted. "
        f"Residual rms {100 * float((fit.residuals ** 2).mean() ** 0.5):.2f}% of the loss.", "",
        "Unrounded: " + ", ".join(f"{n} = {getattr(law, n)!r}" for n in NAMES), "",
        *_law_table(fit), "",
        f"Target compute {options.target_flops:.3g} FLOPs: N_opt = G (C/k)^a, D_opt = G^-1 (C/k)^b with "
        f"k = {fit.flops_per_param_token:.3g}.", "",
    ]
    entropy = analysis.entropy
    if entropy is not None:
        e = fit.estimates["E"]
        inside = "inside" if e.contains(entropy) else "outside"
        lines += ["## Irreducible loss against the corpus's entropy", "",
                  f"The synthetic corpus's exact entropy rate is {entropy:.4f} nats/token: the loss of a "
                  f"perfect model. The fitted E is {e.value:.4f} (95% interval [{e.low:.4f}, {e.high:.4f}]), "
                  f"{e.value - entropy:+.4f} from it and the entropy is {inside} the interval.", ""]
    lines += ["## The compute-optimal exponent from each approach", "",
              "| approach | a | 95% interval | b | 95% interval | N_opt at target | D_opt at target |",
              "|---|---|---|---|---|---|---|"]
    for name, est in [("3: parametric fit", fit.estimates),
                      *((f.approach, f.estimates) for f in analysis.frontiers)]:
        lines.append(f"| {name} | {_num(est['a'].value)} | [{_num(est['a'].low)}, {_num(est['a'].high)}] | "
                     f"{_num(est['b'].value)} | [{_num(est['b'].low)}, {_num(est['b'].high)}] | "
                     f"{_num(est['n_opt'].value)} | {_num(est['d_opt'].value)} |")
    lines += [""] + [f"- {note}" for note in analysis.notes] + ([""] if analysis.notes else [])
    if analysis.families:
        lines += ["## Model families fitted separately", "",
                  "| family | points | E | alpha | beta | a | 95% interval of a |", "|---|---|---|---|---|---|---|"]
        for family, f in analysis.families.items():
            est = f.estimates
            lines.append(f"| {family} | {f.points} | {_num(est['E'].value)} | {_num(est['alpha'].value)} | "
                         f"{_num(est['beta'].value)} | {_num(est['a'].value)} | "
                         f"[{_num(est['a'].low)}, {_num(est['a'].high)}] |")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{name}]({file})" for name, file in figures.items()] + [""]
    return "\n".join(lines)


def summary(analysis: Analysis) -> str:
    """The printed table: the law, the allocation at the target and each approach's exponent."""
    fit = analysis.law
    rows = [(n, fit.estimates[n]) for n in NAMES] + [(DERIVED_LABELS[k], fit.estimates[k]) for k in DERIVED]
    rows += [(f"a, approach {f.approach.split(':')[0]}", f.estimates["a"]) for f in analysis.frontiers]
    width = max(len(name) for name, _ in rows)
    lines = [f"{len(analysis.points)} points ({analysis.options.points}), {fit.reached}/{fit.starts} starts reached "
             f"the optimum, {len(fit.samples)} bootstrap fits; target {analysis.options.target_flops:.3g} FLOPs"]
    lines += [f"{name.ljust(width)}  {est}" for name, est in rows]
    if analysis.entropy is not None:
        lines.append(f"{'corpus entropy'.ljust(width)}  {analysis.entropy:.4f} (fitted E {fit.law.E:.4f})")
    lines += analysis.notes
    return "\n".join(lines)
