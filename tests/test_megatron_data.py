"""`data.megatron`: a Megatron indexed dataset written by megatron-core's own builder, converted to MDS
shards and read back token for token, resumed, and refused on bad input without writing."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from stratagem.data.megatron import ARGUMENTS_FILE, megatron_to_mds, vocabulary_card
from stratagem.data.prepare import is_validation, load_manifest
from stratagem.data.sources import DataError
from stratagem.data.streaming import StreamSpec, check_streams, eval_batches
from stratagem.launcher.cli import main

SEQ_LEN, VOCAB, EOS = 16, 1000, 3
CARD = vocabulary_card("test-vocab", VOCAB, EOS)
OPTIONS = dict(val_fraction=0.25, documents_per_part=7, compression=None)  # uncompressed: read in place


def build(prefix, documents: list[list[np.ndarray]], dtype=np.uint16) -> None:
    """Write documents (each a list of sequences) with megatron-core's IndexedDatasetBuilder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core's import-time notes
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sequences in documents:
        tokens = np.concatenate([np.zeros(0, np.int64), *sequences])
        builder.add_document(tokens, [len(s) for s in sequences])
    builder.finalize(f"{prefix}.idx")


def generated_documents(count: int, seed: int) -> list[list[np.ndarray]]:
    """Documents of 1 to 3 sequences of 0 to 40 tokens (some longer than a sample), every other one
    ending with EOS as preprocess_data.py --append-eod writes them; one without sequences."""
    rng = np.random.default_rng(seed)
    documents = []
    for i in range(count):
        sequences = [rng.integers(EOS + 1, VOCAB, rng.integers(0, 40)) for _ in range(rng.integers(1, 4))]
        if i % 2:
            sequences[-1] = np.append(sequences[-1], EOS)
        documents.append(sequences)
    documents[4] = []
    return documents


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("megatron")
    documents = generated_documents(60, seed=0)
    build(root / "corpus", documents)
    out = root / "out"
    return {"root": root, "documents": documents, "out": out,
            "manifest": megatron_to_mds(root / "corpus", out, SEQ_LEN, CARD, **OPTIONS)}


def expected_documents(documents: list[list[np.ndarray]]) -> list[np.ndarray]:
    """prepare's convention: each document followed by exactly one EOS."""
    expected = []
    for sequences in documents:
        tokens = np.concatenate([np.zeros(0, np.int64), *sequences])
        expected.append(tokens if len(tokens) and tokens[-1] == EOS else np.append(tokens, EOS))
    return expected


def read_samples(out, split) -> list[dict]:
    from streaming import LocalDataset

    dataset = LocalDataset(local=str(out / split))
    return [dataset[i] for i in range(len(dataset))]


def tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_tokens_and_document_starts_are_the_megatron_documents(dataset):
    out, manifest = dataset["out"], dataset["manifest"]
    sha256 = manifest.sources[0]["tokens_sha256"]
    documents = expected_documents(dataset["documents"])
    for split in ("train", "val"):
        mine = [d for i, d in enumerate(documents) if is_validation(sha256, i, 0.25) == (split == "val")]
        stream = np.concatenate(mine)
        starts = np.cumsum([0] + [len(d) for d in mine[:-1]])
        samples = read_samples(out, split)
        width = SEQ_LEN + 1
        assert len(samples) == len(stream) // width == manifest.samples[split] > 0
        for i, sample in enumerate(samples):
            assert sample["tokens"].dtype == np.int32
            np.testing.assert_array_equal(sample["tokens"], stream[i * width:(i + 1) * width])
            inside = starts[(starts >= i * width) & (starts < (i + 1) * width)] - i * width
            assert list(sample["doc_starts"]) == sorted({0, *inside.tolist()})
        assert manifest.documents[split] == len(mine) and manifest.tokens[split] == len(stream)
        assert manifest.dropped_tokens[split] == len(stream) % width
    assert sum(manifest.documents.values()) == 60


def test_the_manifest_card_and_layout_are_prepares(dataset):
    out, manifest = dataset["out"], dataset["manifest"]
    assert load_manifest(out) == manifest and manifest.tokenizer == CARD and manifest.seq_len == SEQ_LEN
    assert manifest.sources[0]["prefix"] == str(dataset["root"] / "corpus")
    assert check_streams([StreamSpec(path=str(out))], SEQ_LEN)["vocab_size"] == VOCAB
    assert len(list((out / "train").glob("part-*.done.json"))) == 9  # 60 documents, 7 per part
    assert json.loads((out / ARGUMENTS_FILE).read_text())["input"]["documents"] == 60
    assert vocabulary_card("test-vocab", VOCAB, EOS) == CARD != vocabulary_card("other", VOCAB, EOS)


