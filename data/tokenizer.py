"""SentencePiece tokenizer: trained in-process from any document source, loaded with its card.

A tokenizer is a directory holding ``tokenizer.model`` (the SentencePiece model) and
``tokenizer.json`` (its card: model type, vocabulary size, special ids, the model's sha256 and
the files it was trained on). Prepared shards record the card, so a loader can refuse a tokenizer
that is not the one the shards were encoded with.

Training choices, fixed for every tokenizer this project makes:

- special ids pad=0, unk=1, bos=2, eos=3; ``byte_fallback`` so any text encodes without ``unk``;
- no normalization, no whitespace clean-up and no dummy prefix, so ``decode(encode(text)) == text``
  exactly and a document's tokens do not depend on what precedes it;
- documents are fed as slices of at most ``SENTENCE_CHARS`` characters (SentencePiece drops longer
  "sentences"), and SentencePiece keeps a uniform sample of at most ``SAMPLED_SENTENCES`` of them,
  which bounds memory on large inputs; ``max_documents`` bounds the reading itself.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from stratagem.data.sources import (DataError, Document, SourceStats, file_sha256, iter_documents, resolve_inputs,
                                    write_atomic)

MODEL_FILE, CARD_FILE = "tokenizer.model", "tokenizer.json"
CARD_FORMAT, CARD_VERSION = "stratagem-tokenizer", 1
MODEL_TYPES = ("bpe", "unigram")
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
BYTE_PIECES = 256
# Specials and byte pieces are always in the vocabulary; at least one learned piece must fit.
MIN_VOCAB_SIZE = len(SPECIAL_IDS) + BYTE_PIECES + 1
# The fields that identify a tokenizer: equal fields mean identical token ids for any text.
IDENTITY_FIELDS = ("model_sha256", "vocab_size", "special_ids")
SENTENCE_CHARS = 2048
SAMPLED_SENTENCES = 500_000


def card_mismatch(expected: dict, actual: dict) -> str | None:
    """The first identity field on which two tokenizer cards differ, described; None if equal."""
    for key in IDENTITY_FIELDS:
        if expected.get(key) != actual.get(key):
            return f"{key} is {expected.get(key)!r}, expected {actual.get(key)!r}"
    return None


class Tokenizer:
    """A loaded tokenizer. ``encode`` adds no BOS/EOS; callers add the specials they need."""

    def __init__(self, processor: spm.SentencePieceProcessor, card: dict, model_path: Path):
        self._sp, self.card, self.model_path = processor, card, model_path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a tokenizer directory or its ``.model`` file; the card must match the model."""
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        card_path = model_path.with_suffix(".json")
        for required in (model_path, card_path):
            if not required.is_file():
                raise DataError(f"{required}: no such file (a tokenizer is a directory with "
                                f"{MODEL_FILE} and {CARD_FILE}, written by train_tokenizer)")
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{card_path}: not a readable tokenizer card ({e})") from None
        if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or card.get("version") != CARD_VERSION:
            raise DataError(f"{card_path}: not a {CARD_FORMAT} card of version {CARD_VERSION}")
        try:
            processor = spm.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{model_path}: not a SentencePiece model ({e})") from None
        tokenizer = cls(processor, card, model_path)
        problem = card_mismatch(card, tokenizer._model_identity(file_sha256(model_path)))
        if problem:
            raise DataError(f"{card_path}: does not match {model_path.name}: {problem} from the model")
        return tokenizer

    def _model_identity(self, model_sha256: str) -> dict:
        sp = self._sp
        return {"model_sha256": model_sha256, "vocab_size": sp.get_piece_size(),
                "special_ids": {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}}

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts in one call, on one thread (parallelism is the caller's: processes)."""
        return self._sp.encode(list(texts), num_threads=1)

    def encode_arrays(self, texts: Sequence[str]) -> list:
        """Like ``encode_batch`` but each result is an int32 numpy array (cheap to concatenate and pickle)."""
        return self._sp.encode(list(texts), num_threads=1, out_type="numpy")

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _training_sentences(documents: Iterator[Document], failures: list[BaseException]) -> Iterator[str]:
    """Slices of the documents for SentencePiece, remembering the error that stopped reading.

    SentencePiece turns an exception raised by its sentence iterator into a RuntimeError that
    loses the type; keeping it lets ``train_tokenizer`` re-raise the original one-line DataError.
    """
    try:
        for document in documents:
            for start in range(0, len(document.text), SENTENCE_CHARS):
                yield document.text[start:start + SENTENCE_CHARS]
    except BaseException as e:
        failures.append(e)
        raise


def _vocab_error(message: str, vocab_size: int, character_coverage: float) -> DataError | None:
    """Turn SentencePiece's vocabulary-size complaints about this corpus into a DataError."""
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        needed = int(m.group(1))
        return DataError(f"vocab_size = {vocab_size} is too small for this corpus: its "
                         f"{needed - MIN_VOCAB_SIZE + 1} characters at character_coverage = "
                         f"{character_coverage} plus {MIN_VOCAB_SIZE - 1} special and byte pieces need "
                         f"at least {needed}; raise vocab_size or lower character_coverage")
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return DataError(f"vocab_size = {vocab_size} is too large for this corpus: at most {m.group(1)} "
                         f"pieces can be learned from it; lower vocab_size or give more text")
    return None


def train_tokenizer(inputs: list[str | Path], out: Path, vocab_size: int, model_type: str = "bpe",
                    text_field: str = "text", character_coverage: float = 0.9995,
                    max_documents: int | None = None, overwrite: bool = False) -> Path:
    """Train a SentencePiece tokenizer on ``inputs`` and write it to the directory ``out``.

    ``inputs`` are files or globs (.txt, .jsonl, .parquet; see ``stratagem.data.sources``), read
    as a stream; ``max_documents`` stops after that many documents. Writes ``out/tokenizer.model``
    and then its card ``out/tokenizer.json``; refuses to replace an existing tokenizer unless
    ``overwrite``. Returns ``out``.
    """
    out = Path(out)
    if model_type not in MODEL_TYPES:
        raise DataError(f"model_type = {model_type!r}: must be one of {', '.join(MODEL_TYPES)}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size = {vocab_size}: must be at least {MIN_VOCAB_SIZE} "
                        f"({len(SPECIAL_IDS)} special + {BYTE_PIECES} byte-fallback pieces + 1)")
    if not 0 < character_coverage <= 1:
        raise DataError(f"character_coverage = {character_coverage}: must be in (0, 1]")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents = {max_documents}: must be at least 1")
    existing = [p for p in (out / MODEL_FILE, out / CARD_FILE) if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]}: a tokenizer already exists here; choose another directory "
                        f"or pass overwrite")

    files = resolve_inputs(inputs, text_field)
    stats = SourceStats()
    documents = iter_documents(files, text_field, stats=stats)
    documents = itertools.islice(documents, max_documents) if max_documents else documents
    failures: list[BaseException] = []
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(documents, failures), model_writer=model,
            model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
            byte_fallback=True, pad_id=SPECIAL_IDS["pad"], unk_id=SPECIAL_IDS["unk"],
            bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"],
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            max_sentence_length=4 * SENTENCE_CHARS, input_sentence_size=SAMPLED_SENTENCES,
            shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        if failures:
            raise failures[0] from None
        raise _vocab_error(str(e), vocab_size, character_coverage) or e
    model_bytes = model.getvalue()

    card = {
        "format": CARD_FORMAT, "version": CARD_VERSION, "model_type": model_type,
        "vocab_size": vocab_size, "special_ids": dict(SPECIAL_IDS),
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "character_coverage": character_coverage, "documents": stats.documents,
        "sources": [{"path": str(Path(source).resolve()), "sha256": file_sha256(source),
                     "bytes": Path(source).stat().st_size} for source in stats.files],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / MODEL_FILE, model_bytes)
    write_atomic(out / CARD_FILE, (json.dumps(card, indent=1) + "\n").encode())
    return out
