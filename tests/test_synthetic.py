"""The synthetic corpus: exact entropies against empirical estimates, layout, determinism."""

import math

import pytest
import torch

from stratagem.data.synthetic import CorpusEntropy, SyntheticConfig, SyntheticCorpus
from stratagem.errors import ConfigValueError

SEQ_LEN = 128


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return SyntheticCorpus(SyntheticConfig(), SEQ_LEN)


def expected_kinds(cfg: SyntheticConfig, length: int) -> list[str]:
    """The layout written out from its definition, independently of the module."""
    unit = (
        ["markov"] * cfg.markov_run
        + ["key", "value"] * cfg.recall_pairs
        + ["markov"] * cfg.recall_gap
        + ["query_key", "query_value"] * cfg.recall_queries
    )
    return (unit * (length // len(unit) + 1))[:length]


def units(cfg: SyntheticConfig, length: int) -> list[tuple[list[int], list[int]]]:
    """Per unit: positions of its definition pairs and of its query pairs (truncated)."""
    unit_len = cfg.markov_run + 2 * cfg.recall_pairs + cfg.recall_gap + 2 * cfg.recall_queries
    out = []
    for start in range(0, length, unit_len):
        defs = start + cfg.markov_run
        queries = defs + 2 * cfg.recall_pairs + cfg.recall_gap
        out.append(
            (
                [p for p in range(defs, defs + 2 * cfg.recall_pairs) if p < length],
                [p for p in range(queries, queries + 2 * cfg.recall_queries) if p < length],
            )
        )
    return out


def standard_error(per_sequence: torch.Tensor) -> float:
    """Standard error of the mean of i.i.d. per-sequence statistics."""
    return float(per_sequence.std() / math.sqrt(len(per_sequence)))


def plug_in_entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


# 1. Reported entropies against empirical estimates.


def test_mean_log_prob_matches_per_target(corpus):
    _, log_probs = corpus.sample_with_log_probs(range(2000), split="eval")
    per_sequence = -log_probs[:, 1:].mean(dim=1)  # sequences are i.i.d.
    tolerance = 4 * standard_error(per_sequence)
    assert tolerance < 0.02
    assert abs(float(per_sequence.mean()) - corpus.entropy().per_target) < tolerance


@pytest.mark.parametrize(
    "text_vocab,order,branching", [(16, 1, 5), (8, 2, 3), (5, 3, 2)]
)
def test_plug_in_markov_entropy_matches_markov_rate(text_vocab, order, branching):
    """H(X_t | previous k tokens) from k-gram counts over a pure-Markov stream."""
    cfg = SyntheticConfig(
        text_vocab=text_vocab,
        order=order,
        branching=branching,
        smoothing=0.1,
        recall_pairs=0,
        recall_queries=0,
    )
    corpus = SyntheticCorpus(cfg, seq_len=511)
    tokens, log_probs = corpus.sample_with_log_probs(range(1000))
    windows = tokens.unfold(1, order + 1, 1).reshape(-1, order + 1)
    digits = text_vocab ** torch.arange(order, -1, -1)
    grams = (windows * digits).sum(dim=1)
    full = torch.bincount(grams, minlength=text_vocab ** (order + 1))
    contexts = torch.bincount(grams // text_vocab, minlength=text_vocab**order)
    estimate = plug_in_entropy(full) - plug_in_entropy(contexts)

    # First-order error of the plug-in estimate is the mean of -log p(x_t | context) - H,
    # whose spread over i.i.d. sequences gives the standard error; its bias is about
    # -(cells - contexts) / (2 N).
    per_sequence = -log_probs[:, order:].mean(dim=1)
    bias = (len(full) - len(contexts)) / (2 * len(grams))
    tolerance = 4 * standard_error(per_sequence) + bias
    assert abs(estimate - corpus.entropy().markov_rate) < tolerance


def test_empirical_unigram_entropy_matches_unigram(corpus):
    tokens = corpus.sample(range(2000), split="eval")[:, 1:]
    counts = torch.bincount(tokens.reshape(-1), minlength=corpus.vocab_size)
    estimate = plug_in_entropy(counts)
    # As for the Markov estimate: the first-order error is the mean of -log q(x_t) - H.
    surprisal = -(counts.double() / counts.sum()).log()
    per_sequence = surprisal[tokens].mean(dim=1)
    bias = (corpus.vocab_size - 1) / (2 * tokens.numel())
    tolerance = 4 * standard_error(per_sequence) + bias
    assert abs(estimate - corpus.entropy().unigram) < tolerance


# 2. Recall values are determined by the context.


@pytest.mark.parametrize(
    "cfg,seq_len",
    [
        (SyntheticConfig(), SEQ_LEN),
        (SyntheticConfig(recall_pairs=3, recall_queries=6, markov_run=5, recall_gap=2), 61),
    ],
)
def test_query_values_equal_defined_values(cfg, seq_len):
    tokens = SyntheticCorpus(cfg, seq_len).sample(range(64)).tolist()
    queries_seen = 0
    for seq in tokens:
        for defs, queries in units(cfg, seq_len + 1):
            defined = {seq[defs[i]]: seq[defs[i + 1]] for i in range(0, len(defs) - 1, 2)}
            keys = [seq[p] for p in defs[0::2]]
            assert len(set(keys)) == len(keys), "keys of one unit must be distinct"
            for i in range(0, len(queries) - 1, 2):
                key, value = seq[queries[i]], seq[queries[i + 1]]
                assert defined[key] == value
                queries_seen += 1
    assert queries_seen > 0


# 3. Determinism.


def test_sample_depends_only_on_index_and_split(corpus):
    batch = corpus.sample([3, 17, 5, 40])
    assert torch.equal(batch[1], corpus.sample([17])[0])
    assert torch.equal(batch, corpus.sample([40, 5, 17, 3]).flip(0))
    assert torch.equal(corpus.sample(range(8))[5], corpus.sample([5])[0])
    tokens, _ = corpus.sample_with_log_probs([3, 17, 5, 40])
    assert torch.equal(tokens, batch)
    assert torch.equal(batch, SyntheticCorpus(SyntheticConfig(), SEQ_LEN).sample([3, 17, 5, 40]))


def test_splits_and_seeds_give_different_streams(corpus):
    train = corpus.sample(range(4), split="train")
    assert not torch.equal(train, corpus.sample(range(4), split="eval"))
    assert not torch.equal(train, corpus.sample(range(1, 5), split="train"))
    other = SyntheticCorpus(SyntheticConfig(seed=99), SEQ_LEN)
    assert not torch.equal(train, other.sample(range(4), split="train"))
    assert other.entropy() != corpus.entropy()


# 4. Token ids and layout.


@pytest.mark.parametrize(
    "cfg,seq_len",
    [
        (SyntheticConfig(), SEQ_LEN),
        (SyntheticConfig(order=3, text_vocab=10, markov_run=1, recall_pairs=2, recall_gap=0), 40),
        (SyntheticConfig(recall_pairs=0, recall_queries=0), 20),
    ],
)
def test_token_ids_and_layout(cfg, seq_len):
    corpus = SyntheticCorpus(cfg, seq_len)
    tokens = corpus.sample(range(32))
    assert tokens.dtype == torch.long and tokens.shape == (32, seq_len + 1)
    assert corpus.vocab_size == cfg.text_vocab + cfg.recall_keys + cfg.recall_values
    keys_end = cfg.text_vocab + cfg.recall_keys
    ranges = {
        "markov": (0, cfg.text_vocab),
        "key": (cfg.text_vocab, keys_end),
        "query_key": (cfg.text_vocab, keys_end),
        "value": (keys_end, corpus.vocab_size),
        "query_value": (keys_end, corpus.vocab_size),
    }
    for position, kind in enumerate(expected_kinds(cfg, seq_len + 1)):
        low, high = ranges[kind]
        column = tokens[:, position]
        assert bool(((column >= low) & (column < high)).all()), (position, kind)


# 5. Validation names the key.


@pytest.mark.parametrize(
    "key,value",
    [
        ("seed", "1234"),
        ("text_vocab", 1),
        ("order", 0),
        ("order", 4),  # 64 ** 5 > 2 ** 24
        ("branching", 0),
        ("branching", 100),
        ("zipf", -1.0),
        ("zipf", float("nan")),
        ("smoothing", 0.0),
        ("smoothing", 1.5),
        ("recall_keys", 0),
        ("recall_values", 2.5),
        ("recall_pairs", 33),
        ("recall_queries", -1),
        ("recall_gap", -2),
        ("markov_run", True),
    ],
)
def test_validate_names_the_key(key, value):
    cfg = SyntheticConfig(**{key: value})
    with pytest.raises(ConfigValueError) as error:
        cfg.validate()
    assert error.value.key == key and key in str(error.value)
    with pytest.raises(ConfigValueError):
        SyntheticCorpus(cfg, SEQ_LEN)


def test_validate_cross_field_rules():
    error = pytest.raises(ConfigValueError, SyntheticConfig(branching=100).validate).value
    assert str(error) == "branching = 100: must be <= text_vocab = 64"
    error = pytest.raises(ConfigValueError, SyntheticConfig(recall_pairs=0).validate).value
    assert error.key == "recall_queries"
    empty = SyntheticConfig(markov_run=0, recall_gap=0, recall_pairs=0, recall_queries=0)
    assert pytest.raises(ConfigValueError, empty.validate).value.key == "markov_run"
    SyntheticConfig(recall_pairs=0, recall_queries=0).validate()


# 6. The floor: below the unigram entropy and reached by a perfect predictor.


def test_perfect_predictor_reaches_floor_below_unigram(corpus):
    entropy = corpus.entropy()
    assert isinstance(entropy, CorpusEntropy)
    assert entropy.per_target < entropy.unigram
    assert entropy.markov_rate < math.log(corpus.cfg.text_vocab)
    assert math.isclose(sum(entropy.fractions.values()), 1.0)

    # The source's own conditionals (a perfect predictor) reach per_target; the best
    # context-free predictor, fitted on train and scored on eval, only reaches the unigram.
    fit = corpus.sample(range(2000), split="train")[:, 1:].reshape(-1)
    unigram_model = torch.bincount(fit, minlength=corpus.vocab_size).double() + 1
    unigram_model = (unigram_model / unigram_model.sum()).log()
    tokens, log_probs = corpus.sample_with_log_probs(range(500), split="eval")
    perfect_loss = float(-log_probs[:, 1:].mean())
    unigram_loss = float(-unigram_model[tokens[:, 1:]].mean())
    assert abs(perfect_loss - entropy.per_target) < 0.05
    assert abs(unigram_loss - entropy.unigram) < 0.05
    assert perfect_loss < unigram_loss - 2

    line = entropy.describe()
    assert "\n" not in line and "nats" in line and "bits" in line


def test_closed_form_entropy_of_uniform_chain():
    """A uniform chain (every successor, zipf 0): every per-position term is known by hand."""
    cfg = SyntheticConfig(text_vocab=8, order=2, branching=8, zipf=0.0, recall_queries=3)
    seq_len = 100
    entropy = SyntheticCorpus(cfg, seq_len).entropy()
    kinds = expected_kinds(cfg, seq_len + 1)
    per_position = []
    keys_in_unit = 0  # keys already defined in the current definition block
    for kind in kinds:
        keys_in_unit = 0 if kind == "markov" else keys_in_unit
        per_position.append(
            {
                "markov": math.log(cfg.text_vocab),
                "key": math.log(cfg.recall_keys - keys_in_unit),
                "value": math.log(cfg.recall_values),
                "query_key": math.log(cfg.recall_pairs),
                "query_value": 0.0,
            }[kind]
        )
        keys_in_unit += kind == "key"
    targets = kinds[1:]
    share = {kind: targets.count(kind) / seq_len for kind in set(kinds)}
    pooled = (
        [share["markov"] / cfg.text_vocab] * cfg.text_vocab
        + [(share["key"] + share["query_key"]) / cfg.recall_keys] * cfg.recall_keys
        + [(share["value"] + share["query_value"]) / cfg.recall_values] * cfg.recall_values
    )
    assert math.isclose(entropy.markov_rate, math.log(8), rel_tol=1e-12)
    assert math.isclose(entropy.per_target, sum(per_position[1:]) / seq_len, rel_tol=1e-12)
    assert math.isclose(entropy.unigram, -sum(p * math.log(p) for p in pooled), rel_tol=1e-12)
    assert entropy.fractions == pytest.approx(share)
