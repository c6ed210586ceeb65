"""Time `stratagem.data.prepare` on this machine: 1 encoding worker vs 2, side by side.

Generates a JSON Lines corpus of a few MB (Zipf-distributed made-up words, paragraphs of varied
length, some non-ASCII), trains a BPE tokenizer on it, then prepares it into MDS shards with
workers=1 and workers=2, alternating the variants over rounds so both see the same machine load.
Reports the tokens, the best wall time and tokens/s per variant and the 2-over-1 ratio. Writes
benchmarks/results/data_prepare.json.

    .venv/bin/python benchmarks/data_prepare.py [--megabytes 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from stratagem.data.prepare import prepare
from stratagem.data.tokenizer import train_tokenizer

import report  # benchmarks/report.py, beside this script

VARIANTS = {"workers_1": 1, "workers_2": 2}
SEQ_LEN = 1024


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A JSONL file of about ``megabytes`` MB; returns its number of documents."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "mu", "sen", "ba", "lo", "qui", "de", "an", "str", "el", "or", "ni", "ps"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    words += ["naïve", "café", "—", "東京", "😀", "Ωμέγα", "1984", "3.14", "e-mail", "(x)"]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    rng.shuffle(weights)
    documents, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            paragraphs = [" ".join(rng.choices(words, weights, k=rng.randint(5, 120)))
                          for _ in range(rng.randint(1, 6))]
            line = json.dumps({"text": "\n\n".join(paragraphs)}, ensure_ascii=False) + "\n"
            size += len(line.encode())
            f.write(line)
            documents += 1
    return documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_prepare.json"))
    args = parser.parse_args()

    import streaming  # noqa: F401  (its import, ~6 s, is not part of what is measured)

    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        documents = write_corpus(corpus, args.megabytes)
        tokenizer = train_tokenizer([corpus], root / "tokenizer", vocab_size=4096)
        for round_ in range(args.rounds):
            for name, workers in VARIANTS.items():
                started = time.perf_counter()
                manifest = prepare([corpus], tokenizer, SEQ_LEN, root / f"{name}-{round_}", workers=workers,
                                   progress=False)
                seconds[name].append(time.perf_counter() - started)
        corpus_bytes = corpus.stat().st_size

    tokens = sum(manifest.tokens.values())  # the same for every variant: the output does not depend on workers
    best = {name: min(values) for name, values in seconds.items()}
    result = {
        "benchmark": "data_prepare",
        "what": "wall time of prepare() (read JSONL, encode with sentencepiece BPE, pack into samples of "
                f"seq_len + 1 = {SEQ_LEN + 1} tokens, write zstd MDS shards, manifest), best of "
                f"{args.rounds} alternated rounds; streaming's import excluded",
        "corpus": {"bytes": corpus_bytes, "documents": documents, "vocab_size": 4096},
        "variants": {name: {"workers": VARIANTS[name], "tokens": tokens, "seconds": round(value, 3),
                            "tokens_per_s": round(tokens / value)} for name, value in best.items()},
        "ratio_workers_2_over_1": round(best["workers_1"] / best["workers_2"], 3),
        "machine": report.machine(),
    }
    report.write(result, args.out)


if __name__ == "__main__":
    main()
