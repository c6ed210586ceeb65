"""The embedded synthetic corpus written as a prepared dataset: MDS shards with a manifest, laid out
as `stratagem data prepare` lays them out, so that a run streams them (`data.kind = "mds"`) with
mosaicml-streaming exactly as it would stream a real corpus.

Sample i of a split is the corpus's sample i (`SyntheticCorpus.sample(i, split)`): each is one
document of seq_len + 1 tokens (``doc_starts = [0]``). The manifest's tokenizer card names the
corpus instead of a sentencepiece model (``model_sha256`` is the hash of the corpus's settings), so
streams exported from different settings are never mixed in one run.

Layout of ``out``: ``synthetic.json`` (the arguments, written first), ``train/`` and ``val/`` (each
one MDS part and its root ``index.json``), ``manifest.json`` (written last: the export is complete).
Exporting again into a finished ``out`` with the same arguments does nothing; an unfinished export
of the same arguments is written again; any other content of ``out`` is refused, never replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from stratagem.data.prepare import (COLUMNS, FORMAT, HASHES, MANIFEST_FILE, SPLITS, VERSION, Manifest,
                                    claim_output, load_manifest, merge_index, part_name)
from stratagem.data.sources import DataError, write_atomic
from stratagem.data.synthetic import SyntheticConfig, SyntheticCorpus

ARGUMENTS_FILE = "synthetic.json"
BATCH = 1024  # samples generated at once


def corpus_card(cfg: SyntheticConfig) -> dict:
    """The tokenizer card of the corpus: identified by the hash of its settings."""
    settings = json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()
    return {"model_sha256": hashlib.sha256(settings).hexdigest(), "vocab_size": cfg.vocab_size, "special_ids": {}}


def export_synthetic(cfg: SyntheticConfig, seq_len: int, out: str | Path, train_samples: int,
                     val_samples: int, compression: str | None = "zstd") -> tuple[Manifest, bool]:
    """Write `train_samples` and `val_samples` of the corpus into `out`; (its manifest, whether it
    was written now rather than found complete)."""
    out = Path(out)
    if seq_len < 1 or train_samples < 1 or val_samples < 1:
        raise DataError(f"seq_len {seq_len}, train samples {train_samples}, val samples {val_samples}: "
                        f"each must be at least 1")
    arguments = {"synthetic": dataclasses.asdict(cfg), "seq_len": seq_len,
                 "samples": {"train": train_samples, "val": val_samples}, "compression": compression}
    if _claim(out, arguments):
        return load_manifest(out), False
    corpus = SyntheticCorpus(cfg, seq_len)
    counts = {"train": train_samples, "val": val_samples}
    for split in SPLITS:
        _write_split(corpus, out / split, split, counts[split], compression)
    manifest = Manifest(format=FORMAT, version=VERSION, seq_len=seq_len, tokenizer=corpus_card(cfg),
                        val_fraction=val_samples / (train_samples + val_samples), documents=dict(counts),
                        tokens={s: n * (seq_len + 1) for s, n in counts.items()}, samples=dict(counts),
                        dropped_tokens=dict.fromkeys(SPLITS, 0),
                        sources=[{"synthetic": arguments["synthetic"]}], columns=dict(COLUMNS))
    write_atomic(out / MANIFEST_FILE, (json.dumps(manifest.to_dict(), indent=1) + "\n").encode())
    return manifest, True


def _claim(out: Path, arguments: dict) -> bool:
    """Make `out` ours for `arguments`; True if it already holds their finished export. An
    unfinished export of the same arguments (no manifest yet) loses what it wrote, to be redone."""
    if claim_output(out, arguments, ARGUMENTS_FILE, "synthetic export", "exported"):
        return True
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
    return False


def _write_split(corpus: SyntheticCorpus, split_dir: Path, split: str, samples: int,
                 compression: str | None) -> None:
    from streaming import MDSWriter

    starts = np.zeros(1, np.int32)
    with MDSWriter(out=str(split_dir / part_name(0)), columns=COLUMNS, compression=compression,
                   hashes=HASHES) as writer:
        for first in range(0, samples, BATCH):
            tokens = corpus.sample(range(first, min(samples, first + BATCH)), split)
            for row in tokens.numpy().astype(np.int32):
                writer.write({"tokens": row, "doc_starts": starts})
    merge_index(split_dir, 1)
