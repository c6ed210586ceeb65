"""Document sources and text -> packed MDS shards: contents, manifest, resumption and bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stratagem.data.prepare import check_tokenizer_matches, is_validation, load_manifest, prepare
from stratagem.data.sources import DataError, SourceStats, file_sha256, iter_documents
from stratagem.data.tokenizer import Tokenizer, train_tokenizer

SEQ_LEN = 16


def generated_documents(count: int, seed: int) -> list[str]:
    """Documents of 1 to ~80 words, some spanning several samples, some multi-line or non-ASCII."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "mu", "sen", "ba", "lo", "qui", "zz", "e", "an", "str"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(200)]
    words += ["naïve", "café", "—", "東京", "😀", "Ωμέγα"]
    documents = []
    for i in range(count):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 20))) for _ in range(rng.randint(1, 4))]
        documents.append("\n".join(lines))
    return documents


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: text}) + "\n" for i, text in enumerate(texts)))
    return path


def message(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, "DataError messages are one line"
    return text


# ---- sources ---------------------------------------------------------------------------------

def test_text_files_split_documents_at_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n\n\n  third\t\n \nfourth\r\n")
    documents = list(iter_documents([path]))
    assert [d.text for d in documents] == ["first line\nsecond line", "  third\t", "fourth"]
    assert [(d.source, d.index) for d in documents] == [(str(path), 0), (str(path), 1), (str(path), 2)]


def test_jsonl_parquet_and_glob_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ["b0", "b1"], field="body")
    (tmp_path / "c.jsonl").write_text('{"body": "c0"}\n\n{"body": "c1"}\n')  # blank lines are ignored
    pq.write_table(pa.table({"body": [f"p{i}" for i in range(2500)], "n": list(range(2500))}),
                   tmp_path / "a.parquet", row_group_size=1000)
    stats = SourceStats()
    documents = list(iter_documents([str(tmp_path / "*.jsonl"), tmp_path / "a.parquet"], "body", stats=stats))
    assert [d.text for d in documents[:4]] == ["b0", "b1", "c0", "c1"]
    assert [d.text for d in documents[4:]] == [f"p{i}" for i in range(2500)]
    assert documents[-1].index == 2499
    assert {Path(s).name: c.documents for s, c in stats.files.items()} == {"b.jsonl": 2, "c.jsonl": 2,
                                                                           "a.parquet": 2500}


@pytest.mark.parametrize("name, content, expected", [
    ("a.csv", "x\n", "a.csv: unknown extension '.csv'"),
    ("a.jsonl", "", "a.jsonl: the file is empty"),
    ("a.txt", "\n\n  \n", "a.txt: holds no documents"),
    ("a.jsonl", '{"text": "ok"}\n{"text": "ok"\n', "a.jsonl: line 2: not JSON"),
    ("a.jsonl", '{"text": "ok"}\n{"body": "x", "id": 1}\n', "a.jsonl: line 2: no key 'text' (keys: body, id)"),
    ("a.jsonl", '{"text": 5}\n', "a.jsonl: line 1: key 'text' holds int, not a string"),
    ("a.jsonl", '["text"]\n', "a.jsonl: line 1: not a JSON object but list"),
    ("a.txt", b"ok\n\xff\xfe\n", "a.txt: line 2: not valid UTF-8"),
])
def test_bad_inputs_name_the_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as error:
        list(iter_documents([path]))
    assert message(error).startswith(str(tmp_path / expected))


def test_missing_paths_directories_and_parquet_columns(tmp_path):
    with pytest.raises(DataError, match="nothing.jsonl: no such file"):
        list(iter_documents([tmp_path / "nothing.jsonl"]))
    with pytest.raises(DataError, match=r"\*.jsonl: the glob matches no file"):
        list(iter_documents([str(tmp_path / "*.jsonl")]))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="dir: is a directory"):
        list(iter_documents([tmp_path / "dir"]))
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "a.parquet")
    with pytest.raises(DataError) as error:
        list(iter_documents([tmp_path / "a.parquet"]))
    assert message(error) == f"{tmp_path / 'a.parquet'}: no column 'text' (columns: body, id)"
    with pytest.raises(DataError, match="column 'id' has type int64, not string"):
        list(iter_documents([tmp_path / "a.parquet"], text_field="id"))


