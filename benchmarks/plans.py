"""Train one fixed small workload under many plans on 4 real gloo ranks: step time and memory per plan.

Every plan trains the same model (the tiny shape with 8 layers; a tiny-moe-shaped one for the MoE
plans) on the same global batch, 4 micro-batches of 8 sequences of 64 tokens (2048 tokens per
step), through the plan runtime (`parallel.runtime.parallelize`); a step is what `train.loop`
runs: ``train_step`` (forward and backward of every micro-batch), ``clip_grad_norm_``, AdamW,
``after_optimizer_step`` and ``zero_grad``. One launch of 4 processes (one thread each, on
whatever cores the machine has) runs every plan: each is set up (a fresh seeded model) and warmed
up in turn; then every round times one step of each plan in turn, so that all plans see the same
machine load; then each plan runs one more step with its memory measured. Barriers separate the
steps.

- **Step time**: each timed step starts after a barrier and counts as its slowest rank's; the
  result is the median over the rounds.
- **Peak memory** per rank (in the extra step, so that measuring costs no timed time): the bytes
  of the storages live as the step starts (model states, buffers, the batch) plus the highest net
  amount allocated during the step, from ``torch.profiler``'s memory events (``profile_memory``:
  every allocation and free of c10's CPU allocator, in time order, scratch inside an op and
  FSDP's in-place storage resizes included; gloo's own transport buffers are not c10 allocations).
- **Model state** per rank: the bytes of the distinct storages of the parameters (as the modules
  hold them, FSDP's gathered copies included, and as the optimizer holds them: local shards),
  their gradients and the AdamW state, sampled after every ATen op of the same step by a
  `TorchDispatchMode`: the peak, and ``at_rest`` just after the optimizer step (gradients held).

Writes benchmarks/results/plans.json, each entry with its plan as `Plan.to_dict()` for the
planner to calibrate against. A plan the runtime rejects or fails on is recorded with its error.

    .venv/bin/python benchmarks/plans.py [--warmup 2] [--rounds 4] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stratagem.launcher.local import run_local
from stratagem.launcher.probe import StepTimer, time_plans
from stratagem.model import Transformer, get_flavor
from stratagem.parallel.plan import LayerLayout, Plan, check_plan, uniform_plan

import report  # benchmarks/report.py, beside this script

WORLD = 4
SEQ_LEN = 64
MICRO_BATCH, MICRO_BATCHES = 8, 4  # sequences per micro-batch (over a stage's dp ranks), per step
MIB = 2 ** 20

# the tiny shapes with 8 layers (pipelines of 4 x 2 stages), 4 KV heads so that TP=4 divides every layer
DENSE = dataclasses.replace(get_flavor("tiny"), n_layers=8, n_kv_heads=4)
MOE = dataclasses.replace(get_flavor("tiny-moe"), n_layers=8, n_kv_heads=4)
MODELS = {"dense": DENSE, "moe": MOE}


def layer(tp: int = 1, dp: str = "fsdp", checkpoint: str = "none", ep: int = 1) -> LayerLayout:
    return LayerLayout(tp=tp, dp=dp, checkpoint=checkpoint, ep=ep)


def plan_of(model: str, layers: list[LayerLayout] | None = None, **kwargs) -> Plan:
    cfg = MODELS[model]
    plan = uniform_plan(cfg, WORLD, micro_batch_size=MICRO_BATCH, num_micro_batches=MICRO_BATCHES, **kwargs)
    if layers is not None:
        plan.layers = [layers[i % len(layers)] for i in range(cfg.n_layers)]
    check_plan(plan, cfg, world=WORLD)
    return plan


def cases() -> dict[str, tuple[str, Plan]]:
    """Every plan of the benchmark: name -> (model, plan)."""
    out = {
        "dp4-ddp": ("dense", plan_of("dense", dp="ddp")),
        "dp4-zero2": ("dense", plan_of("dense", dp="zero2")),
        "dp4-fsdp": ("dense", plan_of("dense", dp="fsdp")),
        "tp4": ("dense", plan_of("dense", tp=4)),
        "tp2-dp2-fsdp": ("dense", plan_of("dense", tp=2, dp="fsdp")),
    }
    for pp, dp in ((2, "fsdp"), (4, "ddp")):  # pp 4 leaves one rank per stage: dp degree 1
        prefix = f"pp{pp}-dp2-fsdp" if pp == 2 else "pp4"
        for schedule, virtual in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2)):
            out[f"{prefix}-{schedule}"] = ("dense", plan_of("dense", pp=pp, dp=dp, schedule=schedule,
                                                            virtual_stages=virtual))
    uneven = plan_of("dense", pp=2, dp="fsdp")
    uneven.pipeline.stages = [(0, 5), (5, 8)]  # fewer layers on the stage that also runs the head and loss
    check_plan(uneven, MODELS["dense"], world=WORLD)
    out["pp2-dp2-fsdp-1f1b-uneven-5-3"] = ("dense", uneven)
    out["mix-tp4-alternating-fsdp-dp4"] = ("dense", plan_of("dense", layers=[layer(tp=4), layer(tp=1, dp="fsdp")]))
    out["mix-tp2xdp2-beside-dp4"] = ("dense", plan_of("dense", layers=[
        layer(tp=2, dp="zero2"), layer(tp=1, dp="ddp"), layer(tp=2, dp="fsdp"), layer(tp=1, dp="zero2")]))
    out["dp4-fsdp-checkpoint-half"] = ("dense", plan_of("dense", layers=[
        layer(dp="fsdp", checkpoint="full"), layer(dp="fsdp")]))
    out["dp4-fsdp-checkpoint-all"] = ("dense", plan_of("dense", dp="fsdp", checkpoint="full"))
    out["moe-dp4-fsdp"] = ("moe", plan_of("moe", dp="fsdp"))
    out["moe-ep2-dp4-fsdp"] = ("moe", plan_of("moe", dp="fsdp", ep=2))
    return out


# --- memory: live tensor storage ------------------------------------------------------------------

def _storages(tensor, out: dict) -> None:
    """`tensor`'s storages into `out` (key -> UntypedStorage), read without dispatching an op:
    a DTensor's is its local tensor's, another subclass's those of its inner tensors."""
    if not isinstance(tensor, torch.Tensor):
        return
    local = getattr(tensor, "_local_tensor", None)
    if local is not None:
        tensor = local
    elif hasattr(tensor, "__tensor_flatten__"):
        for attr in tensor.__tensor_flatten__()[0]:
            _storages(getattr(tensor, attr), out)
        return
    storage = tensor.untyped_storage()
    out[storage._cdata] = storage


