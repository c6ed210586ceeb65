"""Time training steps of the tiny flavor on this machine: float32 vs bf16 autocast, side by side.

Runs the real training loop (data generation, forward, backward, clipping, AdamW) for each
variant, alternating A and B rounds so both see the same machine load, and reports the median
tokens/s over the steps after warm-up plus the B/A ratio. Writes benchmarks/results/train_step.json.

    .venv/bin/python benchmarks/train_step.py [--steps 40] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from stratagem.launcher.config import load_config
from stratagem.model import count_model
from stratagem.train.loop import train
from stratagem.train.metrics import read_metrics

import report  # benchmarks/report.py, beside this script

VARIANTS = {"fp32": "--train.autocast=none", "bf16_autocast": "--train.autocast=bf16"}
WARMUP_STEPS = 5


def run_variant(flag: str, steps: int, root: Path, name: str) -> list[float]:
    config = load_config("demo", [flag, f"--train.steps={steps}", "--train.warmup_steps=1",
                                  "--train.eval_every=0", "--train.checkpoint_every=0",
                                  f"--run.dir={root}", f"--run.name={name}"])
    with open(os.devnull, "w") as quiet:
        train(config, progress_stream=quiet)
    return [r["tokens_per_s"] for r in read_metrics(root / name)][WARMUP_STEPS:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args()

    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, flag in VARIANTS.items():
                samples[name] += run_variant(flag, args.steps, Path(tmp), f"{name}-{round_}")

    config = load_config("demo")
    median = {name: statistics.median(values) for name, values in samples.items()}
    result = {
        "benchmark": "train_step",
        "what": "tokens/s of full training steps of the demo config (tiny flavor, seq_len 128, "
                "4096 tokens per step), median over steps after warm-up, variants alternated",
        "flavor": config.flavor,
        "params": count_model(config.model, config.data.seq_len).total_params,
        "tokens_per_step": config.train.global_batch_tokens,
        "steps_per_variant": len(samples["fp32"]),
        "tokens_per_s": {name: round(value) for name, value in median.items()},
        "ratio_bf16_autocast_over_fp32": round(median["bf16_autocast"] / median["fp32"], 3),
        "machine": report.machine(),
    }
    report.write(result, args.out)


if __name__ == "__main__":
    main()
