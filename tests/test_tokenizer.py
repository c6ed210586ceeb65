"""SentencePiece tokenizer: training on real files, exact round trips, the card and its checks."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stratagem.data.sources import DataError
from stratagem.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer

NON_ASCII = "naïve café — 東京 😀"
ROUND_TRIPS = [
    "plain words from the corpus",
    "  two  spaces,\ttabs\tand\nnew lines\n\n",
    NON_ASCII,
    "never seen: Ωμέγα ∑ 𝔘 ﬁ Ａ",  # characters absent from the corpus go through byte fallback
    "",
]


def generated_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "mu", "sen", "ba", "lo", "qui", "zz", "e", "an", "str"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(count)]
    return [f"{NON_ASCII} {line}" if i % 10 == 0 else line for i, line in enumerate(lines)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(generated_lines(400)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    assert train_tokenizer([corpus], out, vocab_size=400, model_type=request.param) == out
    return out


def test_round_trip_is_exact_and_adds_no_specials(trained):
    tokenizer = Tokenizer.load(trained)
    for text in ROUND_TRIPS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.encode_batch(ROUND_TRIPS) == [tokenizer.encode(text) for text in ROUND_TRIPS]
    assert [list(a) for a in tokenizer.encode_arrays(ROUND_TRIPS)] == tokenizer.encode_batch(ROUND_TRIPS)


def test_special_ids_and_card(trained, corpus):
    tokenizer = Tokenizer.load(trained / "tokenizer.model")  # the .model file works as well as the directory
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 2, 3, 400)
    card = json.loads((trained / "tokenizer.json").read_text())
    assert card == tokenizer.card
    assert card["format"] == "stratagem-tokenizer" and card["version"] == 1
    assert card["model_type"] == trained.name.rstrip("0123456789")
    assert card["vocab_size"] == 400
    assert card["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert card["model_sha256"] == hashlib.sha256((trained / "tokenizer.model").read_bytes()).hexdigest()
    assert card["documents"] == 400
    assert card["sources"] == [{"path": str(corpus.resolve()), "bytes": corpus.stat().st_size,
                                "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()}]


@pytest.mark.parametrize("field, value", [("vocab_size", 512), ("model_sha256", "0" * 64),
                                          ("special_ids", {"pad": 0, "unk": 1, "bos": 3, "eos": 2})])
def test_load_rejects_a_card_that_does_not_match_the_model(trained, tmp_path, field, value):
    copy = shutil.copytree(trained, tmp_path / "tok")
    card = json.loads((copy / "tokenizer.json").read_text())
    card[field] = value
    (copy / "tokenizer.json").write_text(json.dumps(card))
    with pytest.raises(DataError) as error:
        Tokenizer.load(copy)
    message = str(error.value)
    assert "\n" not in message and str(copy / "tokenizer.json") in message and field in message


def test_load_needs_the_card(trained, tmp_path):
    copy = shutil.copytree(trained, tmp_path / "tok")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer.json: no such file"):
        Tokenizer.load(copy)


def test_vocab_size_is_validated(corpus, tmp_path):
    with pytest.raises(DataError, match=f"vocab_size = 100: must be at least {MIN_VOCAB_SIZE}"):
        train_tokenizer([corpus], tmp_path / "a", vocab_size=100)
    # Above the fixed minimum but below what this corpus's characters need: sentencepiece's limit, explained.
    with pytest.raises(DataError, match=r"vocab_size = 262 is too small for this corpus: .* at least \d+"):
        train_tokenizer([corpus], tmp_path / "b", vocab_size=262)
    with pytest.raises(DataError, match=r"vocab_size = 100000 is too large for this corpus: at most \d+"):
        train_tokenizer([corpus], tmp_path / "c", vocab_size=100000, model_type="unigram")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_refuses_to_overwrite_unless_asked(corpus, trained):
    model = (trained / "tokenizer.model").read_bytes()
    with pytest.raises(DataError, match="a tokenizer already exists here"):
        train_tokenizer([corpus], trained, vocab_size=400)
    assert (trained / "tokenizer.model").read_bytes() == model


def test_overwrite_and_other_sources(tmp_path):
    """JSONL and Parquet inputs, a glob, max_documents, and overwrite=True replacing a tokenizer."""
    lines = generated_lines(300, seed=1)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": line}) + "\n" for line in lines[:150]))
    pq.write_table(pa.table({"body": lines[150:]}), tmp_path / "b.parquet")
    out = tmp_path / "tok"
    train_tokenizer([tmp_path / "a.jsonl"], out, vocab_size=300, text_field="body")
    train_tokenizer([str(tmp_path / "*.*")], out, vocab_size=350, text_field="body", max_documents=200,
                    overwrite=True)
    tokenizer = Tokenizer.load(out)
    assert tokenizer.vocab_size == 350 and tokenizer.card["documents"] == 200
    assert [Path(s["path"]).name for s in tokenizer.card["sources"]] == ["a.jsonl", "b.parquet"]
    assert tokenizer.decode(tokenizer.encode(lines[-1])) == lines[-1]


def test_a_bad_input_stops_training_with_its_own_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in generated_lines(50)) + "{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 51: not JSON"):
        train_tokenizer([path], tmp_path / "tok", vocab_size=300)
    assert not (tmp_path / "tok").exists()