def _storage(tensor: torch.Tensor):
    """The storage of a plain tensor or of a DTensor's local tensor (no op dispatched)."""
    local = getattr(tensor, "_local_tensor", None)
    return (local if local is not None else tensor).untyped_storage()


def total_bytes(storages: dict) -> int:
    return sum(storage.nbytes() for storage in storages.values())


class ModelState:
    """The storages of parameters (as the modules hold them now, gathered copies included, and as
    the optimizer holds them: local shards), their gradients and the optimizer state. Built after
    the optimizer's first step: its parameters and state are then updated in place, so their
    storages and sizes are read once; the rest is read at every sample."""

    def __init__(self, modules, optimizer):
        # FSDP swaps gathered and sharded parameters in and out of the modules' _parameters
        self.holders = [m._parameters for module in modules for m in module.modules() if m._parameters]
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.fixed = {}
        for p in self.params:
            _storages(p, self.fixed)
        for state in optimizer.state.values():
            for value in state.values():
                _storages(value, self.fixed)
        self.fixed_bytes = total_bytes(self.fixed)

    def _moving(self) -> list[torch.Tensor]:
        held = [p for params in self.holders for p in params.values() if p is not None]
        grads = [g for p in held if p.is_leaf and (g := p.grad) is not None]
        return held + grads + [g for p in self.params if (g := p.grad) is not None]

    def storages(self) -> dict:
        out = dict(self.fixed)
        for tensor in self._moving():
            _storages(tensor, out)
        return out

    def bytes(self) -> int:
        """`total_bytes(self.storages())`, faster."""
        total, seen, fixed = self.fixed_bytes, set(), self.fixed
        for tensor in self._moving():
            storage = getattr(tensor, "_local_tensor", tensor).untyped_storage()
            key = storage._cdata
            if key not in fixed and key not in seen:
                seen.add(key)
                total += storage.nbytes()
        return total


