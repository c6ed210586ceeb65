"""The cost model against measurement: predicted vs measured step time of many plans on 4 gloo ranks.

The model is the tiny hybrid MoE (Gated DeltaNet + attention, MoE feed-forwards) with 4 layers and
4 KV heads; the workload is `plans.py`'s (4 micro-batches of 8 x 64 tokens per step, float32
AdamW). The plans are every uniform plan of pipeline degree 1, 2 or 4 (1F1B), tensor degree 1, 2
or 4, dp kind ddp or fsdp, checkpointing none or full, and expert degree 1 or 2, that the plan
rules allow, and six plans that vary the layout by layer (`MIXES`). This machine is profiled first (`stratagem profile`, cached), every plan is measured
as `plans.py` measures it (`launcher.probe.time_plans`: median of rounds, one step of each plan
per round), and each is predicted by the cost model from the profile's micro-benchmarks. Reported, before and after calibration
(`launcher.calibrate`: per-term factors; after = 4-fold cross-validation, each plan predicted with
factors fitted on the other three quarters): the median absolute relative error of the predicted
step time, Spearman's rank correlation of predicted and measured, and how the plan with the least
predicted time measured against the fastest measured one; and the same for the factors the
profile's own probes fitted (what a first `stratagem launch` plans with). The measured plans join
the probes as the profile's observations, with the factors fitted on all of them, for every later
plan search with it. Writes
benchmarks/results/planner_accuracy.json.

    .venv/bin/python benchmarks/planner_accuracy.py [--rounds 3] [--reuse]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import statistics
from pathlib import Path

from stratagem.launcher.calibrate import corrected_seconds, fit_corrections, record_run, step_terms
from stratagem.launcher.cost import Workload, predict
from stratagem.launcher.hardware import Measured
from stratagem.launcher.local import run_local
from stratagem.launcher.probe import time_plans
from stratagem.launcher.profile import ensure_profile
from stratagem.model import get_flavor
from stratagem.parallel.plan import LayerLayout, check_plan, summary, uniform_plan
from stratagem.errors import StratagemError

import plans as measured_plans  # benchmarks/plans.py: the ranks' measurement
import report

MODEL = dataclasses.replace(get_flavor("tiny-hybrid-moe"), n_layers=4, n_kv_heads=4)
WORLD, SEQ_LEN = measured_plans.WORLD, measured_plans.SEQ_LEN
MICRO_BATCH, MICRO_BATCHES = measured_plans.MICRO_BATCH, measured_plans.MICRO_BATCHES


def enumerated() -> dict:
    """Every uniform plan the rules allow (ddp and fsdp only where they differ: dp degree > 1), then
    per-layer mixes: tensor degrees, dp kinds, checkpointing and expert degrees varying by layer, and
    stages split unevenly."""
    out = {}
    for pp, tp, dp, checkpoint, ep in itertools.product((1, 2, 4), (1, 2, 4), ("ddp", "fsdp"), ("none", "full"), (1, 2)):
        if dp == "fsdp" and pp * tp == WORLD:
            continue  # one rank per data-parallel group: the same plan as ddp
        try:
            plan = uniform_plan(MODEL, WORLD, tp=tp, pp=pp, dp=dp, checkpoint=checkpoint, ep=ep,
                                micro_batch_size=MICRO_BATCH, num_micro_batches=MICRO_BATCHES)
            check_plan(plan, MODEL, world=WORLD)
        except StratagemError:
            continue
        out[f"pp{pp}-tp{tp}-{dp}-{checkpoint}-ep{ep}"] = plan
    for name, (pp, layers, stages) in MIXES.items():
        plan = uniform_plan(MODEL, WORLD, pp=pp, micro_batch_size=MICRO_BATCH, num_micro_batches=MICRO_BATCHES)
        plan.layers = [LayerLayout(tp=tp, dp=dp, checkpoint=ckpt, ep=ep) for tp, dp, ckpt, ep in layers]
        plan.pipeline.stages = stages or plan.pipeline.stages
        check_plan(plan, MODEL, world=WORLD)
        out[name] = plan
    return out


# name -> (pipeline degree, per layer (tp, dp kind, checkpointing, ep), stages or None for even ones)
MIXES = {
    "mix-pp1-tp-1-2-1-2": (1, [(1, "ddp", "none", 1), (2, "ddp", "none", 1)] * 2, None),
    "mix-pp1-fsdp-then-ddp": (1, [(1, "fsdp", "none", 1)] * 2 + [(1, "ddp", "none", 1)] * 2, None),
    "mix-pp1-checkpoint-half": (1, [(1, "ddp", "full", 1), (1, "ddp", "none", 1)] * 2, None),
    "mix-pp1-ep2-on-deltanet": (1, [(1, "fsdp", "none", 2), (1, "fsdp", "none", 1)] * 2, None),
    "mix-pp2-tp2-then-tp1": (2, [(2, "ddp", "none", 1)] * 2 + [(1, "fsdp", "none", 1)] * 2, None),
    "mix-pp2-uneven-1-3": (2, [(1, "ddp", "none", 1)] * 4, [(0, 1), (1, 4)]),
}


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def metrics(names: list[str], predicted: dict, measured: dict) -> dict:
    pick = min(names, key=predicted.__getitem__)
    fastest = min(names, key=measured.__getitem__)
    return {"median_abs_relative_error": round(statistics.median(abs(predicted[n] / measured[n] - 1) for n in names), 4),
            "spearman": round(spearman([predicted[n] for n in names], [measured[n] for n in names]), 4),
            "pick": pick, "pick_measured_ms": round(1000 * measured[pick], 2), "fastest": fastest,
            "fastest_measured_ms": round(1000 * measured[fastest], 2),
            "pick_over_fastest": round(measured[pick] / measured[fastest], 4)}


def cross_validated(names: list[str], predictions: dict, measured: dict, folds: int = 4) -> dict:
    """Each plan's step time predicted with factors fitted on the other folds."""
    out = {}
    for k in range(folds):
        test = names[k::folds]
        train = [n for n in names if n not in test]
        factors = fit_corrections([step_terms(predictions[n]) for n in train], [measured[n] for n in train])
        out.update({n: corrected_seconds(step_terms(predictions[n]), factors) for n in test})
    return out


