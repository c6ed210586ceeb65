"""Native FSDP against DeepSpeed ZeRO-3 on 4 real gloo ranks: step time and memory, side by side.

The same model (benchmarks/plans.py's 8-layer tiny shape), the same global batch (4 micro-batches
of 8 sequences of 64 tokens) and the same step as `train.loop` runs it (`launcher.probe.StepTimer`:
train_step, clipping and AdamW, zero_grad), under two plans: every layer ``fsdp`` on the native
runtime (FSDP2), and ``engine = deepspeed`` with ZeRO stage 3 (optionally more DeepSpeed variants
with --variants). One launch of 4 processes (one thread each) sets every engine up and times them
in alternating rounds (`launcher.probe.time_plans`), so that all see the same machine load; the
result is the median over rounds of the slowest rank's step, and each engine's ratio to FSDP.

Memory per rank, measured in a launch of its own for each engine (fresh processes holding only that
engine), after the warm-up steps: ``live_bytes`` are the bytes of every distinct tensor storage
alive in the process as the next step starts (found through the garbage collector:
model states, optimizer states, buffers, DeepSpeed's flat partitions, the batch; the DeepSpeed
engine's shadow copy of the model included, reported apart as ``shadow_bytes``), and
``step_peak_bytes`` the highest net amount allocated during the step (torch.profiler's memory
events, as benchmarks/plans.py measures it). Their sum is ``peak_bytes``.

    .venv/bin/python benchmarks/engines.py [--warmup 2] [--rounds 6] [--variants zero3 zero3-offload ...]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from stratagem.launcher.local import run_local
from stratagem.launcher.probe import StepTimer, time_plans
from stratagem.model import Transformer
from stratagem.parallel.deepspeed_engine import DeepSpeedRun
from stratagem.parallel.plan import Plan, deepspeed_plan, uniform_plan

import report  # benchmarks/report.py, beside this script
from plans import DENSE, MICRO_BATCH, MICRO_BATCHES, MIB, SEQ_LEN, WORLD, allocated_peak

VARIANTS = {
    "zero3": {"zero_stage": 3},
    "zero3-offload": {"zero_stage": 3, "offload_optimizer": True},
    "zero2": {"zero_stage": 2},
    "zero1": {"zero_stage": 1},
}


def plans(variants: list[str]) -> dict[str, Plan]:
    out = {"fsdp": uniform_plan(DENSE, WORLD, dp="fsdp", micro_batch_size=MICRO_BATCH,
                                num_micro_batches=MICRO_BATCHES)}
    for name in variants:
        out[f"deepspeed-{name}"] = deepspeed_plan(DENSE, WORLD, micro_batch_size=MICRO_BATCH,
                                                  num_micro_batches=MICRO_BATCHES, **VARIANTS[name])
    return out


def live_tensor_bytes(exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can see (views and
    DTensors' local tensors share their storage: each counts once)."""
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # a wrapper subclass without storage of its own
                continue
            if storage._cdata not in exclude:
                seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def memory_step(timer: StepTimer) -> dict:
    """One more step, its memory measured (see the module docstring)."""
    batches = timer.batches[len(timer.losses) % len(timer.batches)]
    dist.barrier()
    shadow = sum(p.untyped_storage().nbytes() for p in timer.engine.state_module.parameters()) \
        if isinstance(timer.engine, DeepSpeedRun) else 0
    live = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        timer.losses.append(timer.run_step(batches))
        timer.optimizer.zero_grad(set_to_none=True)
    step_peak = allocated_peak(prof)
    return {"live_bytes": live, "shadow_bytes": shadow, "step_peak_bytes": step_peak, "peak_bytes": live + step_peak}


def rank_main(cases: dict, warmup: int, rounds: int, finish=None) -> dict:
    return time_plans(cases, SEQ_LEN, warmup, rounds, say=lambda line: print(line, flush=True), finish=finish)


def summarise(ranks: list[dict], name: str, baseline: float | None) -> dict:
    runs = [r[name] for r in ranks]
    if "error" in runs[0]:
        return {"error": runs[0]["error"]}
    step = statistics.median(runs[0]["step_s"])  # every rank holds the slowest rank's times
    entry = {"step_ms": round(1000 * step, 1), "all_step_ms": [round(1000 * s, 1) for s in runs[0]["step_s"]],
             "step_time_vs_fsdp": round(step / baseline, 3) if baseline else 1.0,
             "losses": [round(loss, 4) for loss in runs[0]["losses"]]}
    for key in ("live_bytes", "shadow_bytes", "step_peak_bytes", "peak_bytes"):
        entry[f"{key}_per_rank"] = [run[key] for run in runs]
    entry["peak_mib_max"] = round(max(run["peak_bytes"] for run in runs) / MIB, 2)
    entry["peak_without_shadow_mib_max"] = round(max(run["peak_bytes"] - run["shadow_bytes"] for run in runs) / MIB, 2)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--variants", nargs="*", default=["zero3"], choices=sorted(VARIANTS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "engines.json"))
    args = parser.parse_args()

    cases = {name: (DENSE, plan) for name, plan in plans(args.variants).items()}
    began = time.perf_counter()
    ranks = run_local(WORLD, rank_main, cases, args.warmup, args.rounds)
    for name, case in cases.items():  # memory: one engine per launch
        for rank, measured in zip(ranks, run_local(WORLD, rank_main, {name: case}, args.warmup, 0, memory_step)):
            rank[name].update({key: value for key, value in measured[name].items() if key.endswith("_bytes")})
    baseline = statistics.median(ranks[0]["fsdp"]["step_s"]) if "step_s" in ranks[0]["fsdp"] else None
    results = {name: {**summarise(ranks, name, baseline), "plan": cases[name][1].to_dict()} for name in cases}
    report.write({
        "benchmark": "engines",
        "what": __doc__.split("\n\n")[1].replace("\n", " ") + " " + __doc__.split("\n\n")[2].replace("\n", " "),
        "world_size": WORLD,
        "batch": {"seq_len": SEQ_LEN, "micro_batch_size": MICRO_BATCH, "num_micro_batches": MICRO_BATCHES},
        "params": sum(p.numel() for p in Transformer(DENSE).parameters()),
        "warmup_steps": args.warmup, "measured_steps": args.rounds, "wall_s": round(time.perf_counter() - began, 1),
        "machine": report.machine(),
        "results": results,
    }, args.out)


if __name__ == "__main__":
    main()