def _keys(tree) -> set:
    return {_storage(t)._cdata for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class ModelStatePeak(TorchDispatchMode):
    """The highest `ModelState.bytes` after any ATen op run inside it that allocates (an output
    storage that is none of its inputs'). Model state only grows by allocations (a gradient, a
    reduce-scatter's output, an all-gather's buffer, each followed by more) and by FSDP regathering
    parameters into their resized storages, which the next allocating op (the forward's) sees."""

    def __init__(self, state: ModelState):
        super().__init__()
        self.state, self.peak = state, state.bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _keys(out) <= _keys((args, kwargs)):
            self.peak = max(self.peak, self.state.bytes())
        return out

    def sample(self) -> None:
        self.peak = max(self.peak, self.state.bytes())


def allocated_peak(prof) -> int:
    """The highest net bytes allocated (allocations minus frees, in time order) within a profile
    recorded with profile_memory: every CPU allocation and free of c10's allocator, those inside
    an op and storage resizes included."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


# --- the ranks ----------------------------------------------------------------------------------------

def memory_step(timer: StepTimer) -> dict:
    """One more step of `timer`'s plan, its memory measured (see the module docstring)."""
    batches = timer.batches[len(timer.losses) % len(timer.batches)]
    dist.barrier()
    state = ModelState(timer.engine.modules, timer.optimizer)
    live = state.storages()  # what is live as the step starts: model states, buffers, the batch
    for tensor in [*(b for module in timer.engine.modules for b in module.buffers()), *batches]:
        _storages(tensor, live)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, ModelStatePeak(state) as tracker:
        timer.losses.append(timer.run_step(batches))
        tracker.sample()
        at_rest = total_bytes(state.storages())
        timer.optimizer.zero_grad(set_to_none=True)
    return {"start_bytes": total_bytes(live), "peak_bytes": total_bytes(live) + allocated_peak(prof),
            "model_state_peak_bytes": tracker.peak, "model_state_at_rest_bytes": at_rest}


def rank_main(plans: dict, warmup: int, rounds: int) -> dict:
    """`plans`: name -> (model config, plan), timed in rounds (`launcher.probe.time_plans`), then
    each plan's memory step."""
    return time_plans(plans, SEQ_LEN, warmup, rounds, say=lambda line: print(line, flush=True), finish=memory_step)


# --- the launch -------------------------------------------------------------------------------------

def summarise(name: str, model: str, plan: Plan, ranks: list[dict]) -> dict:
    errors = [r[name]["error"] for r in ranks if "error" in r[name]]
    entry = {"model": model}
    if errors:
        entry["error"] = errors[0]
        entry["traceback"] = next(r[name]["traceback"] for r in ranks if "error" in r[name])
    else:
        runs = [r[name] for r in ranks]
        seconds = runs[0]["step_s"]  # every rank holds the slowest rank's times
        peaks = [run["peak_bytes"] for run in runs]
        entry.update({
            "step_ms": round(1000 * statistics.median(seconds), 1),
            "all_step_ms": [round(1000 * s, 1) for s in seconds],
            "tokens_per_s": round(MICRO_BATCH * MICRO_BATCHES * SEQ_LEN / statistics.median(seconds)),
            "peak_bytes_per_rank": peaks,
            "peak_mib_max": round(max(peaks) / MIB, 2),
            "model_state_peak_bytes_per_rank": [run["model_state_peak_bytes"] for run in runs],
            "model_state_peak_mib_max": round(max(run["model_state_peak_bytes"] for run in runs) / MIB, 2),
            "model_state_at_rest_bytes_per_rank": [run["model_state_at_rest_bytes"] for run in runs],
            "losses": [round(loss, 4) for loss in runs[0]["losses"]],
        })
    entry["plan"] = plan.to_dict()
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per plan, one per round")
    parser.add_argument("--only", nargs="*", help="plan names to run (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "plans.json"))
    args = parser.parse_args()

    plans = cases()
    if args.only:
        plans = {name: plans[name] for name in args.only}
    began = time.perf_counter()
    ranks = run_local(WORLD, rank_main, {name: (MODELS[model], plan) for name, (model, plan) in plans.items()},
                      args.warmup, args.rounds)
    wall = time.perf_counter() - began

    models = {}
    for name, cfg in MODELS.items():
        params = sum(p.numel() for p in Transformer(cfg).parameters())
        models[name] = {"config": dataclasses.asdict(cfg), "params": params, "param_bytes": 4 * params}
    result = {
        "benchmark": "plans",
        "what": "one training step (train_step over 4 micro-batches, clip_grad_norm_, AdamW, after_optimizer_step, "
                "zero_grad) of a fixed workload under each plan on 4 gloo ranks of one thread each, float32. "
                "step_ms: median over rounds (each round times one step of every plan in turn, after each "
                "plan's warm-up) of the slowest rank's time, each step started after a barrier. Memory, in one "
                "further step per plan: peak_bytes = bytes of the storages live at the step's start (model "
                "states, buffers, batch) + the highest net bytes allocated during the step from torch.profiler "
                "memory events (profile_memory: every c10 CPU allocation and free in time order, op scratch "
                "and FSDP storage resizes included, gloo transport buffers not). model_state_peak_bytes: the "
                "highest, sampled after every ATen op by a TorchDispatchMode, of the bytes of the distinct "
                "storages of parameters (as the modules hold them, FSDP's gathered copies included, and the "
                "optimizer's local shards), gradients and AdamW state; model_state_at_rest_bytes: the same "
                "right after the optimizer step.",
        "world_size": WORLD,
        "batch": {"seq_len": SEQ_LEN, "micro_batch_size": MICRO_BATCH, "num_micro_batches": MICRO_BATCHES,
                  "tokens_per_step": MICRO_BATCH * MICRO_BATCHES * SEQ_LEN},
        "warmup_steps": args.warmup,
        "measured_steps": args.rounds,
        "models": models,
        "plans": {name: summarise(name, model, plan, ranks) for name, (model, plan) in plans.items()},
        "wall_s": round(wall, 1),
        "machine": report.machine(ranks=WORLD, threads_per_rank=1),
    }
    report.write(result, args.out, echo=False)
    print(f"{'plan':32s} {'step ms':>8s} {'peak MiB':>9s} {'state MiB':>9s}  (max over ranks)")
    for name, entry in result["plans"].items():
        if "error" in entry:
            print(f"{name:32s} ERROR {entry['error']}")
        else:
            print(f"{name:32s} {entry['step_ms']:8.1f} {entry['peak_mib_max']:9.2f} "
                  f"{entry['model_state_peak_mib_max']:9.2f}")
    print(f"wall {wall:.0f} s -> {args.out}")


if __name__ == "__main__":
    import plans  # the ranks import the rank function by module name; `__main__` would be theirs

    plans.main()
