"""Calibration probes: real training steps of a few plans, timed right after a profile, so that the
first plan search on it is already calibrated (`launcher.calibrate`).

A profile times every part of a step alone; a real step costs more, and by different factors for
different parts. The probes are uniform plans of the profiled model that between them exercise
the cost model's terms on the profiled ranks: data parallelism (ddp), full sharding with
checkpointing, tensor parallelism of every degree (beside data parallelism below the world
size), a pipeline over as many ranks as layers allow,
and, for MoE models, expert parallelism. Each trains `PROBE_LAYERS` layers of the model (the
layer pattern's types all present) on micro-batches of one sequence per rank, max(2, ranks) of
them per step; a
probe the plan rules refuse, or that the cost model says would not fit in this machine's memory
or would take longer than `PROBE_SECONDS`, is left out. Each runs `WARMUP` steps, then `STEPS`
timed ones in rounds with the others (a step counts as its slowest rank's; the median is kept).

`StepTimer` and `time_plans` are also what the planner benchmarks measure plans with.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import traceback

import torch
import torch.distributed as dist

PROBE_LAYERS = 4
MICRO_BATCHES = 2
WARMUP, STEPS = 1, 3
PROBE_SECONDS = 20.0  # predicted (uncalibrated) time of a probe's steps beyond which it is skipped
MAX_NORM = 1.0


class StepTimer:
    """One plan's model, AdamW and fixed random batches on this rank, and the times of its steps:
    what `train.loop` runs per step (train_step, clipping and AdamW, zero_grad), under the plan's
    engine (the native runtime, or DeepSpeed)."""

    def __init__(self, cfg, plan, seq_len: int, seed: int = 0):
        from stratagem.model import Transformer
        from stratagem.parallel.deepspeed_engine import DeepSpeedRun
        from stratagem.parallel.runtime import parallelize
        from stratagem.train.config import TrainConfig
        from stratagem.train.optim import build_optimizer

        torch.manual_seed(seed)
        model, settings = Transformer(cfg), TrainConfig()
        self.engine = DeepSpeedRun(model, plan, settings) if plan.engine.deepspeed else parallelize(model, plan)
        self.optimizer = build_optimizer(self.engine.state_module, settings)
        self.engine.start(self.optimizer)
        generator = torch.Generator().manual_seed(seed + 1)
        pipe = plan.pipeline
        self.batches = [[torch.randint(cfg.vocab_size, (pipe.micro_batch_size, seq_len + 1), generator=generator)
                         for _ in range(pipe.num_micro_batches)] for _ in range(4)]
        self.seconds, self.losses = [], []

    def run_step(self, batches) -> float:
        loss = self.engine.train_step(batches)
        self.engine.step(self.optimizer, MAX_NORM)
        self.engine.after_optimizer_step()
        return loss

    def step(self, timed: bool) -> None:
        batches = self.batches[len(self.losses) % len(self.batches)]
        dist.barrier()
        began = time.perf_counter()
        self.losses.append(self.run_step(batches))
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = torch.tensor(time.perf_counter() - began, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step took as long as its slowest rank
        if timed:
            self.seconds.append(elapsed.item())


def failure(error: Exception) -> dict:
    return {"error": f"{type(error).__name__}: {error}".splitlines()[0], "traceback": traceback.format_exc()}


def time_plans(plans: dict, seq_len: int, warmup: int, rounds: int, say=None, finish=None) -> dict:
    """On every rank: `plans` (name -> (model config, plan)) set up and warmed up in turn, then
    `rounds` rounds of one timed step of each, so that all see the same machine load. name ->
    {"step_s": [...], "losses": [...]}, or {"error": line, "traceback": ...} for a plan that raised
    (alike on every rank, as when the runtime refuses it), which is left out of what follows.
    `finish(timer) -> dict`, if given, runs last on each plan's timer and its entries join the result."""
    torch.set_num_threads(1)
    timers, results = {}, {}

    def attempt(name: str, action) -> None:
        try:
            action()
        except Exception as error:
            results[name] = failure(error)
            timers.pop(name, None)

    def log(message: str) -> None:
        if say is not None and dist.get_rank() == 0:
            say(message)

    for name, (cfg, plan) in plans.items():
        began = time.perf_counter()

        def set_up(name=name, cfg=cfg, plan=plan) -> None:
            timers[name] = StepTimer(cfg, plan, seq_len)
            for _ in range(warmup):
                timers[name].step(timed=False)

        attempt(name, set_up)
        log(f"set up + {warmup} warm-up steps: {name:32s} {time.perf_counter() - began:6.1f} s")
    for round_ in range(rounds):
        began = time.perf_counter()
        for name, timer in list(timers.items()):
            attempt(name, lambda timer=timer: timer.step(timed=True))
        log(f"round {round_ + 1} of {rounds}: {time.perf_counter() - began:6.1f} s")
    for name, timer in list(timers.items()):
        began = time.perf_counter()
        extra = {}
        attempt(name, lambda timer=timer: extra.update(finish(timer) if finish else {}))
        if name in timers:
            results[name] = {"step_s": timer.seconds, "losses": timer.losses, **extra}
        if finish:
            log(f"finish: {name:32s} {time.perf_counter() - began:6.1f} s")
    return results


