"""Throughput of the streaming loader on this machine: tokens/s delivered to one rank, num_workers 0 vs 2,
against the tiny flavor's training speed measured in the same run.

Writes a prepared dataset the size the tiny model trains on (seq_len 128; two streams of 35k and
15k samples mixed 0.7/0.3, zstd MDS shards with sha1, in parts, as `stratagem data prepare` lays
them out), reads it once so that every shard is decompressed, then runs rounds of: training steps
of the tiny flavor (benchmarks/train_step.py's fp32 variant: the demo config, one process, its
thread settings), then `next_step()` of the demo's batch shape (32 x 129 per step) for each loader
variant, so that all see the same machine load. Reports the median and the best tokens/s
(seq_len per sample, as training counts) over the rounds (the best shows capacity when other jobs
share the machine), the start-up time, and `times_tiny_training_speed`: the median over rounds of
the loader's tokens/s over that round's training tokens/s (the goal: at least 50x).
Writes benchmarks/results/data_loader.json.

    .venv/bin/python benchmarks/data_loader.py [--steps 400] [--train-steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from stratagem.data.streaming import StreamingBatches, StreamSpec

import report  # benchmarks/report.py, beside this script
import train_step  # benchmarks/train_step.py: the training speed, measured the same way

SEQ_LEN, VOCAB, MICRO_BATCH = 128, 4096, 32
STREAMS = {"web": (35_000, 0.7), "code": (15_000, 0.3)}  # train samples, weight
PARTS = 2
RESULTS = Path(__file__).parent / "results"
GOAL = 50  # the loader's tokens/s over one CPU rank's training tokens/s on the tiny flavor


def write_stream(root: Path, samples: int, seed: int) -> Path:
    """A prepared directory of random documents packed into samples of SEQ_LEN + 1 tokens."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    columns = {"tokens": "ndarray:int32", "doc_starts": "ndarray:int32"}
    for split, count in (("train", samples), ("val", 256)):
        shards = []
        for part, rows in enumerate(np.array_split(np.arange(count), PARTS)):
            name = f"part-{part:05d}"
            with MDSWriter(out=str(root / split / name), columns=columns, compression="zstd",
                           hashes=["sha1"]) as writer:
                for _ in rows:
                    starts = np.concatenate([[0], np.sort(rng.choice(np.arange(1, SEQ_LEN), 2, replace=False))])
                    writer.write({"tokens": rng.integers(4, VOCAB, SEQ_LEN + 1, dtype=np.int32),
                                  "doc_starts": starts.astype(np.int32)})
            for shard in json.loads((root / split / name / "index.json").read_text())["shards"]:
                for key in ("raw_data", "zip_data"):
                    shard[key]["basename"] = f"{name}/{shard[key]['basename']}"
                shards.append(shard)
        (root / split / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))
    manifest = {"format": "stratagem-mds", "version": 1, "seq_len": SEQ_LEN,
                "tokenizer": {"model_sha256": "0" * 64, "vocab_size": VOCAB,
                              "special_ids": {"pad": 0, "unk": 1, "bos": 2, "eos": 3}},
                "val_fraction": 0.0, "documents": {"train": samples, "val": 256},
                "tokens": {"train": samples * SEQ_LEN, "val": 256 * SEQ_LEN},
                "samples": {"train": samples, "val": 256}, "dropped_tokens": {"train": 0, "val": 0},
                "sources": [], "columns": columns}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def time_variant(streams: list[StreamSpec], workers: int, steps: int) -> tuple[float, float]:
    """(seconds to the first step, tokens/s over the next `steps` steps)."""
    began = time.perf_counter()
    loader = StreamingBatches(streams, SEQ_LEN, MICRO_BATCH, 1, seed=0, num_workers=workers)
    loader.next_step()
    started = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    seconds = time.perf_counter() - started
    loader.close()
    return started - began, steps * MICRO_BATCH * SEQ_LEN / seconds


def time_training(steps: int, root: Path, name: str) -> float:
    """Median tokens/s of `steps` training steps of the tiny flavor after train_step's warm-up steps."""
    flag = train_step.VARIANTS["fp32"]
    return statistics.median(train_step.run_variant(flag, train_step.WARMUP_STEPS + steps, root, name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="loader steps per variant and round")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "data_loader.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    variants = {"workers_0": 0, "workers_2": 2}
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    startups: dict[str, list[float]] = {name: [] for name in variants}
    training: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        streams = [StreamSpec(str(write_stream(Path(tmp) / name, samples, seed)), weight=weight)
                   for seed, (name, (samples, weight)) in enumerate(STREAMS.items())]
        epoch = sum(samples for samples, _ in STREAMS.values()) // MICRO_BATCH
        time_variant(streams, 2, epoch)  # decompress every shard once, as a first epoch does
        for round_ in range(args.rounds):
            training.append(time_training(args.train_steps, Path(tmp) / "runs", f"train-{round_}"))
            for name, workers in variants.items():
                startup, speed = time_variant(streams, workers, args.steps)
                startups[name].append(startup)
                speeds[name].append(speed)

    median = {name: statistics.median(values) for name, values in speeds.items()}
    times = {name: statistics.median(speed / train for speed, train in zip(values, training))
             for name, values in speeds.items()}
    result = {
        "benchmark": "data_loader",
        "what": "tokens/s (seq_len per sample) that StreamingBatches.next_step() delivers to one rank, "
                f"micro-batches of {MICRO_BATCH} x {SEQ_LEN + 1}, two local zstd MDS streams mixed 0.7/0.3, "
                "shards already decompressed, median (and best) over rounds; each round also times training "
                "steps of the tiny flavor (train_step.py's fp32 variant), and times_tiny_training_speed is "
                "the median over rounds of loader tokens/s / training tokens/s; start-up = construction to "
                "the first step",
        "dataset": {"samples": {name: samples for name, (samples, _) in STREAMS.items()}, "seq_len": SEQ_LEN},
        "steps_per_round": args.steps,
        "train_steps_per_round": args.train_steps,
        "rounds": args.rounds,
        "tokens_per_s": {name: round(value) for name, value in median.items()},
        "best_tokens_per_s": {name: round(max(values)) for name, values in speeds.items()},
        "tiny_training_tokens_per_s": round(statistics.median(training)),
        "per_round_tokens_per_s": {"tiny_training": [round(value) for value in training],
                                   **{name: [round(value) for value in values] for name, values in speeds.items()}},
        "startup_s": {name: round(statistics.median(values), 2) for name, values in startups.items()},
        "ratio_workers_2_over_0": round(median["workers_2"] / median["workers_0"], 2),
        "times_tiny_training_speed": {name: round(value, 1) for name, value in times.items()},
        "goal_times": GOAL,
        "meets_goal": all(value >= GOAL for value in times.values()),
        "machine": report.machine(load_average_1min_before=round(load_before, 2)),
    }
    report.write(result, args.out)


if __name__ == "__main__":
    main()