def test_unreadable_file(tmp_path, monkeypatch):
    """Root reads files whatever their mode, so the OS refusal is simulated at `open`."""
    from stratagem.data import sources

    path = write_jsonl(tmp_path / "a.jsonl", ["x"])

    def refuse(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(sources, "open", refuse, raising=False)
    with pytest.raises(DataError, match="a.jsonl: cannot read: Permission denied"):
        list(iter_documents([path]))


def test_skip_bad_counts_and_warns_once_per_file(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\nnot json\n{"x": 1}\n{"text": "b"}\n')
    write_jsonl(tmp_path / "b.jsonl", ["c"])
    pq.write_table(pa.table({"text": ["d", None]}), tmp_path / "c.parquet")
    stats = SourceStats()
    texts = [d.text for d in iter_documents([str(tmp_path / "*")], skip_bad=True, stats=stats)]
    assert texts == ["a", "b", "c", "d"]
    assert {Path(s).name: (c.documents, c.skipped) for s, c in stats.files.items()} == {
        "a.jsonl": (2, 2), "b.jsonl": (1, 0), "c.parquet": (1, 1)}
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [f"warning: {tmp_path / 'a.jsonl'}: skipped 2 bad record(s) of 4 (first: line 2: not JSON "
                        f"(Expecting value: line 1 column 1 (char 0)))",
                        f"warning: {tmp_path / 'c.parquet'}: skipped 1 bad record(s) of 2 (first: row 1: 'text' is null)"]


# ---- prepare ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Three input files (JSONL, text, Parquet), their documents in order and a tokenizer."""
    root = tmp_path_factory.mktemp("prepare")
    documents = generated_documents(1000, seed=3)
    documents[5] = ""  # an empty document still counts: it is a lone EOS
    write_jsonl(root / "a.jsonl", documents[:600])
    (root / "b.txt").write_text("\n\n".join(documents[600:750]) + "\n")
    pq.write_table(pa.table({"text": documents[750:]}), root / "c.parquet", row_group_size=64)
    inputs = [str(root / "a.jsonl"), str(root / "b.txt"), str(root / "c.parquet")]
    read = list(iter_documents(inputs))
    tokenizer = train_tokenizer(inputs, root / "tok", vocab_size=400)
    return {"root": root, "inputs": inputs, "documents": read, "tokenizer": tokenizer}


def run(data, out: Path, **overrides):
    arguments = dict(seq_len=SEQ_LEN, val_fraction=0.2, workers=2, documents_per_part=64, progress=False)
    arguments.update(overrides)
    return prepare(data["inputs"], data["tokenizer"], out=out, **arguments)


@pytest.fixture(scope="module")
def prepared(data) -> tuple[Path, object]:
    out = data["root"] / "out"
    return out, run(data, out)


@pytest.fixture(scope="module")
def samples(prepared) -> dict[str, list[dict]]:
    """Every sample of both splits, read back with streaming (from a copy: reading unpacks shards)."""
    from streaming import StreamingDataset

    out, _ = prepared
    copy = shutil.copytree(out, out.parent / "read")
    read = {}
    for split in ("train", "val"):
        dataset = StreamingDataset(local=str(copy / split), shuffle=False, batch_size=8, validate_hash="sha1")
        read[split] = [dataset[i] for i in range(len(dataset))]
    return read


def split_stream(out: Path, samples: list[dict], split: str) -> np.ndarray:
    """A split's whole token stream: its samples, then the dropped tail kept in the last part's marker."""
    last = sorted((out / split).glob("part-*.done.json"))[-1]
    tail = json.loads(last.read_text())["leftover"]["tokens"]
    return np.concatenate([s["tokens"] for s in samples] + [np.array(tail, np.int32)])


def test_every_document_appears_once_in_its_split(data, prepared, samples):
    out, manifest = prepared
    tokenizer = Tokenizer.load(data["tokenizer"])
    sha256 = {path: file_sha256(path) for path in data["inputs"]}
    decoded = Counter()
    for split in ("train", "val"):
        stream = split_stream(out, samples[split], split)
        assert stream[-1] == tokenizer.eos_id
        documents = np.split(stream, np.flatnonzero(stream == tokenizer.eos_id)[:-1] + 1)
        texts = [tokenizer.decode(d[:-1]) for d in documents]
        expected = [d.text for d in data["documents"]
                    if is_validation(sha256[d.source], d.index, 0.2) == (split == "val")]
        assert texts == expected  # in input order within the split
        decoded.update(texts)
        assert manifest.documents[split] == len(texts)
        assert manifest.tokens[split] == len(stream)
    assert decoded == Counter(d.text for d in data["documents"])
    assert sum(manifest.tokens.values()) == sum(len(tokenizer.encode(d.text)) + 1 for d in data["documents"])


def test_samples_and_doc_starts(data, prepared, samples):
    _, manifest = prepared
    eos = Tokenizer.load(data["tokenizer"]).eos_id
    for split in ("train", "val"):
        for sample in samples[split]:
            tokens, starts = sample["tokens"], sample["doc_starts"]
            assert tokens.dtype == np.int32 and starts.dtype == np.int32 and len(tokens) == SEQ_LEN + 1
            # 0 always begins a segment; every other start follows an EOS, and every EOS is followed by one.
            assert list(starts) == [0] + [p for p in range(1, SEQ_LEN + 1) if tokens[p - 1] == eos]
        assert manifest.samples[split] == len(samples[split])
        assert manifest.samples[split] * (SEQ_LEN + 1) + manifest.dropped_tokens[split] == manifest.tokens[split]
        assert 0 <= manifest.dropped_tokens[split] <= SEQ_LEN


def test_manifest(data, prepared):
    out, manifest = prepared
    assert load_manifest(out) == manifest
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "stratagem-mds" and raw["version"] == 1 and raw["seq_len"] == SEQ_LEN
    assert raw["tokenizer"] == Tokenizer.load(data["tokenizer"]).card and raw["val_fraction"] == 0.2
    assert raw["columns"] == {"tokens": "ndarray:int32", "doc_starts": "ndarray:int32"}
    assert [(s["path"], s["documents"], s["skipped"]) for s in raw["sources"]] == [
        (str(Path(p).resolve()), n, 0) for p, n in zip(data["inputs"], (600, 150, 250))]
    assert sum(manifest.documents.values()) == len(data["documents"])
    assert 0.1 < manifest.documents["val"] / len(data["documents"]) < 0.3
    index = json.loads((out / "train" / "index.json").read_text())
    assert all(s["zip_data"]["basename"].startswith("part-") and "sha1" in s["zip_data"]["hashes"]
               for s in index["shards"])
    check_tokenizer_matches(manifest, Tokenizer.load(data["tokenizer"]))


def test_check_tokenizer_matches_rejects_another_tokenizer(data, prepared, tmp_path):
    other = train_tokenizer(data["inputs"], tmp_path / "other", vocab_size=420)
    with pytest.raises(DataError) as error:
        check_tokenizer_matches(prepared[1], Tokenizer.load(other))
    assert "not the tokenizer the shards were prepared with" in message(error)


def test_rerun_of_a_finished_output_is_a_no_op(data, prepared):
    out, manifest = prepared
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert run(data, out, workers=1) == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_an_interrupted_run_resumes_to_identical_files(data, tmp_path):
    """Kill a run (SIGKILL) after some parts, rerun it, and compare every file with an uninterrupted run."""
    options = dict(seq_len=SEQ_LEN, val_fraction=0.2, documents_per_part=3)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    code = ("from stratagem.data.prepare import prepare; "
            f"prepare({data['inputs']!r}, {str(data['tokenizer'])!r}, out={str(killed)!r}, workers=1, "
            f"progress=False, **{options!r})")
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    first_marker, deadline = killed / "val" / "part-00000.done.json", time.monotonic() + 60
    while not first_marker.exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "manifest.json").exists(), "the run finished before it was killed"
    kept = (killed / "train" / "part-00000" / "shard.00000.mds.zstd").stat().st_mtime_ns

    prepare(data["inputs"], data["tokenizer"], out=killed, workers=2, progress=False, **options)
    prepare(data["inputs"], data["tokenizer"], out=whole, workers=1, progress=False, **options)
    assert (killed / "train" / "part-00000" / "shard.00000.mds.zstd").stat().st_mtime_ns == kept  # not redone
    assert tree(killed) == tree(whole)
    assert len(list((whole / "train").glob("part-*.done.json"))) == 334


def test_bad_arguments_are_refused_before_anything_is_written(data, tmp_path):
    out = tmp_path / "out"
    for overrides, expected in [({"seq_len": 0}, "seq_len = 0: must be a positive integer"),
                                ({"val_fraction": 1.0}, r"val_fraction = 1.0: must be in \[0, 1\)"),
                                ({"workers": 0}, "workers = 0"),
                                ({"compression": "zip"}, "compression = 'zip'")]:
        with pytest.raises(DataError, match=expected):
            run(data, out, **overrides)
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        prepare([tmp_path / "missing.jsonl"], data["tokenizer"], SEQ_LEN, out)
    edited = shutil.copytree(data["tokenizer"], tmp_path / "tok")
    card = json.loads((edited / "tokenizer.json").read_text())
    (edited / "tokenizer.json").write_text(json.dumps(dict(card, vocab_size=999)))
    with pytest.raises(DataError, match="tokenizer.json: does not match tokenizer.model: vocab_size"):
        prepare(data["inputs"], edited, SEQ_LEN, out)
    assert not out.exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="busy: exists and is not a prepare output"):
        run(data, tmp_path / "busy")


