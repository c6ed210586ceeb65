"""CPU forward+backward time of the delta-rule kernels against token loops and softmax attention.

For B=1, H=4, d_k=d_v=64 and T in (512, 2048, 8192), for DeltaNet (g=None) and Gated DeltaNet,
times one forward and backward (loss = sum of outputs and final state) of:
  naive      naive_delta_rule, the literal token-by-token definition (O(d^3) per token)
  recurrent  a loop of delta_rule_step, the rank-1 token update (O(d^2) per token; the fair
             token-by-token baseline, listed so the naive speed-up is not mistaken for it)
  chunk      chunk_delta_rule, chunk-parallel WY/UT form (chunk_size 64)
  sdpa       torch scaled_dot_product_attention, causal softmax attention at the same shape
side by side in one run. Fast variants: median of --repeats runs after one warm-up; the token
loops run once (seconds each, so one run is stable enough). Writes
benchmarks/results/kernels_delta_rule.json and prints a table.

    .venv/bin/python benchmarks/kernels_delta_rule.py [--repeats 5] [--lengths 512 2048 8192]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stratagem.kernels.delta_rule import chunk_delta_rule, delta_rule_step, naive_delta_rule

import report  # benchmarks/report.py, beside this script

BATCH, HEADS, DIM, CHUNK = 1, 4, 64, 64


def recurrent_delta_rule(q, k, v, beta, g=None):
    state, outputs = None, []
    for t in range(q.shape[2]):
        o_t, state = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], state,
                                     None if g is None else g[:, :, t])
        outputs.append(o_t)
    return torch.stack(outputs, dim=2), state


def sdpa(q, k, v, beta, g=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True), None


def make_inputs(length, gated, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, HEADS, length)
    inputs = [torch.randn(*shape, DIM, generator=gen),
              F.normalize(torch.randn(*shape, DIM, generator=gen), dim=-1),
              torch.randn(*shape, DIM, generator=gen),
              torch.sigmoid(torch.randn(*shape, generator=gen)),
              F.logsigmoid(torch.randn(*shape, generator=gen) + 3.0) if gated else None]
    return [None if x is None else x.requires_grad_() for x in inputs]


def time_fwd_bwd(fn, length, gated, runs):
    times = []
    for _ in range(runs):
        inputs = make_inputs(length, gated)
        start = time.perf_counter()
        o, state = fn(*inputs)
        loss = o.sum() if state is None else o.sum() + state.sum()
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels_delta_rule.json"))
    args = parser.parse_args()

    def chunk(q, k, v, beta, g=None):
        return chunk_delta_rule(q, k, v, beta, g, chunk_size=CHUNK)

    rows = []
    for length in args.lengths:
        for gated in (False, True):
            row = {"T": length, "model": "gated_deltanet" if gated else "deltanet"}
            for name, fn in (("chunk", chunk), ("sdpa", sdpa)):
                time_fwd_bwd(fn, length, gated, 1)  # warm-up
                row[f"{name}_s"] = time_fwd_bwd(fn, length, gated, args.repeats)
            for name, fn in (("naive", naive_delta_rule), ("recurrent", recurrent_delta_rule)):
                row[f"{name}_s"] = time_fwd_bwd(fn, length, gated, 1)
            row["chunk_vs_naive"] = row["naive_s"] / row["chunk_s"]
            row["chunk_vs_recurrent"] = row["recurrent_s"] / row["chunk_s"]
            row["chunk_vs_sdpa"] = row["sdpa_s"] / row["chunk_s"]
            rows.append(row)
            print(f"T={length} {row['model']}: done", flush=True)

    result = {
        "benchmark": "kernels_delta_rule",
        "what": "CPU seconds for one forward+backward; speed-ups are baseline time / chunk time",
        "shape": {"B": BATCH, "H": HEADS, "d_k": DIM, "d_v": DIM, "chunk_size": CHUNK, "dtype": "float32"},
        "repeats": args.repeats,
        "machine": report.machine(),
        "rows": rows,
    }
    report.write(result, args.out, echo=False)

    header = (f"{'T':>6} {'model':<15} {'naive s':>9} {'recur. s':>9} {'chunk s':>9} {'sdpa s':>9} "
              f"{'x naive':>8} {'x recur.':>8} {'x sdpa':>7}")
    print(header)
    for row in rows:
        print(f"{row['T']:>6} {row['model']:<15} {row['naive_s']:>9.3f} {row['recurrent_s']:>9.3f} "
              f"{row['chunk_s']:>9.4f} {row['sdpa_s']:>9.4f} {row['chunk_vs_naive']:>8.1f} "
              f"{row['chunk_vs_recurrent']:>8.1f} {row['chunk_vs_sdpa']:>7.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
