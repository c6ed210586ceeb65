"""`data.export`: the synthetic corpus as MDS shards, read back by streaming, reused and never clobbered."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stratagem.data.export import ARGUMENTS_FILE, corpus_card, export_synthetic
from stratagem.data.prepare import MANIFEST_FILE, load_manifest
from stratagem.data.sources import DataError
from stratagem.data.streaming import StreamSpec, check_streams
from stratagem.data.synthetic import SyntheticConfig, SyntheticCorpus
from stratagem.launcher.cli import main

SEQ_LEN = 32
CFG = SyntheticConfig(order=1)


def read_split(out, split) -> np.ndarray:
    from streaming import LocalDataset

    dataset = LocalDataset(local=str(out / split))
    return np.stack([dataset[i]["tokens"] for i in range(len(dataset))])


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_samples_are_the_corpus_samples_and_the_manifest_describes_them(tmp_path):
    out = tmp_path / "syn"  # uncompressed, so that streaming's LocalDataset reads it in place
    manifest, written = export_synthetic(CFG, SEQ_LEN, out, train_samples=1100, val_samples=40, compression=None)
    assert written
    corpus = SyntheticCorpus(CFG, SEQ_LEN)
    for split, count in (("train", 1100), ("val", 40)):  # 1100 > one generated batch of 1024
        np.testing.assert_array_equal(read_split(out, split), corpus.sample(range(count), split).numpy())
    assert manifest.to_dict() == load_manifest(out).to_dict()
    assert manifest.samples == {"train": 1100, "val": 40} and manifest.seq_len == SEQ_LEN
    assert manifest.tokenizer == corpus_card(CFG) and manifest.tokenizer["vocab_size"] == CFG.vocab_size
    assert check_streams([StreamSpec(path=str(out))], SEQ_LEN)["vocab_size"] == CFG.vocab_size


def test_corpora_of_other_settings_get_other_cards():
    assert corpus_card(CFG) == corpus_card(SyntheticConfig(order=1))
    assert corpus_card(CFG)["model_sha256"] != corpus_card(SyntheticConfig(order=2))["model_sha256"]


def test_a_finished_export_is_kept_and_other_settings_are_refused_without_damage(tmp_path):
    out = tmp_path / "syn"
    export_synthetic(CFG, SEQ_LEN, out, train_samples=64, val_samples=8)
    before = snapshot(out)
    assert export_synthetic(CFG, SEQ_LEN, out, train_samples=64, val_samples=8)[1] is False
    with pytest.raises(DataError) as refused:
        export_synthetic(CFG, SEQ_LEN, out, train_samples=65, val_samples=8)
    assert str(refused.value) == (f"{out / ARGUMENTS_FILE}: this directory was exported with other arguments "
                                  f"(samples changed); use another output directory or delete this one")
    assert snapshot(out) == before


def test_a_foreign_folder_is_refused_untouched_and_an_interrupted_export_is_redone(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not a synthetic export output .no synthetic.json.; choose a new or empty directory"):
        export_synthetic(CFG, SEQ_LEN, foreign, train_samples=8, val_samples=8)
    assert snapshot(foreign) == {"notes.txt": b"keep me"}

    out = tmp_path / "syn"
    export_synthetic(CFG, SEQ_LEN, out, train_samples=16, val_samples=8, compression=None)
    (out / MANIFEST_FILE).unlink()  # as if killed before the manifest
    (out / "train" / "index.json").write_text("{")
    assert export_synthetic(CFG, SEQ_LEN, out, train_samples=16, val_samples=8, compression=None)[1] is True
    assert json.loads((out / ARGUMENTS_FILE).read_text())["samples"] == {"train": 16, "val": 8}
    assert read_split(out, "train").shape == (16, SEQ_LEN + 1)


def test_cli_exports_what_the_config_trains_on(tmp_path, capsys):
    out = tmp_path / "syn"
    args = ["data", "synthetic", "demo", "--out", str(out), "--train.steps=3", "--train.warmup_steps=1",
            f"--data.seq_len={SEQ_LEN}",
            "--train.global_batch_tokens=256", "--val-samples", "16"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith(f"{out}: wrote 24 train and 16 val samples of {SEQ_LEN + 1} tokens")  # 3 x 256 / 32
    assert main(args) == 0
    assert capsys.readouterr().out.startswith(f"{out}: already holds 24 train and 16 val samples")
    assert main(["data", "synthetic", "--out", str(out), "--val-samples", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
