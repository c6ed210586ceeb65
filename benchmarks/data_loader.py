"""Throughput of the streaming loader on this machine: tokens/s delivered to one rank, num_workers 0 vs 2.

Writes a prepared dataset the size the tiny model trains on (seq_len 128; two streams of 35k and
15k samples mixed 0.7/0.3, zstd MDS shards with sha1, in parts, as `stratagem data prepare` lays
them out), reads it once so that every shard is decompressed, then times `next_step()` of the
demo's batch shape (32 x 129 per step) for each variant, alternating A and B rounds so both see
the same machine load. Reports the median and the best tokens/s (seq_len per sample, as training
counts) over the rounds (the best shows capacity when other jobs share the machine), the start-up
time and the ratio to the tiny model's training speed (benchmarks/results/train_step.json).
Writes benchmarks/results/data_loader.json.

    .venv/bin/python benchmarks/data_loader.py [--steps 400] [--rounds 3]
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

SEQ_LEN, VOCAB, MICRO_BATCH = 128, 4096, 32
STREAMS = {"web": (35_000, 0.7), "code": (15_000, 0.3)}  # train samples, weight
PARTS = 2
RESULTS = Path(__file__).parent / "results"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "data_loader.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    variants = {"workers_0": 0, "workers_2": 2}
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    startups: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        streams = [StreamSpec(str(write_stream(Path(tmp) / name, samples, seed)), weight=weight)
                   for seed, (name, (samples, weight)) in enumerate(STREAMS.items())]
        epoch = sum(samples for samples, _ in STREAMS.values()) // MICRO_BATCH
        time_variant(streams, 2, epoch)  # decompress every shard once, as a first epoch does
        for _ in range(args.rounds):
            for name, workers in variants.items():
                startup, speed = time_variant(streams, workers, args.steps)
                startups[name].append(startup)
                speeds[name].append(speed)

    train = json.loads((RESULTS / "train_step.json").read_text())["tokens_per_s"]["fp32"]
    median = {name: statistics.median(values) for name, values in speeds.items()}
    result = {
        "benchmark": "data_loader",
        "what": "tokens/s (seq_len per sample) that StreamingBatches.next_step() delivers to one rank, "
                f"micro-batches of {MICRO_BATCH} x {SEQ_LEN + 1}, two local zstd MDS streams mixed 0.7/0.3, "
                "shards already decompressed, median (and best) over alternated rounds; start-up = construction "
                "to the first step",
        "dataset": {"samples": {name: samples for name, (samples, _) in STREAMS.items()}, "seq_len": SEQ_LEN},
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "tokens_per_s": {name: round(value) for name, value in median.items()},
        "best_tokens_per_s": {name: round(max(values)) for name, values in speeds.items()},
        "startup_s": {name: round(statistics.median(values), 2) for name, values in startups.items()},
        "ratio_workers_2_over_0": round(median["workers_2"] / median["workers_0"], 2),
        "times_tiny_training_speed": {name: round(value / train, 1) for name, value in median.items()},
        "machine": report.machine(load_average_1min_before=round(load_before, 2)),
    }
    report.write(result, args.out)


if __name__ == "__main__":
    main()
