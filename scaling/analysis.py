"""From points to laws: select the points, fit approach 3 (and per model family), approaches 2
and 1 where the data allows them, and gather what the report shows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stratagem.scaling.frontier import FrontierFit, envelope, flops_per_param_token, isoflop
from stratagem.scaling.parametric import GRIDS, NAMES, ParametricFit, fit_law
from stratagem.scaling.points import (PARAM_KINDS, Point, RunInfo, ScalingInputError, as_arrays, check_points,
                                      select)

POINT_SETS = ("auto", "all", "final", "decay-ends")


@dataclass
class FitOptions:
    params: str = "non_embedding"  # which N: total | non_embedding | active
    points: str = "auto"  # all | final | decay-ends | auto (decay ends if any run has a decay, else all)
    bootstrap: int = 1000
    grid: str = "default"  # a name in parametric.GRIDS
    pinned: dict[str, float] = field(default_factory=dict)
    target_flops: float | None = None  # the budget to allocate; default 100 x the largest compute fitted
    mix_tokenizers: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.params not in PARAM_KINDS:
            raise ScalingInputError(f"params {self.params!r}: must be one of {', '.join(PARAM_KINDS)}")
        if self.points not in POINT_SETS:
            raise ScalingInputError(f"points {self.points!r}: must be one of {', '.join(POINT_SETS)}")
        if self.grid not in GRIDS:
            raise ScalingInputError(f"grid {self.grid!r}: must be one of {', '.join(GRIDS)}")
        if self.bootstrap < 0:
            raise ScalingInputError(f"bootstrap {self.bootstrap}: must not be negative")
        for name, value in self.pinned.items():
            if name not in NAMES:
                raise ScalingInputError(f"pinned {name!r}: the law's parameters are {', '.join(NAMES)}")
            if not np.isfinite(value) or value <= 0:
                raise ScalingInputError(f"pinned {name} = {value!r}: must be positive")
        if self.target_flops is not None and not self.target_flops > 0:
            raise ScalingInputError(f"target flops {self.target_flops!r}: must be positive")


@dataclass
class Analysis:
    sources: list[str]
    options: FitOptions
    points: list[Point]  # the points approaches 2 and 3 fit
    curves: list[Point]  # every point: approach 1's training curves
    runs: list[RunInfo]
    law: ParametricFit
    frontiers: list[FrontierFit]
    families: dict[str, ParametricFit]  # approach 3 per model family, when there are several
    notes: list[str]  # approaches that did not apply, and why

    @property
    def entropy(self) -> float | None:
        """The synthetic corpus's exact loss floor, when every run trained on it."""
        values = {r.entropy for r in self.runs}
        return values.pop() if len(values) == 1 and None not in values else None


def choose_points(points: list[Point], which: str) -> tuple[list[Point], str]:
    """The points to fit, and the rule that picked them."""
    if which == "auto":
        which = "decay-ends" if any(p.phase == "decay" for p in points) else "all"
    chosen = {"all": points, "final": select(points, final_only=True),
              "decay-ends": select(points, decay_ends=True)}[which]
    return chosen, which


def analyse(points: list[Point], runs: list[RunInfo], sources: list[str], options: FitOptions) -> Analysis:
    """Every fit the points allow; one-line errors for what approach 3 cannot fit, before any fitting."""
    options.validate()
    chosen, rule = choose_points(points, options.points)
    options.points = rule
    check_points(points, 0, options.mix_tokenizers)
    check_points(chosen, len(NAMES) - len(options.pinned), options.mix_tokenizers)
    arrays = as_arrays(chosen, options.params)
    target = options.target_flops or 100 * float(arrays.c.max())
    options.target_flops = target
    k = flops_per_param_token(chosen, options.params)
    common = dict(pinned=options.pinned, grid=GRIDS[options.grid], seed=options.seed, target_flops=target,
                  flops_per_param_token=k)
    law = fit_law(arrays, bootstrap=options.bootstrap, **common)
    frontiers, notes = [], []
    for name, approach, data in (("2", isoflop, chosen), ("1", envelope, points)):
        try:
            frontiers.append(approach(data, options.params, bootstrap=options.bootstrap, seed=options.seed,
                                      target_flops=target))
        except ScalingInputError as err:
            notes.append(f"approach {name} not applied: {err}")
    notes += _undetermined(law)
    families: dict[str, ParametricFit] = {}
    names = sorted({p.family for p in chosen})
    if len(names) > 1:
        for family in names:
            subset = [p for p in chosen if p.family == family]
            if len(subset) <= len(NAMES) - len(options.pinned):
                notes.append(f"family {family}: {len(subset)} points, too few for its own fit")
                continue
            families[family] = fit_law(as_arrays(subset, options.params), bootstrap=options.bootstrap, **common)
    return Analysis(sources=sources, options=options, points=chosen, curves=points, runs=runs, law=law,
                    frontiers=frontiers, families=families, notes=notes)


def _undetermined(law: ParametricFit) -> list[str]:
    """A warning per parameter whose 95% interval spans more than a decade: the points do not pin it down."""
    out = []
    for name in (*NAMES, "a"):
        estimate = law.estimates[name]
        if name not in law.pinned and estimate.low > 0 and estimate.high > 10 * estimate.low:
            out.append(f"{name} is not determined by these points: its 95% interval [{estimate.low:.3g}, "
                       f"{estimate.high:.3g}] spans more than a decade (add sizes and budgets, or pin it)")
    return out
