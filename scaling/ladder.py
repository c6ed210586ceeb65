"""Scaling-law ladders: a sweep of model sizes x compute budgets designed from one base config.

A ladder holds `sizes` shapes of one model family (a flavor, or the base config's model, which is
the smallest rung): width (dim, the feed-forward and expert widths in proportion, heads at the
family's head_dim and grouped-query ratio) and depth (in whole periods of the layer pattern) grow
together so that the non-embedding parameter count N climbs `span` decades in roughly
log-uniform steps. Every compute budget C is spent by several sizes (IsoFLOP): D = C / the
model's training FLOPs per token (`model.counts.count_model`, never 6ND), rounded to whole steps
of `train.global_batch_tokens`; pairs below `min_steps` are dropped and reported.

With the wsd schedule a size trains once: its main run goes to its largest budget and keeps a
checkpoint (`train.keep_steps`) at every branch point; every smaller budget is a decay branch
(`run.init_from`) from that checkpoint, whose wsd decay starts right after it, which is the same
training as a run of its own (tests/test_branch.py). Without branches every pair is a run of its own.

On disk (`write_ladder`): `OUT/ladder.json` (the design) and `OUT/configs/<run>.toml` (one
complete config per run, its run directory `OUT/runs/<run>`); `scaling.sweep` trains them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from stratagem.errors import ConfigError, ConfigValueError
from stratagem.launcher.config import Config, build_config, dump_toml
from stratagem.model.config import ModelConfig
from stratagem.model.counts import count_model, human_count
from stratagem.model.flavors import get_flavor
from stratagem.train.schedule import schedule_phase

VERSION = 1
LADDER_FILE = "ladder.json"
CONFIGS = "configs"
RUNS = "runs"
COUNT_KEYS = ("total_params", "non_embedding_params", "active_params", "train_flops_per_token")
DEPTH_WEIGHT = 0.5  # shapes: how much a depth off the N^(1/3) path costs against an N off its target


@dataclass
class LadderRun:
    name: str
    size: int  # index of the model shape, smallest first
    model: dict  # the shape: overrides of the base config's [model] (dim, n_layers, heads, widths)
    counts: dict  # count_model's COUNT_KEYS for this shape
    budget: float  # the compute budget C (FLOPs) the run stands for
    steps: int
    tokens: int  # steps * train.global_batch_tokens
    flops: float  # tokens * train_flops_per_token: the budget after rounding to whole steps
    decay_fraction: float  # train.decay_fraction
    keep_steps: list[int] = field(default_factory=list)  # a main run's branch points
    branch_of: str = ""  # a decay branch: the main run it starts from ...
    branch_step: int = 0  # ... at this checkpoint, decaying over steps branch_step + 1 .. steps


@dataclass
class Dropped:
    """A (size, budget) pair without a run."""

    size: int
    budget: float
    steps: int
    reason: str


@dataclass
class Ladder:
    family: str  # the flavor name, or the base config's flavor ("" for a [model] without one)
    base: dict  # the base config as a table (Config.to_dict), its model the smallest shape
    sizes: int  # model shapes, indexed 0 (the smallest) .. sizes - 1
    budgets: list[float]
    span: float  # decades of non-embedding N from the smallest to the largest shape
    min_steps: int
    runs: list[LadderRun]  # per size: its main run, then its branches
    dropped: list[Dropped] = field(default_factory=list)

    def run(self, name: str) -> LadderRun:
        for run in self.runs:
            if run.name == name:
                return run
        raise ConfigError(f"run {name!r}: not in the ladder (runs: {', '.join(r.name for r in self.runs)})")

    def runs_of_size(self, size: int) -> list[LadderRun]:
        """The runs of shape `size`, in training order (main run first): one slurm array task."""
        if not 0 <= size < self.sizes:
            raise ConfigValueError("size", size, f"the ladder has sizes 0..{self.sizes - 1}")
        return [run for run in self.runs if run.size == size]

    def config(self, name: str, out_dir: str | Path) -> Config:
        """The complete config of run `name` when the ladder lives in `out_dir`."""
        run, out_dir = self.run(name), Path(out_dir).resolve()
        table = copy.deepcopy(self.base)
        _merge(table["model"], run.model)
        init_from = out_dir / RUNS / run.branch_of / "checkpoints" / f"step-{run.branch_step}" if run.branch_of else ""
        table["run"].update(name=run.name, dir=str(out_dir / RUNS), init_from=str(init_from))
        table["train"].update(steps=run.steps, decay_fraction=run.decay_fraction, keep_steps=run.keep_steps)
        return build_config(table, source=f"ladder {out_dir}, run {name}")

    def table(self) -> str:
        """The runs (and dropped pairs) as a human-readable table."""
        header = ("run", "N non-emb", "N total", "N active", "tokens", "steps", "budget", "FLOPs", "branch of")
        rows = [(r.name, human_count(r.counts["non_embedding_params"]), human_count(r.counts["total_params"]),
                 human_count(r.counts["active_params"]), human_count(r.tokens), str(r.steps),
                 f"{r.budget:.3g}", f"{r.flops:.3g}",
                 f"{r.branch_of} @ {r.branch_step}" if r.branch_of else "") for r in self.runs]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i in (0, 8) else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in [header, *rows]]
        lines.insert(1, "-" * len(lines[0]))
        branches = sum(1 for r in self.runs if r.branch_of)
        lines.insert(0, f"ladder of {self.family or 'the base model'}: {self.sizes} sizes over {self.span:.2f} "
                        f"decades of non-embedding N, {len(self.budgets)} budgets, {len(self.runs)} runs"
                        f"{f' ({branches} decay branches)' if branches else ''}")
        lines += [f"dropped: size {d.size} at {d.budget:.3g} FLOPs: {d.reason}" for d in self.dropped]
        return "\n".join(lines)


def design_ladder(base: Config, budgets: list[float], sizes: int = 5, span: float = 1.5, branches: bool = True,
                  family: str = "", min_steps: int = 0) -> Ladder:
    """Design a ladder of `sizes` shapes of `family` (a flavor name, replacing the base config's
    model; "" = the base config's model) from that model up, spanning `span` decades of non-embedding N, each trained at the compute
    `budgets` (FLOPs) that give it at least `min_steps` steps (0: twice the warmup, and 8 at least).

    With `branches` (needs `train.schedule = "wsd"`) each size's smaller budgets are decay
    branches of its largest; without, every (size, budget) pair is a run of its own.
    """
    _check_request(base, budgets, sizes, span, branches)
    model = get_flavor(family) if family else base.model
    base = dataclasses.replace(base, model=model, flavor=family or base.flavor)
    min_steps = min_steps or max(2 * base.train.warmup_steps, 8)
    shapes = _shapes(model, sizes, span, base.data.seq_len)
    runs, dropped = [], []
    for size, (overrides, counts) in enumerate(shapes):
        pairs = []
        for budget in sorted(budgets):
            steps = round(budget / counts["train_flops_per_token"] / base.train.global_batch_tokens)
            if steps < min_steps:
                dropped.append(Dropped(size, budget, steps, f"{steps} steps, fewer than min_steps = {min_steps}"))
            elif pairs and pairs[-1][1] == steps:
                dropped.append(Dropped(size, budget, steps, f"the same {steps} steps as {pairs[-1][0]:g} FLOPs"))
            else:
                pairs.append((budget, steps))
        if pairs:
            runs += _size_runs(base, size, overrides, counts, pairs, branches)
    if not runs:
        raise ConfigError(f"budgets = {', '.join(f'{b:.3g}' for b in sorted(budgets))}: no (size, budget) pair "
                          f"reaches min_steps = {min_steps} steps of {base.train.global_batch_tokens} tokens; "
                          f"raise the budgets")
    n = [counts["non_embedding_params"] for _, counts in shapes]
    ladder = Ladder(family=base.flavor, base=base.to_dict(), sizes=sizes, budgets=sorted(budgets),
                    span=math.log10(n[-1] / n[0]), min_steps=min_steps, runs=runs, dropped=dropped)
    for run in runs:  # every run's config is valid (a min_steps below the warmup is not), before anything is written
        ladder.config(run.name, Path.cwd())
    return ladder


def _check_request(base: Config, budgets: list[float], sizes: int, span: float, branches: bool) -> None:
    if not budgets:
        raise ConfigValueError("budgets", budgets, "name at least one compute budget (FLOPs)")
    for budget in budgets:
        if not (budget > 0 and math.isfinite(budget)):
            raise ConfigValueError("budgets", budget, "must be a positive number of FLOPs")
    if len({_tag(b) for b in budgets}) < len(budgets):
        raise ConfigValueError("budgets", sorted(budgets), "two budgets agree to 3 significant digits")
    if sizes < 2:
        raise ConfigValueError("sizes", sizes, "a ladder needs at least 2 sizes")
    if not span > 0:
        raise ConfigValueError("span", span, "must be positive (decades of non-embedding parameters)")
    if branches and base.train.schedule != "wsd":
        raise ConfigError(f"train.schedule = {base.train.schedule!r}: decay branches need the wsd schedule; "
                          f"set train.schedule = \"wsd\" or design without branches")


def _shapes(model: ModelConfig, sizes: int, span: float, seq_len: int) -> list[tuple[dict, dict]]:
    """`sizes` shapes (overrides, counts), the first `model`'s own, N growing log-uniformly over `span` decades."""
    smallest = count_model(model, seq_len).non_embedding_params
    shapes = [_shape_near(model, 10 ** (span * i / (sizes - 1)), smallest, seq_len) for i in range(sizes)]
    for (small, _), (large, _) in zip(shapes, shapes[1:]):
        if small == large:
            raise ConfigValueError("sizes", sizes, f"{span} decades hold fewer distinct shapes of this model "
                                   f"(dim steps of {model.head_dim * model.n_heads // model.n_kv_heads}); "
                                   f"use fewer sizes or a wider span")
    return shapes


def _shape_near(model: ModelConfig, growth: float, smallest: int, seq_len: int) -> tuple[dict, dict]:
    """The shape whose non-embedding N is nearest `growth` x `smallest`, depth and width growing together.

    N grows about as depth x width^2, so growth g puts depth near g^(1/3) x the model's; among the
    depths the layer pattern tiles, each with its nearest width, the pick minimises the distance
    (in log) to the target N plus DEPTH_WEIGHT x the distance to that depth: widths come in steps of
    a whole grouped-query head group, too coarse in small models to reach every N at one depth.
    """
    target, depth = smallest * growth, model.n_layers * growth ** (1 / 3)
    best, best_cost = None, math.inf
    for n_layers in range(max(1, math.floor(depth / 2)), 2 * math.ceil(depth) + 1):
        if _valid(dataclasses.replace(model, n_layers=n_layers)):
            shape = _width_near(model, n_layers, target, seq_len)
            cost = abs(math.log(shape[1]["non_embedding_params"] / target)) + DEPTH_WEIGHT * abs(math.log(n_layers / depth))
            if cost < best_cost:
                best, best_cost = shape, cost
    return best


def _width_near(model: ModelConfig, depth: int, target: float, seq_len: int) -> tuple[dict, dict]:
    """At `depth`, the width (heads of the model's head_dim, a multiple of its grouped-query ratio)
    whose non-embedding N comes closest to `target` (in ratio)."""
    group = model.n_heads // model.n_kv_heads
    best = None
    heads = group
    while True:
        overrides = _scaled(model, depth, heads)
        shaped = _apply(model, overrides)
        if _valid(shaped):
            counts = count_model(shaped, seq_len)
            n = counts.non_embedding_params
            if best is None or abs(math.log(n / target)) < abs(math.log(best[1]["non_embedding_params"] / target)):
                best = (overrides, {key: getattr(counts, key) for key in COUNT_KEYS})
            if n >= target:
                return best
        heads += group


def _scaled(model: ModelConfig, depth: int, heads: int) -> dict:
    """The shape overrides of `model` at `depth` layers and `heads` heads, widths in proportion to dim."""
    dim = model.head_dim * heads
    overrides = {"dim": dim, "n_layers": depth, "n_heads": heads, "n_kv_heads": heads * model.n_kv_heads // model.n_heads,
                 "ffn_hidden": round(model.ffn_hidden * dim / model.dim)}
    if model.moe.expert_hidden:
        overrides["moe"] = {"expert_hidden": round(model.moe.expert_hidden * dim / model.dim)}
    return overrides


def _apply(model: ModelConfig, overrides: dict) -> ModelConfig:
    moe = dataclasses.replace(model.moe, **overrides.get("moe", {}))
    return dataclasses.replace(model, **{k: v for k, v in overrides.items() if k != "moe"}, moe=moe)


def _valid(model: ModelConfig) -> bool:
    try:
        model.validate()
    except ConfigValueError:
        return False
    return True


def _size_runs(base: Config, size: int, overrides: dict, counts: dict, pairs: list[tuple[float, int]],
               branches: bool) -> list[LadderRun]:
    """The runs of one size for its (budget, steps) pairs, fewest steps first: with `branches` the
    largest budget's main run first, then the others as its decay branches; else one run each."""
    tc = base.train

    def run(budget: float, steps: int, decay_fraction: float = tc.decay_fraction, **branch) -> LadderRun:
        tokens = steps * tc.global_batch_tokens
        return LadderRun(name=f"s{size}-{_tag(budget)}", size=size, model=overrides, counts=counts, budget=budget,
                         steps=steps, tokens=tokens, flops=float(tokens * counts["train_flops_per_token"]),
                         decay_fraction=decay_fraction, **branch)

    if not branches:
        return [run(budget, steps) for budget, steps in pairs]
    main = run(*pairs[-1])
    decays = []
    for budget, steps in pairs[:-1]:
        decay_steps = max(round(tc.decay_fraction * steps), 1)
        decays.append(run(budget, steps, decay_steps / steps, branch_of=main.name, branch_step=steps - decay_steps))
    main.keep_steps = sorted({branch.branch_step for branch in decays})
    for branch in decays:
        _check_branch(tc, main, branch)
    return [main, *decays]


def _check_branch(tc, main: LadderRun, branch: LadderRun) -> None:
    """The branch's schedule must equal the main run's up to the branch point and decay right after
    it: the branch point lies past the warmup, in the main run's stable phase, where the branch's
    own decay begins (phases are of 0-based steps: step s + 1 trains at `schedule_phase(s)`)."""
    b = branch.branch_step
    main_tc = dataclasses.replace(tc, steps=main.steps, decay_fraction=main.decay_fraction)
    branch_tc = dataclasses.replace(tc, steps=branch.steps, decay_fraction=branch.decay_fraction)
    if not (schedule_phase(main_tc, b - 1) == schedule_phase(branch_tc, b - 1) == "stable"
            and schedule_phase(branch_tc, b) == "decay"):
        raise ConfigError(f"budget {branch.budget:g} FLOPs, size {branch.size}: its decay branch would start at "
                          f"step {b}, which must lie past the warmup ({tc.warmup_steps} steps) and within the "
                          f"stable phase of {main.name} ({main.steps} steps, decay_fraction {main.decay_fraction}); "
                          f"lower train.decay_fraction or train.warmup_steps, or raise the budget")


def _tag(budget: float) -> str:
    """A budget in run names, to 3 significant digits: 3e12 -> '3e12', 2.5e11 -> '2.5e11'."""
    mantissa, _, exponent = f"{budget:.2e}".partition("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _merge(table: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict):
            _merge(table.setdefault(key, {}), value)
        else:
            table[key] = value


def _ladder_json(ladder: Ladder) -> str:
    return json.dumps({"version": VERSION, **dataclasses.asdict(ladder)}, indent=1)


def write_ladder(ladder: Ladder, out_dir: str | Path) -> Path:
    """Write OUT/ladder.json and OUT/configs/<run>.toml; returns OUT/ladder.json. A folder holding
    another ladder is refused; writing the same ladder again rewrites its configs."""
    out_dir = Path(out_dir).resolve()
    path, text = out_dir / LADDER_FILE, _ladder_json(ladder)
    if path.exists() and path.read_text() != text:
        raise ConfigError(f"{path}: holds another ladder; choose another folder or delete it")
    configs = {run.name: dump_toml(ladder.config(run.name, out_dir).to_dict()) for run in ladder.runs}
    (out_dir / CONFIGS).mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        (out_dir / CONFIGS / f"{name}.toml").write_text(config)
    path.write_text(text)
    return path


def load_ladder(out_dir: str | Path) -> Ladder:
    path = Path(out_dir) / LADDER_FILE
    try:
        table = json.loads(path.read_text())
        if table.pop("version", None) != VERSION:
            raise ValueError(f"not a version {VERSION} ladder")
        table["runs"] = [LadderRun(**run) for run in table["runs"]]
        table["dropped"] = [Dropped(**pair) for pair in table["dropped"]]
        return Ladder(**table)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the ladder ({err.strerror}); design one first") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a ladder ({err})") from None


def config_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / CONFIGS / f"{name}.toml"
