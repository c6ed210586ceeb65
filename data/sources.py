"""Documents read from text, JSON Lines and Parquet files, streamed with bounded memory.

Which files: every input is a file path or a glob. A path that exists is taken literally;
otherwise it is expanded as a glob (``**`` recurses) and its matches are sorted. Files keep the
order they were given in, a file named twice is read once.

What a document is, by extension:

- ``.txt``: a document is a group of consecutive non-blank lines; one or more blank (or
  whitespace-only) lines separate documents. The document's text is its lines joined with
  ``"\\n"``, without the final newline. A text without blank lines is therefore one document.
- ``.jsonl`` / ``.json`` (JSON Lines): one document per line, the string under ``text_field``.
  Blank lines are ignored.
- ``.parquet``: one document per row, the string column ``text_field``, read in record batches.

``Document.index`` counts the documents yielded from one file, from 0. It identifies a document
stably (``prepare`` derives its train/validation split from it and the file's sha256).

Bad input raises ``DataError`` with one line naming the file (and the line or row). With
``skip_bad=True`` bad records (a JSONL line that is not a JSON object with a string field, or a
Parquet row whose text is null) are skipped instead, counted in ``SourceStats`` and reported as one
warning line per file on stderr once all files are read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stratagem.errors import StratagemError

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024


class DataError(StratagemError):
    """An input file, a tokenizer or a prepared data directory cannot be used as given."""


@dataclass(frozen=True)
class Document:
    source: str  # the file, as given or as matched by a glob
    index: int  # position among the documents yielded from that file
    text: str


@dataclass
class FileStats:
    documents: int = 0
    skipped: int = 0
    first_skipped: str = ""  # why the first skipped record was bad, e.g. "line 7: not JSON"


@dataclass
class SourceStats:
    """Per-file counts of one pass over the inputs, keyed by ``Document.source``."""

    files: dict[str, FileStats] = field(default_factory=dict)

    @property
    def documents(self) -> int:
        return sum(f.documents for f in self.files.values())

    @property
    def skipped(self) -> int:
        return sum(f.skipped for f in self.files.values())


class _BadRecord(Exception):
    """A record that ``skip_bad`` may skip; carries ``"line N: reason"``."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that it either keeps its old content or has all of ``data``, even if killed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _expand(entry: str | Path) -> list[Path]:
    path = Path(entry)
    if path.exists():
        return [path]
    if glob.has_magic(str(entry)):
        matches = [Path(m) for m in sorted(glob.glob(str(entry), recursive=True))]
        matches = [m for m in matches if not m.is_dir()]
        if not matches:
            raise DataError(f"{entry}: the glob matches no file")
        return matches
    raise DataError(f"{entry}: no such file")


def _check_file(path: Path, text_field: str) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give files or a glob such as {path}/*.jsonl")
    if path.suffix.lower() not in SUPPORTED:
        raise DataError(f"{path}: unknown extension {path.suffix!r}; supported: {', '.join(SUPPORTED)}")
    try:
        with open(path, "rb") as f:
            if not f.read(1):
                raise DataError(f"{path}: the file is empty")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if path.suffix.lower() in PARQUET_SUFFIXES:
        _parquet_text_column(path, text_field)


def resolve_inputs(paths: str | Path | Iterable[str | Path], text_field: str = "text") -> list[Path]:
    """The files named by ``paths`` (files or globs, or a single one), checked before any is read in full.

    Raises DataError for a path or glob that matches nothing, a directory, an unknown extension,
    an unreadable or empty file, and a Parquet file without a string column ``text_field``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    seen: set[Path] = set()
    for entry in paths:
        for path in _expand(entry):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                _check_file(path, text_field)
                files.append(path)
    if not files:
        raise DataError("no input files given")
    return files


def _read_text(path: Path, text_field: str) -> Iterator[str]:
    lines: list[str] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {number}: not valid UTF-8") from None
            if line.strip():
                lines.append(line)
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def _read_jsonl(path: Path, text_field: str) -> Iterator[str | _BadRecord]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:
                yield _BadRecord(f"line {number}: not JSON ({e})")
                continue
            if not isinstance(record, dict):
                yield _BadRecord(f"line {number}: not a JSON object but {type(record).__name__}")
            elif text_field not in record:
                keys = ", ".join(map(str, record)) or "none"
                yield _BadRecord(f"line {number}: no key {text_field!r} (keys: {keys})")
            elif not isinstance(record[text_field], str):
                kind = type(record[text_field]).__name__
                yield _BadRecord(f"line {number}: key {text_field!r} holds {kind}, not a string")
            else:
                yield record[text_field]


def _parquet_text_column(path: Path, text_field: str):
    """Open a Parquet file and check that ``text_field`` is a string column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_field!r} has type {kind}, not string")
    return parquet


def _read_parquet(path: Path, text_field: str) -> Iterator[str | _BadRecord]:
    parquet = _parquet_text_column(path, text_field)
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield _BadRecord(f"row {row}: {text_field!r} is null") if text is None else text
            row += 1


def _reader(path: Path):
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _read_text
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl
    return _read_parquet


def iter_documents(paths: str | Path | Iterable[str | Path], text_field: str = "text", skip_bad: bool = False,
                   stats: SourceStats | None = None) -> Iterator[Document]:
    """Yield the documents of ``paths`` (files or globs) in order; see the module docstring.

    ``stats``, if given, receives per-file document and skipped-record counts as reading goes.
    """
    files = resolve_inputs(paths, text_field)
    stats = stats if stats is not None else SourceStats()
    for path in files:
        counts = stats.files.setdefault(str(path), FileStats())
        try:
            for item in _reader(path)(path, text_field):
                if isinstance(item, _BadRecord):
                    if not skip_bad:
                        raise DataError(f"{path}: {item}")
                    counts.skipped += 1
                    counts.first_skipped = counts.first_skipped or str(item)
                    continue
                counts.documents += 1  # before yielding: a consumer may stop at this document
                yield Document(str(path), counts.documents - 1, item)
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
        if counts.documents == 0 and counts.skipped == 0:
            raise DataError(f"{path}: holds no documents")
    for source, counts in stats.files.items():
        if counts.skipped:
            print(f"warning: {source}: skipped {counts.skipped} bad record(s) of "
                  f"{counts.documents + counts.skipped} (first: {counts.first_skipped})",
                  file=sys.stderr, flush=True)
