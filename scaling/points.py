"""The points a scaling law is fitted to: one per evaluation of a run, or one per row of a table.

From run directories (what `stratagem train` writes) every evaluation point of every run is a
point, not only the final one: tokens seen D, compute C = the model's own training FLOPs per
token x D (model_counts.json, never 6ND re-derived), the three parameter counts N (total,
non-embedding, active per token), the schedule phase of that step, the model family (dense,
moe, hybrid, hybrid-moe, linear) and the tokenizer's identity. From tables (CSV or JSONL) the
columns `params`, `tokens`, `loss` and optionally `flops` (else 6ND), `run`, `family`, `weight`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from stratagem.errors import StratagemError

PARAM_KINDS = ("total", "non_embedding", "active")
LOSS_KINDS = ("eval_loss", "loss")
TABLE_COLUMNS = ("params", "tokens", "loss")
LINEAR_MIXERS = ("gla", "deltanet", "gated_deltanet")


class ScalingInputError(StratagemError):
    """Runs or a table that cannot be fitted: named file, run, row or column and what is wrong."""


@dataclass(frozen=True)
class Point:
    run: str
    step: int  # 0 for table rows
    tokens: float  # D
    flops: float  # C, training FLOPs spent up to this point
    loss: float
    params: dict[str, float]  # N by kind: total, non_embedding, active
    phase: str = ""  # warmup | stable | decay ("" for table rows)
    final: bool = True  # the run's last point
    family: str = ""
    tokenizer: str = ""
    weight: float = 1.0

    def n(self, kind: str) -> float:
        return self.params[kind]


@dataclass
class RunInfo:
    """What the report says about one run directory beyond its points."""

    name: str
    entropy: float | None  # the synthetic corpus's exact loss floor (nats/token), None for real data


def model_family(mixers: Iterable[str], ffns: Iterable[str]) -> str:
    """dense | moe | linear | hybrid | hybrid-moe: the groups fitted separately and compared."""
    mixers, moe = set(mixers), "moe" in set(ffns)
    linear = mixers & set(LINEAR_MIXERS)
    if linear and mixers - linear:
        base = "hybrid"
    elif linear:
        base = "linear"
    else:
        base = "dense"
    if moe:
        return "moe" if base == "dense" else f"{base}-moe"
    return base


def load_runs(run_dirs: Iterable[str | Path], loss: str = "eval_loss") -> tuple[list[Point], list[RunInfo]]:
    """Every point of every run directory (a directory holding runs is searched one level down)."""
    if loss not in LOSS_KINDS:
        raise ScalingInputError(f"loss {loss!r}: must be one of {', '.join(LOSS_KINDS)}")
    points: list[Point] = []
    runs: list[RunInfo] = []
    for run_dir in _expand(run_dirs):
        run_points, info = _load_run(run_dir, loss)
        points += run_points
        runs.append(info)
    if not points:
        raise ScalingInputError(f"{', '.join(map(str, run_dirs))}: no run has a {loss} point")
    return points, runs


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    found = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            found.append(path)
        elif path.is_dir() and (children := sorted(p.parent for p in path.glob("*/metrics.jsonl"))):
            found += children
        else:
            raise ScalingInputError(f"{path}: not a run directory (no metrics.jsonl) nor a folder of runs")
    return found


def _load_run(run_dir: Path, loss: str) -> tuple[list[Point], RunInfo]:
    from stratagem.launcher.config import load_config

    counts_file, config_file = run_dir / "model_counts.json", run_dir / "config.toml"
    for needed in (counts_file, config_file):
        if not needed.is_file():
            raise ScalingInputError(f"{needed}: missing; a run directory written by stratagem train has it")
    try:
        counts = json.loads(counts_file.read_text())
    except json.JSONDecodeError as err:
        raise ScalingInputError(f"{counts_file}: not JSON: {err}") from None
    config = load_config(str(config_file))
    specs = config.model.layer_specs()
    family = model_family((spec.mixer for spec in specs), (spec.ffn for spec in specs))
    tokenizer, entropy = _data_identity(config)
    params = {kind: float(counts[f"{kind}_params"]) for kind in PARAM_KINDS}
    rows = _read_metrics(run_dir / "metrics.jsonl")
    points = []
    for row in rows:
        value = row.get(loss)
        if value is None:
            continue
        points.append(Point(run=run_dir.name, step=int(row["step"]), tokens=float(row["tokens"]),
                            flops=float(counts["train_flops_per_token"]) * float(row["tokens"]),
                            loss=float(value), params=params, phase=row.get("phase", ""), final=False,
                            family=family, tokenizer=tokenizer))
    if points:
        points[-1] = dataclasses.replace(points[-1], final=True)
    return points, RunInfo(run_dir.name, entropy)


def _read_metrics(path: Path) -> list[dict]:
    """The metrics lines, a resumed run's repeated steps keeping their last occurrence."""
    by_step: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_step[int(row["step"])] = {**by_step.get(int(row["step"]), {}), **row}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ScalingInputError(f"{path}:{number}: not a metrics line with a step") from None
    return [by_step[s] for s in sorted(by_step)]


