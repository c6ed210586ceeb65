"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``) -> packed MDS shards, as `stratagem data prepare` writes.

Why: a corpus already tokenized for Megatron-LM (its ``tools/preprocess_data.py``) trains here as it
is, without its text and without tokenizing it again. megatron-core's own reader
(``IndexedDataset``) reads the files; prepare's own part writer writes the output, so the layout
(splits, parts and their markers, index, manifest), the packing into samples of ``seq_len + 1``
tokens with their ``doc_starts`` and the resumption of an interrupted run are prepare's, and
``[[data.mds.streams]]`` reads the folder like any prepared one.

Documents: a Megatron document is its sequences (sentences, with ``--split-sentences``) in order.
As in prepare, every document is followed by exactly one EOS: a document whose last token already
is the EOS (``preprocess_data.py --append-eod``) gets no second one. Document i goes to ``val``
when ``is_validation(tokens_sha256, i, val_fraction)``: prepare's rule, with the sha256 of the
dataset's tokens (as megatron-core reads them, in order) in place of the file's. Part N holds
documents [N * documents_per_part, (N + 1) * documents_per_part); one part's tokens are in memory
at a time (the .bin itself is memory-mapped by megatron-core, never read whole).

The tokenizer: Megatron files do not record theirs, so the caller names it, either as a stratagem
tokenizer (its card is recorded, as prepare records it) or as a vocabulary known by name
(`vocabulary_card`: name, size and EOS id). Either way a run checks its model's vocabulary against
the card and never mixes streams of two tokenizers.

Checked before anything is written, one line each: both files exist and megatron-core reads them,
the dataset holds documents of integer tokens, every token is inside the vocabulary (a first pass
over the data, which also computes the hash), and the output directory is new, empty or this same
conversion's (then resumed, or kept as it is when finished: ``megatron.json`` records the arguments).
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path

import numpy as np

from stratagem.data.prepare import (SPLITS, VERSION, Manifest, PartBuffer, add_documents, check_arguments,
                                    claim_output, finish_parts, is_validation, load_manifest, resume_parts,
                                    write_part)
from stratagem.data.sources import DataError

ARGUMENTS_FILE = "megatron.json"
ARGUMENTS_FORMAT = "stratagem-megatron"
MAX_VOCAB = 2**31  # tokens are stored as int32


