"""How long the planner takes on published clusters, and what per-layer planning gains over the best
uniform plan (both under the cost model, H100 SXM nodes of 8 GPUs, bf16 mixed precision, sequences
of 4096 tokens, about 2M tokens per step).

Models: Llama-7B on 8 and 64 GPUs; the 1.3B hybrid (Gated DeltaNet 3:1 attention) on 64; a
JetMoE-8B-like MoE (24 layers, dim 2048, 8 experts of width 5632, top-2; attention in place of
JetMoE's mixture of attention heads) on 64; and a 128-layer hybrid MoE (Gated DeltaNet 3:1
attention, 64 experts top-8 on every other layer, the 1.3B hybrid's width) on 1,024. Writes
benchmarks/results/planner_scale.json.

    .venv/bin/python benchmarks/planner_scale.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from stratagem.launcher.cluster import builtin_cluster
from stratagem.launcher.cost import MIXED_ADAM, Workload
from stratagem.launcher.hardware import Analytic
from stratagem.launcher.search import plan_search
from stratagem.model import get_flavor
from stratagem.model.config import MoEConfig
from stratagem.parallel.plan import summary

import report  # benchmarks/report.py, beside this script

SEQ_LEN, TOKENS = 4096, 2 ** 21

JETMOE_LIKE = dataclasses.replace(get_flavor("llama-1b"), n_layers=24, n_heads=16, n_kv_heads=16, ffn="moe",
                                  vocab_size=32000, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=5632))
HYBRID_MOE_128 = dataclasses.replace(
    get_flavor("hybrid-1.3b"), n_layers=128, moe=MoEConfig(num_experts=64, top_k=8),
    pattern=["gated_deltanet+moe", "gated_deltanet+mlp", "gated_deltanet+moe", "attention+mlp"])
CASES = {  # name: (model, GPUs, the time limit in seconds or None)
    "llama-7b-8gpu": (get_flavor("llama-7b"), 8, None),
    "llama-7b-64gpu": (get_flavor("llama-7b"), 64, 2.0),
    "hybrid-1.3b-64gpu": (get_flavor("hybrid-1.3b"), 64, None),
    "jetmoe-8b-like-64gpu": (JETMOE_LIKE, 64, None),
    "hybrid-moe-128-layers-1024gpu": (HYBRID_MOE_128, 1024, 10.0),
}


def run(name: str) -> dict:
    model, gpus, limit = CASES[name]
    hw = Analytic(builtin_cluster("h100-sxm", gpus // 8))
    work = Workload.of(model, SEQ_LEN, TOKENS // SEQ_LEN, state=MIXED_ADAM, activation_bytes=2)
    result = plan_search(hw, work, model, gpus)
    best, uniform = result.prediction, result.uniform_prediction
    entry = {"gpus": gpus, "params": work.counts.total_params, "search_s": round(result.seconds, 2),
             "limit_s": limit, "within_limit": None if limit is None else result.seconds < limit,
             "settings_costed": result.visited,
             "per_layer": {"step_s": round(best.step_seconds, 4), "mfu": round(best.mfu, 4),
                           "peak_gib": round(max(best.memory_per_rank) / 2 ** 30, 2), "plan": summary(result.plan)},
             "uniform": None if uniform is None else {
                 "step_s": round(uniform.step_seconds, 4), "mfu": round(uniform.mfu, 4),
                 "peak_gib": round(max(uniform.memory_per_rank) / 2 ** 30, 2), "plan": summary(result.uniform_plan)},
             "gain_over_uniform": None if uniform is None else round(uniform.step_seconds / best.step_seconds, 4)}
    print(f"{name:32s} {result.seconds:7.2f} s  gain {entry['gain_over_uniform']}  {summary(result.plan)}", flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(CASES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "planner_scale.json"))
    args = parser.parse_args()
    results = {name: run(name) for name in (args.only or CASES)}
    report.write({"benchmark": "planner_scale", "cluster": "h100-sxm (8 per node)", "seq_len": SEQ_LEN,
                  "tokens_per_step": TOKENS, "precision": "bf16-mixed", "cases": results,
                  "machine": report.machine()}, args.out, echo=False)


if __name__ == "__main__":
    main()
