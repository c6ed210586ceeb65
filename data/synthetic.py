"""The embedded default corpus: a seeded synthetic source whose entropy is known exactly.

A sequence interleaves an order-``k`` Markov chain over a "text" alphabet with multi-query
associative-recall (MQAR) segments. The layout is fixed, so only the tokens are random:

    unit = [markov_run Markov][k1 v1 ... kP vP][recall_gap Markov][q1 v(q1) ... qQ v(qQ)]

and units repeat until ``seq_len + 1`` tokens are filled (the last one truncated). Because the
source is known, the exact conditional probability of every token given its past is available
(``sample_with_log_probs``), and so is the loss a perfect model reaches (``entropy``): a test can
assert that a model learns by comparing its loss with that floor.

Determinism: sample ``i`` of a split is a pure function of (config, seq_len, split, i). Each sample
draws its uniforms from its own generator seeded by a stable hash; the uniforms are then turned
into tokens vectorized over the batch, so the batch composition never changes a sample.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from stratagem.errors import ConfigValueError

#: Largest dense transition table, in entries: text_vocab ** (order + 1).
MAX_TABLE_ENTRIES = 2**24

# Position kinds of the fixed layout, as small ints; KIND_NAMES gives their report names.
MARKOV, KEY, VALUE, QUERY_KEY, QUERY_VALUE = range(5)
KIND_NAMES = ("markov", "key", "value", "query_key", "query_value")

_POWER_TOLERANCE = 1e-12  # L1 change of pi between iterations at which it counts as converged
_POWER_MAX_ITERATIONS = 100_000


@dataclass
class SyntheticConfig:
    """Parameters of the synthetic source; ``seed`` fixes its transition table.

    The seed defines the source (like the identity of a dataset); it is distinct from the
    training run's seed, which only chooses which sample indices are read.
    """

    seed: int = 1234
    text_vocab: int = 64
    order: int = 2
    branching: int = 4
    zipf: float = 1.0
    smoothing: float = 0.02
    recall_keys: int = 32
    recall_values: int = 32
    recall_pairs: int = 4
    recall_queries: int = 4
    recall_gap: int = 8
    markov_run: int = 32

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + self.recall_keys + self.recall_values

    def validate(self) -> None:
        """Raise ConfigValueError naming the first bad field (key relative to the section)."""
        _require_int("seed", self.seed, minimum=None)
        _require_int("text_vocab", self.text_vocab, minimum=2)
        _require_int("order", self.order, minimum=1)
        # Checked before computing the power so that an absurd order cannot stall validation.
        if self.order >= 24 or self.text_vocab ** (self.order + 1) > MAX_TABLE_ENTRIES:
            raise ConfigValueError(
                "order",
                self.order,
                f"text_vocab ** (order + 1) must be <= 2**24 = {MAX_TABLE_ENTRIES} (the dense "
                f"transition table has text_vocab**order rows of text_vocab = {self.text_vocab})",
            )
        _require_int("branching", self.branching, minimum=1)
        if self.branching > self.text_vocab:
            raise ConfigValueError(
                "branching", self.branching, f"must be <= text_vocab = {self.text_vocab}"
            )
        _require_real("zipf", self.zipf)
        if self.zipf < 0:
            raise ConfigValueError("zipf", self.zipf, "must be >= 0")
        _require_real("smoothing", self.smoothing)
        if not 0 < self.smoothing <= 1:
            raise ConfigValueError(
                "smoothing",
                self.smoothing,
                "must be in (0, 1]: without smoothing the chain can be reducible or periodic "
                "and its stationary distribution, hence its entropy, is not unique",
            )
        _require_int("recall_keys", self.recall_keys, minimum=1)
        _require_int("recall_values", self.recall_values, minimum=1)
        _require_int("recall_pairs", self.recall_pairs, minimum=0)
        if self.recall_pairs > self.recall_keys:
            raise ConfigValueError(
                "recall_pairs",
                self.recall_pairs,
                f"must be <= recall_keys = {self.recall_keys} (keys of a unit are distinct)",
            )
        _require_int("recall_queries", self.recall_queries, minimum=0)
        if self.recall_queries > 0 and self.recall_pairs == 0:
            raise ConfigValueError(
                "recall_queries",
                self.recall_queries,
                "must be 0 when recall_pairs = 0 (a query needs a defined key)",
            )
        _require_int("recall_gap", self.recall_gap, minimum=0)
        _require_int("markov_run", self.markov_run, minimum=0)
        if not _unit_kinds(self):
            raise ConfigValueError(
                "markov_run",
                self.markov_run,
                "the repeating unit is empty: markov_run, recall_gap, recall_pairs and "
                "recall_queries are all 0",
            )


def _unit_kinds(cfg: SyntheticConfig) -> list[int]:
    """Position kinds of one repeating unit of the layout."""
    return (
        [MARKOV] * cfg.markov_run
        + [KEY, VALUE] * cfg.recall_pairs
        + [MARKOV] * cfg.recall_gap
        + [QUERY_KEY, QUERY_VALUE] * cfg.recall_queries
    )


def _require_int(key: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigValueError(key, value, "must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigValueError(key, value, f"must be >= {minimum}")


def _require_real(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigValueError(key, value, "must be a finite number")


@dataclass(frozen=True)
class CorpusEntropy:
    """Exact entropies of a SyntheticCorpus, in nats.

    ``per_target`` is the expected loss of the optimal predictor averaged over the targets
    x_1..x_seq_len (position 0 is never predicted): the floor of a model's training loss.
    ``unigram`` is the entropy of the token distribution pooled over those targets: the loss
    of the best context-free predictor. ``fractions`` maps each position kind to its share of
    the targets.
    """

    markov_rate: float
    per_target: float
    unigram: float
    fractions: dict[str, float]

    def describe(self) -> str:
        def both(nats: float) -> str:
            return f"{nats:.4f} nats ({nats / math.log(2):.4f} bits)"

        shares = ", ".join(f"{kind} {share:.1%}" for kind, share in self.fractions.items() if share)
        return (
            f"synthetic corpus: loss floor {both(self.per_target)} per target token, "
            f"markov rate {both(self.markov_rate)}, unigram {both(self.unigram)}; targets: {shares}"
        )


class SyntheticCorpus:
    """Samples sequences of ``seq_len + 1`` tokens from the source defined by ``cfg``.

    Construction builds the transition table and its stationary distribution (power
    iteration in float64); sampling is then a pure function of (split, index).
    """

    def __init__(self, cfg: SyntheticConfig, seq_len: int):
        cfg.validate()
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.seq_len = seq_len
        length = seq_len + 1

        unit = _unit_kinds(cfg)
        self._n_units = -(-length // len(unit))
        self._kinds = torch.tensor(unit * self._n_units)[:length]
        self._markov_pos = (self._kinds == MARKOV).nonzero().squeeze(1)

        # Recall slots of every unit: [n_units, 2 * pairs + 2 * queries] positions, then the
        # ones that fall inside the sequence (flattened unit-major, as the sampled tokens are).
        definitions = cfg.markov_run + torch.arange(2 * cfg.recall_pairs)
        queries = cfg.markov_run + 2 * cfg.recall_pairs + cfg.recall_gap
        queries = queries + torch.arange(2 * cfg.recall_queries)
        slots = torch.cat([definitions, queries])
        positions = (torch.arange(self._n_units)[:, None] * len(unit) + slots).reshape(-1)
        self._recall_keep = positions < length
        self._recall_pos = positions[self._recall_keep]

        source = _MarkovSource(cfg)
        self._cumulative = source.cumulative
        self._log_tables = source.log_tables
        self._fixed_log_probs = self._recall_log_probs(length)
        self._entropy = self._compute_entropy(source)

    def sample(self, indices: Iterable[int], split: str = "train") -> torch.Tensor:
        """Token ids, LongTensor [len(indices), seq_len + 1]."""
        return self.sample_with_log_probs(indices, split)[0]

    def sample_with_log_probs(
        self, indices: Iterable[int], split: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and the exact log p(x_t | x_<t) of each under the source (float64).

        Column 0 holds log p(x_0), the probability of the first token given nothing.
        """
        uniforms = self._uniforms([int(i) for i in indices], split)
        batch = uniforms.shape[0]
        tokens = torch.empty(batch, self.seq_len + 1, dtype=torch.long)
        log_probs = self._fixed_log_probs.expand(batch, -1).clone()

        n_markov = len(self._markov_pos)
        markov_tokens, markov_log_probs = self._sample_markov(uniforms[:, :n_markov])
        tokens[:, self._markov_pos] = markov_tokens
        log_probs[:, self._markov_pos] = markov_log_probs

        if len(self._recall_pos):
            recall = self._sample_recall(uniforms[:, n_markov:])
            tokens[:, self._recall_pos] = recall[:, self._recall_keep]
        return tokens, log_probs

    def entropy(self) -> CorpusEntropy:
        return self._entropy

    def position_kinds(self) -> torch.Tensor:
        """The kind of each of the ``seq_len + 1`` positions, the same in every sample: LongTensor
        of MARKOV, KEY, VALUE, QUERY_KEY or QUERY_VALUE (names in KIND_NAMES)."""
        return self._kinds.clone()

    # -- sampling ---------------------------------------------------------------------------

    def _uniforms(self, indices: list[int], split: str) -> torch.Tensor:
        """One row of float64 uniforms per sample, from that sample's own generator."""
        cfg = self.cfg
        key_draws = cfg.recall_keys if cfg.recall_pairs else 0
        per_unit = key_draws + cfg.recall_pairs + cfg.recall_queries
        count = len(self._markov_pos) + self._n_units * per_unit
        generators = (_generator("sample", cfg.seed, split, i) for i in indices)
        rows = [torch.rand(count, generator=g, dtype=torch.float64) for g in generators]
        return torch.stack(rows) if rows else torch.empty(0, count, dtype=torch.float64)

    def _sample_markov(self, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse-CDF sampling of the chain, one step per Markov position.

        The state is the base-``text_vocab`` number of the last Markov tokens (most recent
        least significant). The first ``order`` tokens use the prefix tables of pi, so the
        chain is stationary from the start; later ones use the transition table.

        The loop runs in numpy: its many small steps would otherwise enter torch's intra-op
        thread pool, which stalls badly when the cores are busy (as they are while training).
        """
        order, vocab = self.cfg.order, self.cfg.text_vocab
        columns = np.ascontiguousarray(uniforms.numpy().T)  # [steps, batch]
        tokens = np.empty(columns.shape, dtype=np.int64)
        log_probs = np.empty(columns.shape, dtype=np.float64)
        state = np.zeros(columns.shape[1], dtype=np.int64)
        keep = vocab ** (order - 1)  # drops the oldest token of a full state
        for step, u in enumerate(columns):
            table = min(step, order)
            # The sampled token is the number of cumulative probabilities <= u.
            token = (self._cumulative[table][state] <= u[:, None]).sum(axis=1)
            tokens[step] = token
            log_probs[step] = self._log_tables[table][state, token]
            state = (state % keep if table == order else state) * vocab + token
        return torch.from_numpy(tokens.T), torch.from_numpy(log_probs.T)

    def _sample_recall(self, uniforms: torch.Tensor) -> torch.Tensor:
        """Recall tokens of every unit, [batch, n_units * (2 * pairs + 2 * queries)]."""
        cfg = self.cfg
        pairs, queries = cfg.recall_pairs, cfg.recall_queries
        key_base, value_base = cfg.text_vocab, cfg.text_vocab + cfg.recall_keys

        draws = [cfg.recall_keys, pairs, queries]
        per_unit = uniforms.unflatten(1, (self._n_units, sum(draws)))
        key_draws, value_draws, query_draws = per_unit.split(draws, dim=2)
        # The first entries of a uniformly random permutation: distinct keys, uniformly ordered.
        keys = key_draws.argsort(dim=2)[:, :, :pairs]
        values = _uniform_int(value_draws, cfg.recall_values)
        picked = _uniform_int(query_draws, pairs)
        definitions = torch.stack([keys + key_base, values + value_base], dim=3)
        asked = torch.stack(
            [keys.gather(2, picked) + key_base, values.gather(2, picked) + value_base], dim=3
        )
        return torch.cat([definitions.flatten(2), asked.flatten(2)], dim=2).flatten(1)

    # -- exact quantities -------------------------------------------------------------------

    def _recall_log_probs(self, length: int) -> torch.Tensor:
        """log p of every position that is not Markov (0 at Markov positions)."""
        cfg = self.cfg
        key_index = torch.arange(cfg.recall_pairs, dtype=torch.float64)
        definitions = torch.stack(
            [
                -torch.log(cfg.recall_keys - key_index),
                torch.full_like(key_index, -math.log(cfg.recall_values)),
            ],
            dim=1,
        ).reshape(-1)
        asked = torch.tensor(
            [-math.log(cfg.recall_pairs), 0.0] * cfg.recall_queries if cfg.recall_queries else [],
            dtype=torch.float64,
        )
        per_unit = torch.cat([definitions, asked]).repeat(self._n_units)
        log_probs = torch.zeros(length, dtype=torch.float64)
        log_probs[self._recall_pos] = per_unit[self._recall_keep]
        return log_probs

    def _compute_entropy(self, source: _MarkovSource) -> CorpusEntropy:
        cfg = self.cfg
        # Conditional entropy of each position given the full past: Markov tokens depend on
        # the past only through earlier Markov tokens; recall tokens are independent of the chain.
        per_position = -self._fixed_log_probs
        steps = torch.arange(len(self._markov_pos)).clamp(max=cfg.order)
        per_position[self._markov_pos] = source.step_entropies[steps]
        targets = self._kinds[1:]

        counts = torch.bincount(targets, minlength=len(KIND_NAMES)).double()
        fractions = counts / self.seq_len
        # Pooled marginal over targets: every Markov position has pi's one-token marginal;
        # every key or value position is uniform over its alphabet by symmetry.
        key_share = fractions[KEY] + fractions[QUERY_KEY]
        value_share = fractions[VALUE] + fractions[QUERY_VALUE]
        pooled = torch.cat(
            [
                fractions[MARKOV] * source.token_marginal,
                (key_share / cfg.recall_keys).expand(cfg.recall_keys),
                (value_share / cfg.recall_values).expand(cfg.recall_values),
            ]
        )
        return CorpusEntropy(
            markov_rate=float(source.step_entropies[cfg.order]),
            per_target=float(per_position[1:].mean()),
            unigram=float(_entropy(pooled)),
            fractions={name: float(f) for name, f in zip(KIND_NAMES, fractions)},
        )


class _MarkovSource:
    """The order-k chain's tables, derived once from the config.

    ``cumulative[j]`` and ``log_tables[j]`` (numpy float64, rows indexed by the base-V state
    of the previous j tokens) give the law of the (j+1)-th Markov token of a sequence: for
    j < order the conditional of pi's prefix marginals, for j = order the transition table.
    ``step_entropies[j]`` is the entropy of that step given its past: for j = order, the
    entropy rate; the first ``order`` of them sum to H(pi).
    """

    def __init__(self, cfg: SyntheticConfig):
        vocab, order = cfg.text_vocab, cfg.order
        transition = _transition_table(cfg)
        pi = _stationary(transition, vocab, cfg.smoothing)

        tables, weights = [], []
        for j in range(order):
            # Oldest token is the most significant digit: the first j + 1 tokens of a state
            # are its leading digits.
            joint = pi.view(vocab ** (j + 1), -1).sum(dim=1).view(-1, vocab)
            prefix = joint.sum(dim=1)
            tables.append(joint / prefix[:, None])
            weights.append(prefix)
        tables.append(transition)
        weights.append(pi)

        # Normalizing by the last column makes it exactly 1.0, so a uniform in [0, 1) always
        # lands inside the row, and keeps every row non-decreasing.
        cumulative = [t.cumsum(dim=1) for t in tables]
        self.cumulative = [(c / c[:, -1:]).numpy() for c in cumulative]
        self.log_tables = [t.log().numpy() for t in tables]
        self.step_entropies = torch.stack(
            [(w * -(t * t.log()).sum(dim=1)).sum() for t, w in zip(tables, weights)]
        )
        self.token_marginal = tables[0][0]


def _transition_table(cfg: SyntheticConfig) -> torch.Tensor:
    """P[state, next] = (1 - smoothing) * zipf_row + smoothing / text_vocab, float64.

    Each state's row puts Zipf weights 1/i^zipf (i = 1..branching) on ``branching`` distinct
    successors chosen at random; the uniform mixture makes every entry positive, so the chain
    on k-tuples is irreducible and aperiodic.
    """
    vocab, states = cfg.text_vocab, cfg.text_vocab**cfg.order
    draws = torch.rand(states, vocab, generator=_generator("table", cfg.seed), dtype=torch.float64)
    successors = draws.topk(cfg.branching, dim=1).indices
    ranks = torch.arange(1, cfg.branching + 1, dtype=torch.float64)
    zipf = ranks ** -float(cfg.zipf)
    zipf = (1 - cfg.smoothing) * zipf / zipf.sum()
    table = torch.full((states, vocab), cfg.smoothing / vocab, dtype=torch.float64)
    return table.scatter_add_(1, successors, zipf.expand(states, -1).contiguous())


def _stationary(transition: torch.Tensor, vocab: int, smoothing: float) -> torch.Tensor:
    """Stationary distribution over k-tuples by power iteration, float64.

    A state s = (s_1..s_k) moves to (s_2..s_k, y) with probability P[s, y]; in base-V
    numbering that drops the leading digit, so one step is a multiply and a sum over it.
    """
    states = transition.shape[0]
    pi = torch.full((states,), 1.0 / states, dtype=torch.float64)
    for _ in range(_POWER_MAX_ITERATIONS):
        nxt = (pi[:, None] * transition).view(vocab, states // vocab, vocab).sum(dim=0).view(-1)
        nxt /= nxt.sum()
        change = float((nxt - pi).abs().sum())
        pi = nxt
        if change < _POWER_TOLERANCE:
            return pi
    raise ConfigValueError(
        "smoothing",
        smoothing,
        f"the chain mixes too slowly: its stationary distribution did not converge in "
        f"{_POWER_MAX_ITERATIONS} power iterations; increase smoothing",
    )


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p[p > 0]
    return -(p * p.log()).sum()


def _uniform_int(uniforms: torch.Tensor, n: int) -> torch.Tensor:
    """floor(u * n) as int64; the clamp guards against u * n rounding up to n."""
    return (uniforms * n).long().clamp_(max=n - 1)


def _generator(*parts: object) -> torch.Generator:
    """A torch.Generator seeded by a stable hash of ``parts`` (never Python's salted hash())."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
