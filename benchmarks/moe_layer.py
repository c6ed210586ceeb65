"""Time forward + backward of one MoE feed-forward (8 experts, top-2) against a dense SwiGLU of
the same active width, on one process.

The MoE layer (``moe``, dropless, softmax router, aux and z losses on, training mode) has
experts of width ``expert_hidden``; the dense ``mlp`` has ``ffn_hidden = top_k * expert_hidden``,
so both do the same matmul FLOPs per token but for the MoE router. The MoE is timed with its two
expert paths, `grouped_mm` (the default on CPU in float32) and the padded `torch.bmm` fallback,
with the router at init (balanced load) and skewed towards two experts (the padded path pads
every expert to the busiest one).
The layers are timed in turns, round after round, so all see the same machine load; the result
is the median over rounds after a warm-up. Writes benchmarks/results/moe_layer.json.

    .venv/bin/python benchmarks/moe_layer.py [--tokens 4096] [--dim 512] [--expert-hidden 512] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from stratagem.model import ModelConfig
from stratagem.model.config import MoEConfig
from stratagem.model.layers import FFNS
from stratagem.model.moe import moe_metrics

import report  # benchmarks/report.py, beside this script
from timing import time_in_turns  # benchmarks/timing.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per forward (batch 4 x tokens / 4)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_layer.json"))
    args = parser.parse_args()

    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=args.expert_hidden)
    cfg = ModelConfig(dim=args.dim, ffn_hidden=moe.top_k * args.expert_hidden, moe=moe)
    result = {
        "benchmark": "moe_layer",
        "what": "forward + backward of one feed-forward layer in training mode, float32, median over rounds "
                "after a warm-up, layers alternated within each round; 'balanced': the router at init on "
                "random inputs, 'skewed': inputs share a direction the router sends to experts 0 and 1",
        "shape": {"tokens": args.tokens, "dim": cfg.dim, "num_experts": moe.num_experts, "top_k": moe.top_k,
                  "expert_hidden": args.expert_hidden, "dense_ffn_hidden": cfg.ffn_hidden},
        "rounds": args.rounds,
    }
    for scenario in ("balanced", "skewed"):
        result[scenario] = run(cfg, args, skewed=scenario == "skewed")
    result["machine"] = report.machine()
    report.write(result, args.out)


def run(cfg: ModelConfig, args, skewed: bool) -> dict:
    torch.manual_seed(0)
    layers = {"dense_mlp": FFNS["mlp"](cfg), "moe_grouped_mm": FFNS["moe"](cfg), "moe_padded_bmm": FFNS["moe"](cfg)}
    layers["moe_padded_bmm"].experts.use_grouped_mm = False
    for layer in layers.values():
        layer.init_weights(cfg.init_std, cfg.init_std)
    x = torch.randn(4, args.tokens // 4, cfg.dim)
    if skewed:
        u = torch.nn.functional.normalize(torch.randn(cfg.dim), dim=0)
        x += 2 * u
        with torch.no_grad():
            for name in ("moe_grouped_mm", "moe_padded_bmm"):
                layers[name].router.weight[:2] += 3 * u
    x.requires_grad_()
    kinds = {"dense_mlp": "mlp", "moe_grouped_mm": "moe", "moe_padded_bmm": "moe"}

    seconds = time_in_turns(layers, x, args.rounds)
    balance = moe_metrics(layers["moe_grouped_mm"])["moe/ffn/load_max_over_mean"]  # over all passes

    results = {"moe_load_max_over_mean": round(balance, 3)}
    for name, times in seconds.items():
        median = statistics.median(times)
        flops = FFNS[kinds[name]].flops_per_token(cfg, args.tokens)
        results[name] = {"fwd_bwd_ms": round(1000 * median, 1), "tokens_per_s": round(args.tokens / median),
                         "fwd_flops_per_token": flops,
                         "train_gflop_per_s": round(3 * flops * args.tokens / median / 1e9, 1),
                         "all_ms": [round(1000 * t, 1) for t in times]}
        print(f"{'skewed' if skewed else 'balanced':8s} {name:15s} {1000 * median:8.1f} ms "
              f"{args.tokens / median:9.0f} tokens/s", flush=True)
    dense = results["dense_mlp"]["tokens_per_s"]
    for name in ("moe_grouped_mm", "moe_padded_bmm"):
        results[name]["speed_vs_dense"] = round(results[name]["tokens_per_s"] / dense, 3)
    return results


if __name__ == "__main__":
    main()