def measure(cases: dict, warmup: int, rounds: int) -> dict:
    """name -> median measured step seconds (or an error line)."""
    ranks = run_local(WORLD, time_plans, {n: (MODEL, p) for n, p in cases.items()}, SEQ_LEN, warmup, rounds,
                      functools.partial(print, flush=True))
    out = {}
    for name in cases:
        results = [r[name] for r in ranks]
        errors = [r["error"] for r in results if "error" in r]
        out[name] = errors[0] if errors else statistics.median(results[0]["step_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="take the measured times from --out instead of measuring")
    parser.add_argument("--profile", default=None, help="the profile file (default: profiles/<host>-4r.json)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "planner_accuracy.json"))
    args = parser.parse_args()

    profile = ensure_profile(MODEL, WORLD, SEQ_LEN, args.profile)
    probes = [o for o in profile.observations if o["run"].startswith("probe ")]
    probe_factors = fit_corrections([o["terms"] for o in probes], [o["measured_s"] for o in probes]) if probes else None
    profile.corrections = {}  # predict from the micro-benchmarks alone; calibrations follow
    hw = Measured(profile)
    work = Workload.of(MODEL, SEQ_LEN, MICRO_BATCH * MICRO_BATCHES)
    cases = enumerated()
    if args.reuse:
        previous = json.loads(Path(args.out).read_text())["plans"]
        times = {n: previous[n]["measured_ms"] / 1000 if "measured_ms" in previous[n] else previous[n]["error"]
                 for n in cases}
    else:
        times = measure(cases, args.warmup, args.rounds)
    names = [n for n in cases if not isinstance(times[n], str)]
    measured = {n: times[n] for n in names}
    predictions = {n: predict(hw, work, cases[n]) for n in names}
    before = {n: predictions[n].step_seconds for n in names}
    after = cross_validated(names, predictions, measured)
    factors = fit_corrections([step_terms(predictions[n]) for n in names], [measured[n] for n in names])
    profile.observations = probes  # and these plans beside them
    for n in names:
        record_run(profile, f"planner_accuracy {n}", summary(cases[n]), step_terms(predictions[n]), measured[n])
    profile.save(profile.source)
    rows = {n: ({"error": times[n]} if n not in measured else {
        "measured_ms": round(1000 * measured[n], 2), "predicted_ms": round(1000 * before[n], 2),
        "calibrated_ms": round(1000 * after[n], 2),
        "predicted_breakdown_ms": {k: round(1000 * v, 3) for k, v in predictions[n].breakdown.items()}})
        | {"plan": summary(cases[n])} for n in cases}
    result = {
        "plans": len(names), "failed": len(cases) - len(names),
        "before_calibration": metrics(names, before, measured),
        "calibrated_by_the_profiles_probes": None if probe_factors is None else metrics(
            names, {n: corrected_seconds(step_terms(predictions[n]), probe_factors) for n in names}, measured),
        "after_calibration_4_fold": metrics(names, after, measured),
        "corrections_fitted_on_all": {k: round(v, 3) for k, v in factors.items()},
        "goals": {"median_abs_relative_error": "< 0.15", "spearman": ">= 0.8", "pick_over_fastest": "<= 1.10"},
    }
    report.write({"benchmark": "planner_accuracy", "model": dataclasses.asdict(MODEL), "world": WORLD,
                  "batch": {"seq_len": SEQ_LEN, "micro_batch_size": MICRO_BATCH, "num_micro_batches": MICRO_BATCHES},
                  "profile": str(profile.source), "summary": result, "plans": rows,
                  "machine": report.machine(ranks=WORLD, threads_per_rank=1)}, args.out, echo=False)
    for name in sorted(names, key=measured.__getitem__):
        print(f"{name:28s} measured {1000 * measured[name]:8.1f} ms  predicted {1000 * before[name]:8.1f} ms "
              f"({before[name] / measured[name] - 1:+.0%}), calibrated {1000 * after[name]:8.1f} ms "
              f"({after[name] / measured[name] - 1:+.0%})")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
