"""The documented recipe end to end: text files -> tokenizer -> MDS shards -> training run -> exact resume."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from stratagem.data.prepare import prepare
from stratagem.data.tokenizer import train_tokenizer
from stratagem.errors import ConfigError
from stratagem.launcher.config import load_config
from stratagem.train.loop import train
from stratagem.train.metrics import read_metrics, without_measurements

WORDS = ("stream shard token model layer expert pipeline tensor gradient batch sample epoch loss "
         "checkpoint resume rank mesh plan cost memory schedule warmup decay scaling law").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two prepared streams (a .txt and a .jsonl source) sharing one tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)

    def paragraph():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "."

    (root / "books.txt").write_text("\n\n".join(paragraph() for _ in range(300)))
    with open(root / "web.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": paragraph() + " café"}) + "\n")
    train_tokenizer([root / "books.txt", root / "web.jsonl"], root / "tok", vocab_size=300)
    # prepare through the command line once, so the wiring of `stratagem data prepare` is exercised
    cli = [sys.executable, "-m", "stratagem.launcher.cli", "data", "prepare", "--input", str(root / "books.txt"),
           "--tokenizer", str(root / "tok"), "--seq-len", "32", "--out", str(root / "books"),
           "--val-fraction", "0.1", "--workers", "1"]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "samples of 33 tokens" in done.stdout
    prepare([root / "web.jsonl"], root / "tok", 32, root / "web", val_fraction=0.1, workers=1, progress=False)
    return root


def mds_config(corpus: Path, tmp_path: Path, *overrides: str):
    toml = tmp_path / "text.toml"
    toml.write_text(f"""
[model]
flavor = "tiny"
vocab_size = 300
[data]
kind = "mds"
seq_len = 32
[data.mds]
num_workers = 0
[[data.mds.streams]]
path = "{corpus / 'books'}"
weight = 0.7
[[data.mds.streams]]
path = "{corpus / 'web'}"
weight = 0.3
[train]
steps = 6
global_batch_tokens = 256
micro_batch_size = 4
warmup_steps = 1
eval_every = 3
eval_batches = 2
checkpoint_every = 0
[run]
dir = "{tmp_path}"
""")
    return load_config(str(toml), list(overrides))


def test_training_on_prepared_streams_resumes_exactly(corpus, tmp_path):
    straight = mds_config(corpus, tmp_path, "--run.name=straight")
    train(straight)
    records = read_metrics(tmp_path / "straight")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    last = records[-1]
    assert last["tokens/books"] + last["tokens/web"] == last["tokens"] == 6 * 256
    assert "eval_loss" in last and last["loss"] < records[0]["loss"]

    resumed = mds_config(corpus, tmp_path, "--run.name=resumed")
    train(resumed, stop_after=3)
    train(resumed, resume=True)
    assert without_measurements(read_metrics(tmp_path / "resumed")) == without_measurements(records)


def test_resolved_mds_config_round_trips(corpus, tmp_path):
    config = mds_config(corpus, tmp_path)
    train(config, stop_after=1)
    assert load_config(str(tmp_path / "demo" / "config.toml")) == config


def test_mds_config_errors(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"data.mds.streams = \[\]: kind = 'mds' needs at least one"):
        load_config(None, ["--data.kind=mds"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nkind = 'mds'\n[[data.mds.streams]]\nweight = 1.0\n")
    with pytest.raises(ConfigError, match=rf"{bad}: data.mds.streams\[0\]: missing key 'path'"):
        load_config(str(bad))
    small = mds_config(corpus, tmp_path, "--model.vocab_size=100")
    with pytest.raises(ConfigError, match=r"model.vocab_size = 100: smaller than the data's vocabulary \(300"):
        train(small)
    assert not (tmp_path / "demo").exists()  # refused before anything was written