def vocabulary_card(name: str, vocab_size: int, eos_id: int) -> dict:
    """The tokenizer card of a vocabulary known by name (e.g. "gpt2"), identified by the hash of name,
    size and EOS id: two conversions share a tokenizer exactly when they name the same three."""
    if not name:
        raise DataError("the vocabulary needs a name (the tokenizer's, e.g. gpt2)")
    identity = {"name": name, "vocab_size": vocab_size, "special_ids": {"eos": eos_id}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {**identity, "model_sha256": digest}


def megatron_to_mds(prefix: str | Path, out: str | Path, seq_len: int, tokenizer_card: dict,
                    val_fraction: float = 0.01, documents_per_part: int = 10000,
                    compression: str | None = "zstd") -> Manifest:
    """Convert the dataset ``PREFIX.bin`` + ``PREFIX.idx`` into a prepared folder ``out``; see the module docstring.

    ``tokenizer_card`` is a stratagem tokenizer's card (``Tokenizer.load(path).card``) or a
    `vocabulary_card`; its ``special_ids["eos"]`` ends every document. Rerunning with the same
    arguments resumes an interrupted conversion, or does nothing if it finished. Returns the manifest.
    """
    out = Path(out)
    check_arguments(seq_len, val_fraction, documents_per_part, compression)
    vocab_size, eos = _vocabulary(tokenizer_card)
    prefix = Path(prefix)
    dataset = _open(prefix)
    documents = len(dataset.document_indices) - 1
    tokens_sha256 = _check_tokens(dataset, prefix, vocab_size, documents_per_part)
    source = {"prefix": str(prefix.resolve()), "tokens_sha256": tokens_sha256, "documents": documents}
    arguments = {"format": ARGUMENTS_FORMAT, "version": VERSION, "input": source, "tokenizer": tokenizer_card,
                 "seq_len": seq_len, "val_fraction": val_fraction, "documents_per_part": documents_per_part,
                 "compression": compression or None}
    if claim_output(out, json.loads(json.dumps(arguments)), ARGUMENTS_FILE, "megatron conversion", "converted"):
        return load_manifest(out)
    done, leftovers = resume_parts(out)
    for part in range(done, -(-documents // documents_per_part)):
        first = part * documents_per_part
        stop = min(documents, first + documents_per_part)
        tokens, lengths = _with_eos(*_read_documents(dataset, first, stop), eos)
        val = np.array([is_validation(tokens_sha256, i, val_fraction) for i in range(first, stop)], dtype=bool)
        buffers = {split: PartBuffer() for split in SPLITS}
        add_documents(buffers, tokens, lengths, val)
        for split in SPLITS:
            leftovers[split] = write_part(out / split, part, buffers[split], leftovers[split], seq_len, compression)
    return finish_parts(out, arguments, [source])


def _vocabulary(card: dict) -> tuple[int, int]:
    """The card's vocabulary size and EOS id, checked."""
    vocab_size, eos = card.get("vocab_size"), card.get("special_ids", {}).get("eos")
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= MAX_VOCAB:
        raise DataError(f"the tokenizer's vocab_size = {vocab_size!r}: must be an integer in [1, 2**31]")
    if not isinstance(eos, int) or not 0 <= eos < vocab_size:
        raise DataError(f"the tokenizer's EOS id = {eos!r}: must be an integer in [0, {vocab_size})")
    return vocab_size, eos


def _open(prefix: Path):
    """megatron-core's IndexedDataset of ``prefix``; DataError naming the file it lacks or cannot read."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise DataError(f"{path}: no such file (a Megatron indexed dataset is PREFIX.bin with PREFIX.idx)")
    if bin_.stat().st_size == 0:  # megatron-core cannot map it
        raise DataError(f"{bin_}: is empty, the dataset holds no tokens")
    with warnings.catch_warnings():  # megatron-core's import-time notes (Transformer Engine and Apex missing...)
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    dataset = IndexedDataset.__new__(IndexedDataset)
    dataset.bin_reader = dataset.index = None  # its __del__ deletes both, also after a failed __init__
    try:
        dataset.__init__(str(prefix))
    except (AssertionError, ValueError, struct.error, OSError) as e:
        raise DataError(f"{prefix}: not a Megatron indexed dataset megatron-core can read ({e})") from None
    if not np.issubdtype(dataset.index.dtype, np.integer):
        raise DataError(f"{idx}: holds tokens of type {np.dtype(dataset.index.dtype).name}, not integers")
    if len(dataset.document_indices) < 2:
        raise DataError(f"{idx}: holds no documents")
    return dataset


def _read_documents(dataset, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents [first, stop) as megatron-core reads them: their tokens concatenated (the .bin's
    type) and each one's length."""
    bounds = dataset.document_indices[first:stop + 1]  # the documents' first sequences, and the end
    begin, end = int(bounds[0]), int(bounds[-1])
    within = np.concatenate([[0], np.cumsum(dataset.sequence_lengths[begin:end], dtype=np.int64)])
    sequences = dataset[begin:end] if end > begin else []
    tokens = np.concatenate([np.zeros(0, dataset.index.dtype), *sequences])
    return tokens, np.diff(within[bounds - begin])


def _with_eos(tokens: np.ndarray, lengths: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """The documents as int32 with the EOS appended to each that does not already end with it."""
    ends = np.cumsum(lengths)
    ended = np.zeros(len(lengths), dtype=bool)
    ended[lengths > 0] = tokens[ends[lengths > 0] - 1] == eos
    return np.insert(tokens.astype(np.int32), ends[~ended], eos), lengths + ~ended


def _check_tokens(dataset, prefix: Path, vocab_size: int, documents_per_part: int) -> str:
    """The sha256 of every token in order; DataError naming the first document holding a token outside
    [0, vocab_size). Reads a part at a time."""
    digest = hashlib.sha256()
    documents = len(dataset.document_indices) - 1
    for first in range(0, documents, documents_per_part):
        try:
            tokens, lengths = _read_documents(dataset, first, min(documents, first + documents_per_part))
        except ValueError as e:  # numpy: the .bin is shorter than the index says
            raise DataError(f"{prefix}.bin: does not hold the tokens {prefix}.idx lists ({e})") from None
        digest.update(tokens)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
            position = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
            document = first + int(np.searchsorted(np.cumsum(lengths), position, side="right"))
            raise DataError(f"{prefix}.bin: document {document} holds token {tokens[position]}, outside the "
                            f"vocabulary of {vocab_size} tokens; name the tokenizer the data was made with")
    return digest.hexdigest()