def test_a_rerun_keeps_a_finished_output_and_resumes_an_interrupted_one(dataset, tmp_path):
    out = dataset["out"]
    before = tree(out)
    assert megatron_to_mds(dataset["root"] / "corpus", out, SEQ_LEN, CARD, **OPTIONS) == dataset["manifest"]
    assert tree(out) == before
    interrupted = shutil.copytree(out, tmp_path / "interrupted")
    (interrupted / "manifest.json").unlink()
    for path in [*interrupted.glob("*/part-0000[5-8]*"), interrupted / "val" / "part-00004.done.json"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    megatron_to_mds(dataset["root"] / "corpus", interrupted, SEQ_LEN, CARD, **OPTIONS)
    assert tree(interrupted) == before


def test_the_cli_converts_into_streams_stratagem_reads(dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["convert", "megatron-data", str(dataset["root"] / "corpus"), "--out", str(out), "--seq-len",
                 str(SEQ_LEN), "--vocabulary", "test-vocab", "--vocab-size", str(VOCAB), "--eos-id", str(EOS),
                 "--val-fraction", "0.25"]) == 0
    assert f'path = "{out}"' in capsys.readouterr().out
    manifest = load_manifest(out)
    assert manifest.tokenizer == CARD and manifest.samples == dataset["manifest"].samples
    val = eval_batches([StreamSpec(path=str(out))], SEQ_LEN, micro_batch_size=2, count=2)  # zstd shards
    expected = np.stack([s["tokens"] for s in read_samples(dataset["out"], "val")[:4]])
    np.testing.assert_array_equal(torch.cat(val).numpy(), expected)


def test_text_encoded_with_a_stratagem_tokenizer_decodes_back(tmp_path, capsys):
    """preprocess_data.py's output for text: each document's ids then EOD, written by the builder."""
    from stratagem.data.tokenizer import Tokenizer, train_tokenizer

    texts = [" ".join(f"word{(i * j) % 37}" for j in range(i % 9 + 1)) for i in range(120)]
    (tmp_path / "a.txt").write_text("\n\n".join(texts) + "\n")
    tokenizer = Tokenizer.load(train_tokenizer([tmp_path / "a.txt"], tmp_path / "tok", vocab_size=300))
    build(tmp_path / "text", [[np.array(tokenizer.encode(text) + [tokenizer.eos_id])] for text in texts])
    out = tmp_path / "out"
    assert main(["convert", "megatron-data", str(tmp_path / "text"), "--out", str(out), "--seq-len", str(SEQ_LEN),
                 "--tokenizer", str(tmp_path / "tok"), "--val-fraction", "0"]) == 0
    manifest = load_manifest(out)
    assert manifest.tokenizer == tokenizer.card and manifest.documents == {"train": 120, "val": 0}
    tail = json.loads(sorted((out / "train").glob("part-*.done.json"))[-1].read_text())["leftover"]["tokens"]
    from streaming import StreamingDataset

    samples = StreamingDataset(local=str(out / "train"), shuffle=False, batch_size=1)  # zstd shards
    stream = np.concatenate([samples[i]["tokens"] for i in range(len(samples))] + [np.array(tail, np.int32)])
    documents = np.split(stream, np.flatnonzero(stream == tokenizer.eos_id)[:-1] + 1)
    assert [tokenizer.decode(d[:-1]) for d in documents] == texts
    assert main(["convert", "megatron-data", str(tmp_path / "text"), "--out", str(tmp_path / "x"), "--seq-len", "8",
                 "--tokenizer", str(tmp_path / "tok"), "--vocab-size", "300"]) == 2
    assert "drop --vocab-size and --eos-id" in capsys.readouterr().err


def test_bad_input_is_refused_in_one_line_before_anything_is_written(dataset, tmp_path, capsys):
    root = dataset["root"]
    shutil.copy(root / "corpus.bin", tmp_path / "lone.bin")
    shutil.copy(root / "corpus.idx", tmp_path / "alone.idx")
    out = tmp_path / "out"
    for prefix, expected in [(tmp_path / "lone", f"{tmp_path / 'lone.idx'}: no such file"),
                             (tmp_path / "alone", f"{tmp_path / 'alone.bin'}: no such file")]:
        with pytest.raises(DataError) as error:
            megatron_to_mds(prefix, out, SEQ_LEN, CARD)
        assert one_line(error).startswith(expected)
    small = vocabulary_card("test-vocab", 500, EOS)
    with pytest.raises(DataError) as error:
        megatron_to_mds(root / "corpus", out, SEQ_LEN, small)
    first = next(i for i, d in enumerate(expected_documents(dataset["documents"])) if d.max() >= 500)
    assert one_line(error).startswith(f"{root / 'corpus.bin'}: document {first} holds token ")
    assert "outside the vocabulary of 500 tokens" in str(error.value)
    with pytest.raises(DataError, match=r"EOS id = 1000: must be an integer in \[0, 1000\)"):
        megatron_to_mds(root / "corpus", out, SEQ_LEN, vocabulary_card("test-vocab", VOCAB, VOCAB))
    assert not out.exists()

    busy = shutil.copytree(dataset["out"], tmp_path / "busy")  # shards of another conversion
    before = tree(busy)
    with pytest.raises(DataError) as error:
        megatron_to_mds(root / "corpus", busy, SEQ_LEN * 2, CARD, **OPTIONS)
    assert one_line(error) == (f"{busy / ARGUMENTS_FILE}: this directory was converted with other arguments "
                               f"(seq_len = {SEQ_LEN}, now {SEQ_LEN * 2}); use another output directory or "
                               f"delete this one")
    (busy / ARGUMENTS_FILE).unlink()  # shards, but not this command's
    before.pop(ARGUMENTS_FILE)
    assert main(["convert", "megatron-data", str(root / "corpus"), "--out", str(busy), "--seq-len", str(SEQ_LEN),
                 "--vocabulary", "test-vocab", "--vocab-size", str(VOCAB), "--eos-id", str(EOS)]) == 2
    assert capsys.readouterr().err == (f"stratagem: error: {busy}: exists and is not a megatron conversion output "
                                       f"(no {ARGUMENTS_FILE}); choose a new or empty directory\n")
    assert tree(busy) == before
    assert main(["convert", "megatron-data", str(root / "corpus"), "--out", str(out), "--seq-len", "8"]) == 2
    assert "--tokenizer" in capsys.readouterr().err and not out.exists()