def _data_identity(config) -> tuple[str, float | None]:
    """The tokenizer's identity (its card's model hash) and, for the synthetic corpus, its entropy."""
    from stratagem.data.export import corpus_card
    from stratagem.data.streaming import check_streams
    from stratagem.data.synthetic import SyntheticCorpus

    synthetic = corpus_card(config.data.synthetic)
    if config.data.kind == "synthetic":
        card = synthetic
    else:
        card = check_streams(config.data.mds.streams, config.data.seq_len)
    entropy = None
    if card.get("model_sha256") == synthetic["model_sha256"]:
        entropy = SyntheticCorpus(config.data.synthetic, config.data.seq_len).entropy().per_target
    return str(card.get("model_sha256", "")), entropy


def load_table(path: str | Path) -> list[Point]:
    """Points from a CSV or JSONL table with columns params, tokens, loss (flops, run, family, weight optional)."""
    path = Path(path)
    if not path.is_file():
        raise ScalingInputError(f"{path}: no such table")
    text = path.read_text()
    if path.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ScalingInputError(f"{path}: not JSON lines: {err}") from None
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise ScalingInputError(f"{path}: the table has no rows")
    missing = [c for c in TABLE_COLUMNS if c not in rows[0]]
    if missing:
        raise ScalingInputError(f"{path}: missing column {missing[0]!r} (needs {', '.join(TABLE_COLUMNS)})")
    points = []
    for number, row in enumerate(rows, 1):
        where = f"{path}: row {number}"
        n, d, loss = (_number(row, c, where) for c in TABLE_COLUMNS)
        flops = _number(row, "flops", where) if row.get("flops") not in (None, "") else 6 * n * d
        weight = _number(row, "weight", where) if row.get("weight") not in (None, "") else 1.0
        points.append(Point(run=str(row.get("run") or f"row{number}"), step=0, tokens=d, flops=flops, loss=loss,
                            params={kind: n for kind in PARAM_KINDS}, family=str(row.get("family") or ""),
                            weight=weight))
    return points


def _number(row: dict, column: str, where: str) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError):
        raise ScalingInputError(f"{where}: {column} = {row[column]!r} is not a number") from None


def select(points: list[Point], *, phase: str | None = None, final_only: bool = False,
           decay_ends: bool = False) -> list[Point]:
    """Filter points: one schedule phase, only each run's last point, only the ends of decay phases
    (the last point of a run whose last point is in decay: a finished cosine or WSD decay)."""
    kept = points
    if phase is not None:
        kept = [p for p in kept if p.phase == phase]
    if final_only:
        kept = [p for p in kept if p.final]
    if decay_ends:
        kept = [p for p in kept if p.final and p.phase == "decay"]
    return kept


def check_points(points: list[Point], free_parameters: int, mix_tokenizers: bool = False) -> None:
    """Refuse what cannot be fitted, one line each: too few points, non-positive or NaN values,
    points from different tokenizers (whose losses are not comparable) unless allowed."""
    if len(points) <= free_parameters:
        raise ScalingInputError(f"{len(points)} points for {free_parameters} free parameters: "
                                f"a fit needs more points than parameters")
    for p in points:
        where = f"run {p.run}" + (f" step {p.step}" if p.step else "")
        for name, value in (("loss", p.loss), ("tokens", p.tokens), *((f"{k} params", v) for k, v in p.params.items()),
                            ("flops", p.flops), ("weight", p.weight)):
            if not math.isfinite(value) or value <= 0:
                raise ScalingInputError(f"{where}: {name} = {value!r}: must be a positive, finite number")
    tokenizers = sorted({p.tokenizer for p in points})
    if len(tokenizers) > 1 and not mix_tokenizers:
        runs = {t: next(p.run for p in points if p.tokenizer == t) for t in tokenizers}
        raise ScalingInputError(
            "runs use different tokenizers (" + ", ".join(f"{r}: {t[:12] or 'none'}" for t, r in runs.items())
            + "): their losses are not comparable; pass --mix-tokenizers to fit them together anyway")


@dataclass
class Arrays:
    """Points as the arrays a fit works on."""

    n: np.ndarray
    d: np.ndarray
    c: np.ndarray
    loss: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, index: np.ndarray) -> Arrays:
        return Arrays(self.n[index], self.d[index], self.c[index], self.loss[index], self.weight[index])


def as_arrays(points: list[Point], params: str = "non_embedding") -> Arrays:
    if params not in PARAM_KINDS:
        raise ScalingInputError(f"params {params!r}: must be one of {', '.join(PARAM_KINDS)}")
    return Arrays(n=np.array([p.n(params) for p in points]), d=np.array([p.tokens for p in points]),
                  c=np.array([p.flops for p in points]), loss=np.array([p.loss for p in points]),
                  weight=np.array([p.weight for p in points]))


def fingerprint(points: list[Point]) -> str:
    """A short hash of the fitted data, for the report."""
    rows = sorted((p.run, p.step, p.tokens, p.loss) for p in points)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]
