"""Time GLA kernels on this machine's CPU: chunk_gla vs naive_gla vs softmax attention, side by side.

Forward + backward (gradients w.r.t. every input) at B=1, H=4, d_k = d_v = 64 and several T, for
chunk_gla (default chunk size), naive_gla (the float64 token loop it is checked against) and
causal softmax attention (torch SDPA, float32, same q, k, v), the cost GLA replaces. The three
run interleaved in every round so they see the same machine load; the median wall time per
kernel is reported (the naive loop runs fewer rounds: it takes seconds, and at T = 8192 its
autograd graph holds ~4 GB). Writes benchmarks/results/kernels_gla.json and prints a table.

All kernels run on one intra-op thread by default. The build machines are shared: when another
process holds a core, torch's OpenMP barriers stall on every small op, and a run with 2 threads
measured chunk_gla 40x slower than on one thread (2.8 s vs 0.07 s at T = 2048), which says
nothing about the kernels. ``--threads 2`` measures the parallel case on a quiet machine.

    .venv/bin/python benchmarks/kernels_gla.py [--lengths 512 2048 8192] [--rounds 5] [--threads 1]

Goals: chunk_gla >= 20x faster than naive_gla at T = 2048 and faster than SDPA at T = 8192.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stratagem.kernels.gla import chunk_gla, naive_gla

import report  # benchmarks/report.py, beside this script

BATCH, HEADS, DIM = 1, 4, 64
NAIVE_SECONDS = 30.0  # stop repeating the naive loop once it has used this much time at one T


def sdpa(q, k, v, g):
    return (F.scaled_dot_product_attention(q, k, v, is_causal=True),)


KERNELS = {"chunk_gla": chunk_gla, "naive_gla": naive_gla, "sdpa_causal": sdpa}


def fwd_bwd_seconds(fn, inputs) -> float:
    leaves = [x.detach().requires_grad_() for x in inputs]
    start = time.perf_counter()
    out = fn(*leaves)
    sum(y.sum() for y in out).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels_gla.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in args.lengths:
        q, k, v = (torch.randn(BATCH, HEADS, length, DIM, generator=gen) for _ in range(3))
        g = F.logsigmoid(torch.randn(BATCH, HEADS, length, DIM, generator=gen))
        inputs = (q, k, v, g)
        for name in ("chunk_gla", "sdpa_causal"):  # warm-up (allocator, thread pool)
            fwd_bwd_seconds(KERNELS[name], inputs)
        times = {name: [] for name in KERNELS}
        for _ in range(args.rounds):
            for name, fn in KERNELS.items():
                if name == "naive_gla" and sum(times[name]) > NAIVE_SECONDS:
                    continue
                times[name].append(fwd_bwd_seconds(fn, inputs))
        median = {name: statistics.median(values) for name, values in times.items()}
        rows.append({"T": length, "seconds": {n: round(s, 5) for n, s in median.items()},
                     "runs": {n: len(values) for n, values in times.items()},
                     "speedup_over_naive": round(median["naive_gla"] / median["chunk_gla"], 1),
                     "speedup_over_sdpa": round(median["sdpa_causal"] / median["chunk_gla"], 2)})

    by_length = {row["T"]: row for row in rows}
    goals = {}
    if 2048 in by_length:
        goals["chunk_20x_faster_than_naive_at_2048"] = by_length[2048]["speedup_over_naive"] >= 20
    if 8192 in by_length:
        goals["chunk_faster_than_sdpa_at_8192"] = by_length[8192]["speedup_over_sdpa"] > 1
    result = {
        "benchmark": "kernels_gla",
        "what": "CPU wall time of forward + backward (all input gradients), median over interleaved "
                "rounds; chunk_gla float32 at its default chunk size, naive_gla (float64 token loop), "
                "causal softmax attention via torch SDPA in float32",
        "shape": {"B": BATCH, "H": HEADS, "d_k": DIM, "d_v": DIM},
        "rows": rows,
        "goals": goals,
        "machine": report.machine(load_average_1min_before=round(load_before, 2)),
    }
    report.write(result, args.out, echo=False)

    print(f"{'T':>6} {'chunk_gla ms':>13} {'naive_gla ms':>13} {'sdpa ms':>10} {'naive/chunk':>12} {'sdpa/chunk':>11}")
    for row in rows:
        s = row["seconds"]
        print(f"{row['T']:>6} {1e3 * s['chunk_gla']:>13.1f} {1e3 * s['naive_gla']:>13.1f} "
              f"{1e3 * s['sdpa_causal']:>10.1f} {row['speedup_over_naive']:>11.1f}x {row['speedup_over_sdpa']:>10.2f}x")
    print("goals:", goals)


if __name__ == "__main__":
    main()