def probe_model(cfg):
    """The profiled model cut to `PROBE_LAYERS` layers, or whole if fewer would lose a layer type."""
    short = dataclasses.replace(cfg, n_layers=min(cfg.n_layers, PROBE_LAYERS))
    types = {(s.mixer, s.ffn) for s in cfg.layer_specs()}
    return short if {(s.mixer, s.ffn) for s in short.layer_specs()} == types else cfg


def probe_plans(cfg, ranks: int) -> dict:
    """name -> plan: the probes the plan rules allow for `cfg` (a `probe_model`) on `ranks` ranks."""
    from stratagem.errors import StratagemError
    from stratagem.parallel.plan import uniform_plan

    moe = any(spec.ffn == "moe" for spec in cfg.layer_specs())
    pp = max(d for d in range(1, min(ranks, cfg.n_layers) + 1) if ranks % d == 0)
    candidates = {
        "ddp": dict(),
        "fsdp-checkpointed": dict(dp="fsdp", checkpoint="full"),
        **{f"tp{tp}": dict(tp=tp) for tp in range(2, ranks + 1) if ranks % tp == 0},
        f"pp{pp}": dict(pp=pp),
        **({"ep2-fsdp": dict(dp="fsdp", ep=2)} if moe else {}),
    }
    out = {}
    for name, layout in candidates.items():
        try:
            out[name] = uniform_plan(cfg, ranks, micro_batch_size=ranks, num_micro_batches=probe_micro_batches(ranks),
                                     **layout)
        except StratagemError:
            continue
    return out


def probe_micro_batches(ranks: int) -> int:
    """Micro-batches per probe step: enough to fill a pipeline over every rank."""
    return max(MICRO_BATCHES, ranks)


def calibrate_with_probes(profile, cfg, ranks: int, seq_len: int, say=print) -> int:
    """Time the probes that fit on `ranks` local ranks and record them in `profile` (observations and
    refitted corrections, `calibrate.record_run`); returns how many were recorded."""
    from stratagem.launcher.calibrate import record_run, step_terms
    from stratagem.launcher.cost import Workload, predict
    from stratagem.launcher.hardware import Measured
    from stratagem.launcher.local import run_local
    from stratagem.parallel.plan import summary

    model = probe_model(cfg)
    work = Workload.of(model, seq_len, ranks * probe_micro_batches(ranks))
    hw = Measured(dataclasses.replace(profile, corrections={}, observations=[]))
    chosen, predictions = {}, {}
    for name, plan in probe_plans(model, ranks).items():
        prediction = predict(hw, work, plan)
        if not prediction.fits or prediction.step_seconds * (WARMUP + STEPS) > PROBE_SECONDS:
            say(f"probe {name}: left out ({'does not fit' if not prediction.fits else 'too slow to run here'})")
            continue
        chosen[name], predictions[name] = plan, prediction
    if not chosen:
        return 0
    began = time.perf_counter()
    results = run_local(ranks, time_plans, {n: (model, p) for n, p in chosen.items()}, seq_len, WARMUP, STEPS)[0]
    for name, plan in chosen.items():
        if "error" in results[name]:
            say(f"probe {name}: failed ({results[name]['error']})")
            continue
        measured = statistics.median(results[name]["step_s"])
        record_run(profile, f"probe {name}", summary(plan), step_terms(predictions[name]), measured)
        say(f"probe {name:18s} measured {measured * 1000:8.1f} ms/step, micro-benchmarks predict "
            f"{predictions[name].step_seconds * 1000:8.1f} ms")
    say(f"probes: {len(profile.observations)} plans timed in {time.perf_counter() - began:.1f} s; corrections "
        + (", ".join(f"{t} {f:.2f}" for t, f in profile.corrections.items() if f != 1.0) or "none"))
    return len(profile.observations)
