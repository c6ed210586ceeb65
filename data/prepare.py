"""Text files -> tokenized, packed MDS shards for training, written in resumable parts.

Every document is encoded (no BOS, one EOS appended) and assigned to a split: it goes to ``val``
when ``sha256(f"{file_sha256}:{document_index}")``, read as a 64-bit integer, is below
``val_fraction * 2**64``, else to ``train``. The split is thus a pure function of the file's content
and the document's place in it: it does not depend on the number of workers, on resumption, or
on the other files given.

Each split's token stream (its documents in input order) is cut into samples of ``seq_len + 1``
tokens; documents run across sample boundaries. A sample stores ``tokens`` and ``doc_starts``:
0 and every other position in the sample where a document begins, from which the loader builds
a document mask. 0 is always listed, because a sample that begins in the middle of a document
begins a segment all the same (and MDS cannot store an empty array); whether a document really
begins there shows in the previous sample, which then ends with EOS. The incomplete last sample
of each split is dropped and counted in the manifest.

Layout of ``out``::

    prepare.json                 the arguments, written first; a rerun must pass the same ones
    train/part-00000/            an MDS directory (shards + its index.json) from streaming.MDSWriter
    train/part-00000.done.json   written once that writer finished: counts and the leftover tokens
    train/index.json             all parts' shards (paths part-NNNNN/shard...): read the split here
    val/...                      the same for the validation split
    manifest.json                written last: the output is complete

Resumption: part N holds input documents [N * documents_per_part, (N + 1) * documents_per_part).
A part is complete when both splits' markers exist. A rerun re-reads the inputs, skips complete
parts without encoding them, removes what an unfinished part left and continues from the last
marker's leftover tokens, so its shards are byte-identical to those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stratagem.data.sources import (DataError, SourceStats, file_sha256, iter_documents, resolve_inputs,
                                    write_atomic)
from stratagem.data.tokenizer import Tokenizer, card_mismatch

FORMAT, VERSION = "stratagem-mds", 1
ARGUMENTS_FORMAT = "stratagem-prepare"
SPLITS = ("train", "val")
COLUMNS = {"tokens": "ndarray:int32", "doc_starts": "ndarray:int32"}
# Recorded in every shard's index entry; read with StreamingDataset(validate_hash="sha1") to check.
HASHES = ["sha1"]
ARGUMENTS_FILE, MANIFEST_FILE = "prepare.json", "manifest.json"
# Work sent to a worker at once; at most 2 * workers chunks are in flight (bounded memory).
CHUNK_DOCUMENTS, CHUNK_CHARS = 256, 1 << 20
LOG_SECONDS = 30.0


@dataclass(frozen=True)
class Manifest:
    """What ``prepare`` wrote; ``tokens`` counts document tokens including each EOS."""

    format: str
    version: int
    seq_len: int
    tokenizer: dict
    val_fraction: float
    documents: dict[str, int]
    tokens: dict[str, int]
    samples: dict[str, int]
    dropped_tokens: dict[str, int]
    sources: list[dict]
    columns: dict[str, str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_manifest(directory: str | Path) -> Manifest:
    """The manifest of a prepared data directory; DataError naming the file if missing or invalid."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such file; the directory is not a finished `stratagem data prepare` output")
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest(**raw)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a valid manifest ({e})") from None
    if manifest.format != FORMAT or manifest.version != VERSION:
        raise DataError(f"{path}: format {manifest.format!r} version {manifest.version!r}, "
                        f"expected {FORMAT!r} version {VERSION}")
    return manifest


def check_tokenizer_matches(manifest: Manifest, tokenizer: Tokenizer) -> None:
    """Raise DataError unless ``tokenizer`` is the one the manifest's shards were encoded with."""
    problem = card_mismatch(tokenizer.card, manifest.tokenizer)
    if problem:
        raise DataError(f"{tokenizer.model_path}: not the tokenizer the shards were prepared with: "
                        f"its {problem} by the shards' manifest")


def is_validation(source_sha256: str, index: int, val_fraction: float) -> bool:
    """Whether document ``index`` of the file with that sha256 belongs to the validation split."""
    digest = hashlib.sha256(f"{source_sha256}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


# ---- encoding (worker processes) -------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The documents' tokens, each followed by EOS, concatenated; and each document's length."""
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    arrays = tokenizer.encode_arrays(texts)
    tokens = np.concatenate([piece for array in arrays for piece in (array, eos)])
    return tokens, np.array([len(array) + 1 for array in arrays], dtype=np.int64)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_worker_tokenizer, texts)


@dataclass
class _Chunk:
    part: int
    val: list[bool] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    ends_part: bool = False  # the part's last chunk: the part can be written once it is encoded