def test_a_different_rerun_is_refused(data, prepared):
    out, _ = prepared
    with pytest.raises(DataError) as error:
        run(data, out, seq_len=SEQ_LEN * 2)
    assert message(error) == (f"{out / 'prepare.json'}: this directory was prepared with other arguments "
                              f"(seq_len = {SEQ_LEN}, now {SEQ_LEN * 2}); use another output directory or delete this one")
    with pytest.raises(DataError, match=r"\(inputs changed\)"):
        prepare(data["inputs"][:2], data["tokenizer"], SEQ_LEN, out, val_fraction=0.2, documents_per_part=64)


def test_a_bad_line_midway_keeps_completed_parts_and_skip_bad_counts_it(data, tmp_path, capsys):
    texts = generated_documents(200, seed=4)
    bad = write_jsonl(tmp_path / "bad.jsonl", texts)
    lines = bad.read_text().splitlines()
    lines[129] = '{"text": 7}'
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError) as error:
        prepare([bad], data["tokenizer"], SEQ_LEN, out, workers=1, documents_per_part=50, progress=False)
    assert message(error) == f"{bad}: line 130: key 'text' holds int, not a string"
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "part-00000", "part-00000.done.json", "part-00001", "part-00001.done.json"]
    assert not (out / "manifest.json").exists()

    manifest = prepare([bad], data["tokenizer"], SEQ_LEN, tmp_path / "skipping", documents_per_part=50,
                       skip_bad=True, progress=None)
    assert [(s["documents"], s["skipped"]) for s in manifest.sources] == [(199, 1)]
    err = capsys.readouterr().err
    assert "warning:" in err and "skipped 1 bad record(s)" in err and "prepare: done: 199 documents" in err


def test_load_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="manifest.json: no such file"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "stratagem-mds"}')
    with pytest.raises(DataError, match="manifest.json: not a valid manifest"):
        load_manifest(tmp_path)
