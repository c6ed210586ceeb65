"""Loader throughput: tokens/s that StreamingBatches delivers to one rank, num_workers 0 vs 2 side by side.

Writes a prepared-format dataset (seq_len 128, 50k samples, zstd MDS shards, manifest) into a
temporary folder, then alternates the two variants for a fixed number of steps each round and
reports the best round of each plus the ratio against the tiny model's training speed from
benchmarks/results/train_step.json. Writes benchmarks/results/data_loader.json.

    .venv/bin/python benchmarks/data_loader.py [--samples 50000] [--steps 150] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from stratagem.data.streaming import StreamingBatches, StreamSpec

SEQ_LEN = 128
RESULTS = Path(__file__).parent / "results"


def write_prepared(root: Path, samples: int) -> None:
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    columns = {"tokens": "ndarray:int32", "doc_starts": "ndarray:int32"}
    for split, count in (("train", samples), ("val", max(samples // 100, 1))):
        with MDSWriter(out=str(root / split), columns=columns, compression="zstd", hashes=["sha1"]) as writer:
            for _ in range(count):
                writer.write({"tokens": rng.integers(0, 32000, SEQ_LEN + 1, dtype=np.int32),
                              "doc_starts": np.zeros(1, dtype=np.int32)})
    counts = {"train": samples, "val": max(samples // 100, 1)}
    manifest = {"format": "stratagem-mds", "version": 1, "seq_len": SEQ_LEN,
                "tokenizer": {"vocab_size": 32000, "model_sha256": "benchmark"}, "val_fraction": 0.01,
                "documents": counts, "tokens": {k: v * (SEQ_LEN + 1) for k, v in counts.items()},
                "samples": counts, "dropped_tokens": {"train": 0, "val": 0}, "sources": [],
                "columns": columns}
    (root / "manifest.json").write_text(json.dumps(manifest))


def tokens_per_s(root: Path, workers: int, steps: int, micro: int = 32, accumulation: int = 4) -> float:
    batches = StreamingBatches([StreamSpec(str(root))], SEQ_LEN, micro, accumulation, num_workers=workers)
    try:
        batches.next_step()  # start-up (workers, first shards) is not throughput
        began = time.perf_counter()
        for _ in range(steps):
            batches.next_step()
        return steps * micro * accumulation * SEQ_LEN / (time.perf_counter() - began)
    finally:
        batches.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    best = {0: 0.0, 2: 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        write_prepared(Path(tmp), args.samples)
        for _ in range(args.rounds):
            for workers in best:
                best[workers] = max(best[workers], tokens_per_s(Path(tmp), workers, args.steps))
    train = json.loads((RESULTS / "train_step.json").read_text())["tokens_per_s"]["fp32"]
    result = {
        "benchmark": "data_loader",
        "what": "tokens/s delivered by StreamingBatches to one rank (micro-batch 32 x 4 accumulation, "
                "seq_len 128, local zstd MDS), best of alternated rounds, start-up excluded",
        "samples": args.samples, "steps": args.steps,
        "tokens_per_s": {f"workers_{w}": round(v) for w, v in best.items()},
        "tiny_train_tokens_per_s": train,
        "ratio_over_tiny_training": {f"workers_{w}": round(v / train, 1) for w, v in best.items()},
        "machine": {"cpus": os.cpu_count()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_loader.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
