"""Time forward + backward of one mixer layer of each type at growing sequence lengths, side by side.

One layer (the mixer alone, no norm or feed-forward) of gla, deltanet, gated_deltanet, swa and
attention at dim 256, 4 heads (head_dim 64, 4 kv heads), batch 1, float32, default chunk_size
(64), conv_size (4) and swa_window (256). For each T the mixers are timed in turns, round after
round, so all see the same machine load; the result is the median over rounds after a warm-up.
Also reports each layer's counted forward FLOPs per token (and training FLOP/s at 3x) and
counted activation bytes per token. Writes benchmarks/results/layers_linear_attention.json.

    .venv/bin/python benchmarks/layers_linear_attention.py [--lengths 512 2048 8192] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from stratagem.model import ModelConfig
from stratagem.model.layers import MIXERS

import report  # benchmarks/report.py, beside this script
from timing import time_in_turns  # benchmarks/timing.py

MIXER_NAMES = ("gla", "deltanet", "gated_deltanet", "swa", "attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "layers_linear_attention.json"))
    args = parser.parse_args()

    cfg = ModelConfig(dim=256, n_heads=4, n_kv_heads=4)
    torch.manual_seed(0)
    layers = {name: MIXERS[name](cfg) for name in MIXER_NAMES}
    for layer in layers.values():
        layer.init_weights(cfg.init_std, cfg.init_std)

    results = {}
    for T in args.lengths:
        x = torch.randn(1, T, cfg.dim, requires_grad=True)
        seconds = time_in_turns(layers, x, args.rounds)
        for name in MIXER_NAMES:
            median = statistics.median(seconds[name])
            flops = MIXERS[name].flops_per_token(cfg, T)
            results.setdefault(name, {})[str(T)] = {
                "fwd_bwd_ms": round(1000 * median, 2),
                "tokens_per_s": round(T / median),
                "fwd_flops_per_token": flops,
                "train_gflop_per_s": round(3 * flops * T / median / 1e9, 2),
                "activation_bytes_per_token": MIXERS[name].activation_bytes_per_token(cfg, T, 4),
            }
            print(f"T={T:5d} {name:15s} {1000 * median:9.1f} ms", flush=True)

    result = {
        "benchmark": "layers_linear_attention",
        "what": "forward + backward of one mixer layer, batch 1, float32, median over rounds after "
                "a warm-up, mixers alternated within each round",
        "shape": {"dim": cfg.dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                  "head_dim": cfg.head_dim, "chunk_size": cfg.chunk_size, "conv_size": cfg.conv_size,
                  "swa_window": cfg.swa_window},
        "rounds": args.rounds,
        "results": results,
        "machine": report.machine(),
    }
    report.write(result, args.out)


if __name__ == "__main__":
    main()