def _chunks(documents: Iterable, sha256_of: dict[str, str], first_part: int, documents_per_part: int,
            val_fraction: float) -> Iterator[_Chunk]:
    """Group documents into chunks for the encoders; a chunk never spans two parts.

    A part's last chunk is flagged so that the part is written as soon as it is encoded, before
    the next documents are read: an error in those leaves the part complete.
    """
    chunk, chars, in_part = _Chunk(first_part), 0, 0
    for document in documents:
        chunk.val.append(is_validation(sha256_of[document.source], document.index, val_fraction))
        chunk.texts.append(document.text)
        chars += len(document.text)
        in_part += 1
        part_full = in_part == documents_per_part
        if part_full or len(chunk.texts) == CHUNK_DOCUMENTS or chars >= CHUNK_CHARS:
            chunk.ends_part = part_full
            yield chunk
            chunk, chars = _Chunk(chunk.part + part_full), 0
            in_part = 0 if part_full else in_part
    if chunk.texts:
        chunk.ends_part = True
        yield chunk


def _encoded(chunks: Iterator[_Chunk], tokenizer: Tokenizer,
             workers: int) -> Iterator[tuple[_Chunk, tuple[np.ndarray, np.ndarray]]]:
    """(chunk, (tokens, lengths)) in input order, encoded by ``workers`` processes.

    A bounded window of asynchronous tasks instead of ``Pool.imap``: imap reads its whole input
    ahead, which would hold every document in memory. Workers are forked where possible: they need
    only the tokenizer, and spawning would re-import torch (through ``stratagem.data``) in each.
    """
    if workers == 1:
        for chunk in chunks:
            yield chunk, _encode(tokenizer, chunk.texts)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.model_path),)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_in_worker, (chunk.texts,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


# ---- packing and writing parts ---------------------------------------------------------------

@dataclass
class _Leftover:
    """Tokens of a split not yet packed into a sample, and where documents start among them."""

    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    doc_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class PartBuffer:
    tokens: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.tokens.append(tokens)
        self.lengths.append(lengths)


def add_documents(buffers: dict[str, PartBuffer], tokens: np.ndarray, lengths: np.ndarray, val: np.ndarray) -> None:
    """Append documents (their tokens concatenated, one length each) to the split ``val`` flags for each."""
    val_tokens = np.repeat(val, lengths)
    buffers["train"].add(tokens[~val_tokens], lengths[~val])
    buffers["val"].add(tokens[val_tokens], lengths[val])


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def _marker(split_dir: Path, part: int) -> Path:
    return split_dir / f"{part_name(part)}.done.json"


def write_part(split_dir: Path, part: int, buffer: PartBuffer, leftover: _Leftover, seq_len: int,
               compression: str | None) -> _Leftover:
    """Pack the leftover plus this part's documents into samples, write them, then the marker."""
    from streaming import MDSWriter

    lengths = np.concatenate([np.zeros(0, np.int64), *buffer.lengths])
    tokens = np.concatenate([leftover.tokens, *buffer.tokens])
    starts = np.concatenate([leftover.doc_starts, len(leftover.tokens) + np.cumsum(lengths) - lengths])
    width = seq_len + 1
    samples = len(tokens) // width
    bounds = np.searchsorted(starts, np.arange(samples + 1) * width)
    writer = MDSWriter(out=str(split_dir / part_name(part)), columns=COLUMNS, compression=compression,
                       hashes=HASHES)
    for i in range(samples):
        segment_starts = starts[bounds[i]:bounds[i + 1]] - i * width
        if not len(segment_starts) or segment_starts[0]:
            segment_starts = np.concatenate([[0], segment_starts])
        writer.write({"tokens": tokens[i * width:(i + 1) * width], "doc_starts": segment_starts.astype(np.int32)})
    writer.finish()
    rest = _Leftover(tokens[samples * width:], starts[bounds[samples]:] - samples * width)
    marker = {"part": part, "documents": len(lengths), "tokens": int(lengths.sum()), "samples": samples,
              "leftover": {"tokens": rest.tokens.tolist(), "doc_starts": rest.doc_starts.tolist()}}
    write_atomic(_marker(split_dir, part), (json.dumps(marker) + "\n").encode())
    return rest


def _read_marker(split_dir: Path, part: int) -> dict:
    return json.loads(_marker(split_dir, part).read_text())


def _completed_parts(out: Path) -> int:
    """How many leading parts have the markers of both splits."""
    part = 0
    while all(_marker(out / split, part).is_file() for split in SPLITS):
        part += 1
    return part


def _discard_parts_from(out: Path, first: int) -> None:
    """Remove everything parts >= ``first`` left behind (an interrupted part, a lone marker)."""
    for split in SPLITS:
        for path in sorted((out / split).glob("part-*")):
            number = re.match(r"part-(\d+)", path.name)
            if number and int(number.group(1)) >= first:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def resume_parts(out: Path) -> tuple[int, dict[str, _Leftover]]:
    """How many leading parts of ``out`` are complete, after removing what later parts left, and
    each split's leftover tokens after them: where writing part N continues."""
    done = _completed_parts(out)
    _discard_parts_from(out, done)
    leftovers = {split: _Leftover() for split in SPLITS}
    if done:
        for split in SPLITS:
            last = _read_marker(out / split, done - 1)["leftover"]
            leftovers[split] = _Leftover(np.array(last["tokens"], np.int32), np.array(last["doc_starts"], np.int64))
    return done, leftovers


def merge_index(split_dir: Path, parts: int) -> None:
    """Write the split's root index.json listing every part's shards under ``part-NNNNN/``.

    Equivalent to streaming's ``merge_index`` for local parts, without its side effects (it copies
    through a temporary directory and calls ``logging.warning`` on the root logger, which
    configures logging for the whole process) and with the parts' order made explicit.
    """
    shards = []
    for part in range(parts):
        index = json.loads((split_dir / part_name(part) / "index.json").read_text())
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{part_name(part)}/{shard[key]['basename']}"
            shards.append(shard)
    write_atomic(split_dir / "index.json", json.dumps({"version": 2, "shards": shards}, sort_keys=True).encode())


# ---- the output directory --------------------------------------------------------------------

def claim_output(out: Path, arguments: dict, record_file: str, kind: str, made: str) -> bool:
    """Make ``out`` the output of a `kind` run ("prepare") with `arguments`, recorded in
    ``out/record_file`` first; True if it already holds their finished output (its manifest). A
    directory written with other arguments, or holding anything else, is refused untouched."""
    record = out / record_file
    if record.is_file():
        try:
            previous = json.loads(record.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{record}: unreadable ({e}); delete the directory to start again") from None
        for key in [*arguments, *(key for key in previous if key not in arguments)]:
            old, new = previous.get(key), arguments.get(key)
            if old != new:
                change = f"{key} changed" if isinstance(new, (dict, list)) else f"{key} = {old!r}, now {new!r}"
                raise DataError(f"{record}: this directory was {made} with other arguments ({change}); "
                                f"use another output directory or delete this one")
        return (out / MANIFEST_FILE).is_file()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not a {kind} output (no {record_file}); "
                        f"choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(record, (json.dumps(arguments, indent=1) + "\n").encode())
    return False


class _Progress:
    """A tqdm bar (tokens/s) on a terminal; otherwise a compact line every LOG_SECONDS; or nothing."""

    def __init__(self, mode: bool | None):
        tty = sys.stderr.isatty()
        self.lines = mode is None and not tty
        self.bar = None
        if mode is True or (mode is None and tty):
            self.bar = tqdm(unit="tok", unit_scale=True, dynamic_ncols=True, desc="prepare", file=sys.stderr)
        self.started = self.logged = time.perf_counter()
        self.tokens = self.documents = 0

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(f"prepare: {message}", file=sys.stderr)
        elif self.lines:
            print(f"prepare: {message}", file=sys.stderr, flush=True)

    def update(self, tokens: int, documents: int, part: int) -> None:
        self.tokens += tokens
        self.documents += documents
        if self.bar is not None:
            self.bar.set_postfix({"docs": self.documents, "part": part}, refresh=False)
            self.bar.update(tokens)
        elif self.lines and time.perf_counter() - self.logged >= LOG_SECONDS:
            self.logged = time.perf_counter()
            self.say(f"part {part}, {self.documents} documents, {self._rate()}")

    def _rate(self) -> str:
        seconds = time.perf_counter() - self.started
        return (f"{tqdm.format_sizeof(self.tokens)} tokens, "
                f"{tqdm.format_sizeof(self.tokens / max(seconds, 1e-9))} tok/s")

    def close(self, manifest: Manifest | None) -> None:
        if self.bar is not None:
            self.bar.close()
        if manifest is not None:
            self.say(f"done: {self.documents} documents encoded, {self._rate()}; samples "
                     f"train {manifest.samples['train']}, val {manifest.samples['val']}")


def check_arguments(seq_len: int, val_fraction: float, documents_per_part: int, compression: str | None,
                    workers: int = 1) -> None:
    """DataError for an argument that `prepare`, or another writer of its layout, cannot use."""
    for name, value in (("seq_len", seq_len), ("workers", workers), ("documents_per_part", documents_per_part)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} = {value!r}: must be a positive integer")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction = {val_fraction!r}: must be in [0, 1)")
    from streaming.base.compression import is_compression

    if compression and not is_compression(compression):
        raise DataError(f"compression = {compression!r}: not a compression streaming knows (e.g. zstd, gz, br)")


def prepare(inputs: list[str | Path], tokenizer: Path, seq_len: int, out: Path, val_fraction: float = 0.01,
            text_field: str = "text", workers: int = 2, documents_per_part: int = 10000,
            skip_bad: bool = False, compression: str | None = "zstd", progress: bool | None = None) -> Manifest:
    """Tokenize ``inputs`` (files or globs) into packed MDS shards under ``out``; see the module docstring.

    ``tokenizer`` is a tokenizer directory or its .model file; ``workers`` encoding processes
    (the output does not depend on it); ``compression`` is a streaming compression name
    ("zstd", "zstd:9", ...) or None; ``progress``: True a tqdm bar, False silent, None a bar on
    a terminal and a compact line every 30 s otherwise. Rerunning with the same arguments resumes
    an interrupted run, or does nothing if the output is finished. Returns the manifest.
    """
    out = Path(out)
    check_arguments(seq_len, val_fraction, documents_per_part, compression, workers)
    files = resolve_inputs(inputs, text_field)
    tok = Tokenizer.load(tokenizer)
    sources = [{"path": str(path.resolve()), "sha256": file_sha256(path)} for path in files]
    arguments = {"format": ARGUMENTS_FORMAT, "version": VERSION, "inputs": sources, "tokenizer": tok.card,
                 "seq_len": seq_len, "val_fraction": val_fraction, "text_field": text_field,
                 "documents_per_part": documents_per_part, "skip_bad": skip_bad, "compression": compression or None}
    if claim_output(out, json.loads(json.dumps(arguments)), ARGUMENTS_FILE, "prepare", "prepared"):
        return load_manifest(out)

    done, leftovers = resume_parts(out)

    report = _Progress(progress)
    manifest = None
    try:
        stats = SourceStats()
        documents = iter_documents(files, text_field, skip_bad, stats)
        if done:
            report.say(f"resuming after {done} completed part(s): re-reading their documents")
            for _ in itertools.islice(documents, done * documents_per_part):
                pass
        sha256_of = {str(path): source["sha256"] for path, source in zip(files, sources)}
        chunks = _chunks(documents, sha256_of, done, documents_per_part, val_fraction)
        buffers = {split: PartBuffer() for split in SPLITS}
        for chunk, (tokens, lengths) in _encoded(chunks, tok, workers):
            add_documents(buffers, tokens, lengths, np.array(chunk.val))
            report.update(len(tokens), len(lengths), chunk.part)
            if chunk.ends_part:
                for split in SPLITS:
                    leftovers[split] = write_part(out / split, chunk.part, buffers[split], leftovers[split],
                                                  seq_len, compression)
                buffers = {split: PartBuffer() for split in SPLITS}
        manifest = _finish(out, arguments, stats, files)
    finally:
        report.close(manifest)
    return manifest


def _finish(out: Path, arguments: dict, stats: SourceStats, files: list[Path]) -> Manifest:
    if _completed_parts(out) == 0:
        raise DataError("the inputs hold no documents (every record was skipped as bad)")
    sources = [dict(source, documents=stats.files[str(path)].documents, skipped=stats.files[str(path)].skipped)
               for path, source in zip(files, arguments["inputs"])]
    return finish_parts(out, arguments, sources)


def finish_parts(out: Path, arguments: dict, sources: list[dict]) -> Manifest:
    """Merge the complete parts' indexes and write the manifest from their markers (at least one part)."""
    parts = _completed_parts(out)
    totals = {key: {} for key in ("documents", "tokens", "samples", "dropped_tokens")}
    for split in SPLITS:
        merge_index(out / split, parts)
        markers = [_read_marker(out / split, part) for part in range(parts)]
        for key in ("documents", "tokens", "samples"):
            totals[key][split] = sum(marker[key] for marker in markers)
        totals["dropped_tokens"][split] = len(markers[-1]["leftover"]["tokens"])
    manifest = Manifest(format=FORMAT, version=VERSION, seq_len=arguments["seq_len"], tokenizer=arguments["tokenizer"],
                        val_fraction=arguments["val_fraction"], sources=sources, columns=dict(COLUMNS), **totals)
    write_atomic(out / MANIFEST_FILE, (json.dumps(manifest.to_dict(), indent=1) + "\n").encode())
    return manifest
