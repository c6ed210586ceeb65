"""Time expert parallelism's token movement on gloo: the all-to-all dispatcher at EP=2 and EP=4
(real processes, one thread each) against the one-process `LocalDispatcher` (one thread).

Every rank routes the same number of tokens through one MoE feed-forward (8 experts, top-2,
dropless, softmax router, aux and z losses on, training mode). Two things are timed, forward and
backward, in turns within each round:

- ``dispatch_combine``: only the token movement, ``combine(dispatch(x))`` with the experts left
  out (rows pass through unchanged): for EP the count exchange and four row all-to-alls (dispatch
  and combine, and their backward), for one process a gather and a scatter-add;
- ``layer``: the whole layer, router, experts and movement. With EP each rank computes 1/ep of
  the experts for the rows of all ranks of its group, so the expert work per rank is the same as
  one process's on its own tokens; what differs is the movement.

A step's time is that of the slowest rank (all ranks start together after a barrier); the result
is the median over rounds after a warm-up. ``bytes_to_other_ranks`` counts, per rank and step, the
rows sent to other ranks by the four all-to-alls (float32). Writes
benchmarks/results/moe_all_to_all.json.

    .venv/bin/python benchmarks/moe_all_to_all.py [--tokens 2048] [--dim 256] [--expert-hidden 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from stratagem.model import ModelConfig
from stratagem.model.config import MoEConfig
from stratagem.model.moe import MoE
from stratagem.parallel.expert_parallel import split_experts
from stratagem.tests.distributed import run_ranks

import report  # benchmarks/report.py, beside this script

EP_DEGREES = (2, 4)


def layer_and_inputs(args, rank: int) -> tuple[MoE, torch.Tensor, torch.Tensor]:
    """The layer (same weights on every rank), this rank's tokens and an upstream gradient."""
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=args.expert_hidden)
    cfg = ModelConfig(dim=args.dim, moe=moe)
    torch.manual_seed(0)
    layer = MoE(cfg)
    layer.init_weights(cfg.init_std, cfg.init_std)
    generator = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.tokens, args.dim, generator=generator)
    return layer, x, torch.randn(args.tokens, args.dim, generator=generator)


def movement_seconds(layer: MoE, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Dispatch + combine, forward and backward, without the experts (routing done beforehand)."""
    with torch.no_grad():
        routing = layer.route(x)
    x = x.detach().requires_grad_()
    began = time.perf_counter()
    rows, _, ctx = layer.dispatcher.dispatch(x, routing.indices, routing.weights)
    layer.dispatcher.combine(rows, ctx).backward(grad)
    return time.perf_counter() - began


def layer_seconds(layer: MoE, x: torch.Tensor, grad: torch.Tensor) -> float:
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    began = time.perf_counter()
    layer(x).backward(grad)
    return time.perf_counter() - began


TIMERS = {"dispatch_combine": movement_seconds, "layer": layer_seconds}


def time_rounds(layer: MoE, x: torch.Tensor, grad: torch.Tensor, rounds: int, slowest=lambda s: s) -> dict:
    """A warm-up, then `rounds` rounds timing each timer once: medians and all times in ms.
    `slowest` turns one rank's seconds into the slowest rank's (identity on one process)."""
    seconds = {name: [] for name in TIMERS}
    for round_ in range(rounds + 1):
        for name, timer in TIMERS.items():
            elapsed = slowest(timer(layer, x, grad))
            if round_:
                seconds[name].append(elapsed)
    return {f"{name}_ms": round(1000 * statistics.median(times), 2) for name, times in seconds.items()} | {
        f"{name}_all_ms": [round(1000 * t, 2) for t in times] for name, times in seconds.items()}


def ep_rank(rank: int, world: int, args) -> dict:
    """One rank of EP=world: its slice of the experts, the all-to-all dispatcher."""
    torch.set_num_threads(1)
    layer, x, grad = layer_and_inputs(args, rank)
    split_experts(layer, init_device_mesh("cpu", (world,)), dist.group.WORLD)

    def slowest(seconds: float) -> float:
        dist.barrier()  # the next timer starts together on every rank
        value = torch.tensor(seconds, dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value.item()

    dist.barrier()
    timings = time_rounds(layer, x, grad, args.rounds, slowest)
    with torch.no_grad():
        routing = layer.route(x)
        _, _, ctx = layer.dispatcher.dispatch(x, routing.indices, routing.weights)
    rows_out = sum(ctx.send_splits) - ctx.send_splits[rank]
    rows_in = sum(ctx.recv_splits) - ctx.recv_splits[rank]
    # dispatch sends rows_out and receives rows_in, combine the reverse, and backward repeats both
    return {"timings": timings, "bytes_to_other_ranks": 2 * (rows_out + rows_in) * args.dim * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank (and for one process)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_all_to_all.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    result = {
        "benchmark": "moe_all_to_all",
        "what": "forward + backward per step, float32, median over rounds after a warm-up of the slowest "
                "rank's time; 'dispatch_combine': token movement only (experts left out), 'layer': the "
                "whole MoE layer; one thread per process; EP ranks are gloo processes on this machine",
        "shape": {"tokens_per_rank": args.tokens, "dim": args.dim, "num_experts": 8, "top_k": 2,
                  "expert_hidden": args.expert_hidden},
        "rounds": args.rounds,
        "one_process": time_rounds(*layer_and_inputs(args, 0), args.rounds),
    }
    for ep in EP_DEGREES:
        ranks = run_ranks(ep, ep_rank, args, timeout=600)  # every rank has the slowest rank's times
        result[f"ep{ep}"] = {**ranks[0]["timings"],
                             "bytes_to_other_ranks_per_rank": [r["bytes_to_other_ranks"] for r in ranks]}
    for name in ("one_process", *(f"ep{ep}" for ep in EP_DEGREES)):
        print(f"{name:12s} dispatch+combine {result[name]['dispatch_combine_ms']:8.2f} ms   "
              f"layer {result[name]['layer_ms']:8.2f} ms", flush=True)
    result["machine"] = report.machine()
    report.write(result, args.out)


if __name__ == "__main__":
    import moe_all_to_all  # the ranks import the rank function by module name; `__main__` would be theirs

    moe_all_to_all.main()
