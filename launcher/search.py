"""The planner's search: the fastest plan that fits, per layer, under the cost model (`launcher.cost`).

The space, for a model, a world of W ranks and a global batch of G sequences:

- a pipeline: degree p (dividing W, at most the layer count), a schedule with its virtual stages
  v (1 for GPipe and 1F1B; 2 or 4 for interleaved 1F1B and zero-bubble), micro-batches of b
  sequences, m = G / b of them, as the plan rules allow (`Plan.validate`);
- one layout shared by the embedding and the head (a tied model needs it; it keeps the space
  small): a tensor degree and a dp kind;
- stage boundaries: any cut of the layers into p v non-empty contiguous chunks;
- per layer: a tensor degree (dividing the stage size S = W / p and what `TP_SHARDS` names, at
  most a node's devices), a dp kind, checkpointing or not, and for MoE layers an expert degree
  (dividing S / tp and the expert count; tp 1), such that the dp degree S / tp divides b.

The cost model's step time is the lock-step pipeline time: K x the slowest chunk's micro-batch
time plus v x its optimizer time, K = m v + (p - 1) beta (`cost.step_seconds`); a plan fits when
every chunk needs at most 1 / v of a device (`cost.predict`). So for fixed pipeline settings the
best plan minimises the largest chunk objective, and:

1. *Inside a chunk* (`ChunkFrontier`): a dynamic program over its layers whose state is the last
   layer's tensor degree (the relayout to the next layer depends on it) and whose values are the
   Pareto frontier of partial assignments over (objective, state bytes, activation bytes per
   in-flight micro-batch, transient bytes). Dominated partial assignments can never complete to
   a better plan, so the frontier is exact; a chunk's best objective under the memory budget is
   a scan of the frontier with its in-flight count.
2. *Stage boundaries* (`_partition`): a dynamic program over chunks, f[c][j][t] = the least
   largest objective of chunks 0..c-1 covering layers [0, j) with layer j - 1 at degree t.
3. *Pipeline settings*: every combination, visited in the order of a lower bound (K x the
   cheapest time of every layer spread evenly over the chunks, no memory limit); a combination
   whose bound cannot beat the best plan so far is skipped.

Frontiers depend only on the layer types from a chunk's first layer on, so chunks starting at the
same place of a periodic layer pattern share them.

Beside the per-layer plans of this runtime (engine "native") the space holds whole-model DeepSpeed
plans (`deepspeed_plans`: ZeRO stages 1-3, with and without optimizer offload, stage 3 also with
parameter offload and split updates, every micro-batch size, checkpointing everywhere or nowhere),
each costed in full by `cost.predict`. The fastest that fits wins, native on a tie; `SearchResult.reason`
says why the engine was chosen (``Space.engines`` leaves either kind out).
"""

from __future__ import annotations

import math
import time

import numpy as np
from dataclasses import dataclass, replace

from stratagem.errors import ConfigError
from stratagem.model.counts import human_bytes
from stratagem.launcher.cost import (UnitLayout, Workload, balanced_offload_ratio, in_flight, p2p_seconds, predict,
                                     relayout_seconds, schedule_factor, unit_cost, units)
from stratagem.parallel.plan import (DP_KINDS, ENGINES, EP_SHARDS, TP_SHARDS, ZERO_STAGES, Engine, LayerLayout, Layout,
                                     Pipeline, Plan, PlanError, Predicted, deepspeed_plan, describe, engine_summary,
                                     even_stages)

FRONTIER_POINTS = 128  # beyond this many points a frontier keeps the fastest per 1/128 of the memory budget
VIRTUAL_STAGES = {"gpipe": (1,), "1f1b": (1,), "interleaved_1f1b": (2, 4), "zero_bubble": (2, 4)}
OFFLOAD_RATIOS = (0.25, 0.5, 0.75, 1.0)  # host shares of a split update tried, beside the balanced one


@dataclass(frozen=True)
class Space:
    """Which choices the search may make (all of them by default); tests narrow it to brute-force it."""

    dp_kinds: tuple[str, ...] = DP_KINDS
    tps: tuple[int, ...] | None = None  # tensor degrees of the layers (None: every one that divides)
    checkpoints: tuple[bool, ...] = (False, True)
    schedules: tuple[str, ...] = tuple(VIRTUAL_STAGES)
    max_pp: int | None = None
    micro_batch_multiple: int = 1  # micro-batch sizes must be multiples of it (streamed data: the world size)
    engines: tuple[str, ...] = ENGINES  # native: per-layer plans of this runtime; deepspeed: DeepSpeed's ZeRO


@dataclass(frozen=True)
class Settings:
    """The pipeline settings and the embedding/head layout of one point of the search."""

    pp: int
    schedule: str
    virtual: int
    micro_batch: int
    micro_batches: int
    ends: UnitLayout

    @property
    def chunks(self) -> int:
        return self.pp * self.virtual


@dataclass
class SearchResult:
    plan: Plan  # the chosen plan: the best per-layer native plan or the best DeepSpeed plan
    prediction: object  # cost.Prediction
    uniform_plan: Plan | None  # the best native plan giving every layer the same layout
    uniform_prediction: object | None
    seconds: float  # the search's own wall time
    visited: int  # pipeline settings costed in full
    native_prediction: object | None = None  # the best per-layer native plan's, None if none fits
    deepspeed_plan: Plan | None = None  # the best DeepSpeed plan, None if none fits
    deepspeed_prediction: object | None = None
    reason: str = ""  # why the chosen plan's engine

    def report(self, hw, specs) -> str:
        """The plan's per-layer table, then the predictions of the best plan of each engine and the
        best uniform one, and why the chosen engine."""

        def line(name: str, prediction) -> str:
            mfu = f", MFU {prediction.mfu:.1%}" if prediction.mfu is not None else ""
            host = f", {human_bytes(prediction.host_bytes)} on the host" if prediction.host_bytes else ""
            return (f"{name:9s} {prediction.step_seconds * 1000:10.1f} ms/step  {prediction.tokens_per_second:12,.0f} "
                    f"tokens/s{mfu}, peak {human_bytes(max(prediction.memory_per_rank))} per rank "
                    f"of {human_bytes(hw.memory)}{host}")

        lines = [describe(self.plan, specs), ""]
        if self.native_prediction is not None:
            lines.append(line("per-layer", self.native_prediction))
        if self.deepspeed_prediction is not None:
            engine = engine_summary(self.deepspeed_plan.engine)
            lines.append(line("deepspeed", self.deepspeed_prediction) + f" ({engine})")
        if self.uniform_prediction is not None:
            gain = self.uniform_prediction.step_seconds / self.native_prediction.step_seconds
            lines += [line("uniform", self.uniform_prediction),
                      f"per-layer plan: {gain:.3f}x the best uniform plan's speed"]
        lines.append(f"chosen    {engine_summary(self.plan.engine)}: {self.reason}; searched in {self.seconds:.2f} s")
        return "\n".join(lines)


# --- the options --------------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _field(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _tp_ok(cfg, kinds: tuple[str, ...], tp: int) -> bool:
    if tp == 1:
        return True
    return all(kind in TP_SHARDS and all(_field(cfg, f) % tp == 0 for f in TP_SHARDS[kind]) for kind in kinds)


def layer_options(cfg, spec, stage_size: int, micro_batch: int, max_tp: int, space: Space = Space()) -> list[UnitLayout]:
    """Every layout a layer of type `spec` can take on a stage of `stage_size` ranks."""
    options = []
    for tp in _divisors(stage_size):
        dp = stage_size // tp
        if tp > max_tp or micro_batch % dp or not _tp_ok(cfg, (spec.mixer, spec.ffn), tp) or (
                space.tps is not None and tp not in space.tps):
            continue
        eps = [1]
        if tp == 1 and spec.ffn in EP_SHARDS:
            experts = _field(cfg, EP_SHARDS[spec.ffn])
            eps = [ep for ep in _divisors(dp) if experts % ep == 0]
        options += [UnitLayout(tp=tp, dp=kind, checkpoint=ckpt, ep=ep)
                    for ep in eps for kind in space.dp_kinds for ckpt in space.checkpoints]
    return options


def end_options(cfg, stage_size: int, micro_batch: int, max_tp: int, space: Space = Space()) -> list[UnitLayout]:
    """Layouts of the embedding and head (one for both)."""
    return [UnitLayout(tp=tp, dp=kind) for tp in _divisors(stage_size)
            if tp <= max_tp and micro_batch % (stage_size // tp) == 0 and cfg.vocab_size % tp == 0
            for kind in space.dp_kinds]


def pipeline_settings(cfg, world: int, global_batch: int, max_tp: int, space: Space = Space()) -> list[Settings]:
    """Every pipeline setting (and end layout) the plan rules allow."""
    n_layers = cfg.n_layers
    out = []
    for pp in _divisors(world):
        if pp > min(n_layers, space.max_pp or n_layers):
            continue
        stage = world // pp
        schedules = ["1f1b"] if pp == 1 else list(space.schedules)
        for b in _divisors(global_batch):
            if b % space.micro_batch_multiple:
                continue
            m = global_batch // b
            for schedule in schedules:
                for v in VIRTUAL_STAGES[schedule]:
                    if pp * v > n_layers or not _schedule_ok(pp, schedule, v, b, m):
                        continue
                    out += [Settings(pp, schedule, v, b, m, ends) for ends in end_options(cfg, stage, b, max_tp, space)]
    return out


def _schedule_ok(pp: int, schedule: str, virtual: int, micro_batch: int, micro_batches: int) -> bool:
    """What `Plan.validate` requires of the pipeline, asked of the plan rules themselves."""
    pipe = Pipeline(degree=pp, stages=[(i, i + 1) for i in range(pp * virtual)], virtual_stages=virtual,
                    schedule=schedule, micro_batch_size=micro_batch, num_micro_batches=micro_batches)
    plan = Plan(world_size=pp, pipeline=pipe, embedding=Layout(1, "ddp"), head=Layout(1, "ddp"),
                layers=[LayerLayout(1, "ddp", "none", 1)] * (pp * virtual))
    try:
        plan.validate()
    except PlanError:
        return False
    return True


# --- inside a chunk: the Pareto frontier --------------------------------------------------------
#
# A frontier holds partial assignments of a chunk's first layers as numpy arrays: objective (K x
# micro-batch seconds + v x optimizer seconds), memory (state bytes + in-flight micro-batches x
# activation bytes), transient (the largest bytes live only while one of its units works), and a
# list of layouts as cons lists ((last layout, earlier cons list) or None), one per point.


@dataclass
class Frontier:
    objective: np.ndarray
    memory: np.ndarray
    transient: np.ndarray
    cons: list

    def __post_init__(self) -> None:
        self.least = float(self.objective.min())

    @classmethod
    def single(cls, objective: float, memory: float, transient: float, cons) -> Frontier:
        return cls(np.array([objective]), np.array([memory]), np.array([transient]), [cons])


def layouts_of(cons) -> list[UnitLayout]:
    out = []
    while cons is not None:
        out.append(cons[0])
        cons = cons[1]
    return out[::-1]


def _pareto(objective: np.ndarray, memory: np.ndarray, transient: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (or equals) in objective, memory and transient at
    once. In objective order, a point is dominated if an earlier one has no more memory and no more
    transient bytes: per transient level, a running minimum of the memory of earlier points at or
    below that level (transient bytes take few distinct values)."""
    order = np.lexsort((transient, memory, objective))
    m, t = memory[order], transient[order]
    dominated = np.zeros(len(order), dtype=bool)
    for level in np.unique(t):
        below = np.where(t <= level, m, np.inf)
        earlier = np.concatenate(([np.inf], np.minimum.accumulate(below)[:-1]))
        dominated |= (t == level) & (earlier <= m)
    return order[~dominated]


def _thin(objective: np.ndarray, memory: np.ndarray, budget: float) -> np.ndarray:
    """Indices of the fastest point in each 1 / FRONTIER_POINTS of `budget` (by peak memory)."""
    bucket = np.minimum((memory / budget * FRONTIER_POINTS).astype(np.int64), FRONTIER_POINTS - 1)
    order = np.lexsort((objective, bucket))
    first = np.ones(len(order), dtype=bool)
    first[1:] = bucket[order][1:] != bucket[order][:-1]
    return order[first]


class Planner:
    """The search for one model, hardware, world and global batch."""

    def __init__(self, hw, work: Workload, model_cfg, world: int, space: Space = Space()):
        self.hw, self.work, self.cfg, self.world, self.space = hw, work, model_cfg, world, space
        self.specs = model_cfg.layer_specs()
        self.units = units(work)  # embedding, layers..., head
        self.period = _period(self.specs)
        self._cache: dict = {}

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- costs, cached by unit and layout (layers of one type share them) --

    def cost(self, unit_index: int, layout: UnitLayout, s: Settings):
        unit, stage = self.units[unit_index], self.world // s.pp
        return self._cached((unit, layout, stage, s.micro_batch),
                            lambda: unit_cost(self.hw, self.work, unit, layout, stage, s.micro_batch))

    def options(self, layer: int, s: Settings) -> list[UnitLayout]:
        spec, stage = self.specs[layer], self.world // s.pp
        return self._cached(("options", spec, stage, s.micro_batch),
                            lambda: layer_options(self.cfg, spec, stage, s.micro_batch, self.hw.max_tp, self.space))

    def step(self, unit_index: int, layout: UnitLayout, s: Settings, inflight: float) -> tuple[float, float, float]:
        """What `layout` of a unit adds to a partial assignment: (objective, memory, transient)."""
        def make():
            c = self.cost(unit_index, layout, s)
            k = schedule_factor(s.schedule, s.pp, s.virtual, s.micro_batches)
            return (k * c.micro_batch_seconds + s.virtual * c.optimizer_seconds,
                    c.state_bytes + inflight * c.activation_bytes, c.transient_bytes)
        return self._cached(("step", self.units[unit_index], layout, s, inflight), make)

    def moves(self, layer: int, s: Settings, inflight: float) -> list[tuple]:
        """(layout, objective, memory, transient) of every layout of `layer` that no layout of the same
        tensor degree beats in all three (the relayouts around it depend on its degree only)."""
        def make():
            costed = [(o, *self.step(layer + 1, o, s, inflight)) for o in self.options(layer, s)]
            return [a for a in costed if not any(b[0].tp == a[0].tp and b[1:] != a[1:] and
                                                 all(x <= y for x, y in zip(b[1:], a[1:])) for b in costed)]
        k = schedule_factor(s.schedule, s.pp, s.virtual, s.micro_batches)
        return self._cached(("moves", self.specs[layer], self.world // s.pp, s.micro_batch, k, s.virtual, inflight),
                            make)

    def relayout_objective(self, s: Settings, src_tp: int, dst_tp: int) -> float:
        if src_tp == dst_tp:
            return 0.0
        k = schedule_factor(s.schedule, s.pp, s.virtual, s.micro_batches)
        return self._cached(("relayout", s.pp, s.micro_batch, k, src_tp, dst_tp), lambda: k * relayout_seconds(
            self.hw, self.work, src_tp, dst_tp, self.world // s.pp, s.micro_batch))

    # -- chunks --

    def frontiers(self, s: Settings, start: int, tp_in: int, first: bool, stop: int, inflight: float, bound: float):
        """For the chunk from layer `start` (entered at degree `tp_in`; after the embedding when `first`),
        extended one layer at a time up to `stop`: yields (end, {last tp: frontier}, the row's identity)
        for every end.
        Partial assignments that cannot fit or cannot beat `bound` are dropped. Computed rows are kept:
        they depend on the layer types only (so on `start` modulo the period), and bounds only fall."""
        k = schedule_factor(s.schedule, s.pp, s.virtual, s.micro_batches)
        key = ("rows", s.pp, s.micro_batch, k, s.virtual, inflight, s.ends if first else None,
               start % self.period, tp_in)
        rows = self._cached(key, list)
        for end in range(start + 1, stop + 1):
            if end - start > len(rows):
                previous = rows[-1] if rows else self._begin(s, tp_in, first, inflight)
                rows.append(self._grow(previous, end - 1, s, inflight, bound))
            yield end, rows[end - start - 1], (key, end - start)

    def _begin(self, s: Settings, tp_in: int, first: bool, inflight: float) -> dict[int, Frontier]:
        if not first:
            return {tp_in: Frontier.single(0.0, 0.0, 0.0, None)}
        return {tp_in: Frontier.single(*self.step(0, s.ends, s, inflight), (s.ends, None))}

    def _grow(self, states: dict[int, Frontier], layer: int, s: Settings, inflight: float,
              bound: float) -> dict[int, Frontier]:
        """The frontiers after adding `layer` in each of its layouts, by its tensor degree."""
        budget = self.hw.memory / s.virtual
        parts: dict[int, list] = {}
        for prev_tp, f in states.items():
            for layout, objective, memory, transient in self.moves(layer, s, inflight):
                objective += self.relayout_objective(s, prev_tp, layout.tp)
                parts.setdefault(layout.tp, []).append(
                    (f.objective + objective, f.memory + memory, np.maximum(f.transient, transient), f.cons, layout))
        grown = {}
        for tp, group in parts.items():
            o, m, t = (np.concatenate([g[i] for g in group]) for i in range(3))
            owner = np.repeat(np.arange(len(group)), [len(g[0]) for g in group])
            start = np.cumsum([0] + [len(g[0]) for g in group])
            fits = np.nonzero((o < bound) & (m + t <= budget))[0]
            if not len(fits):
                continue
            kept = fits[_pareto(o[fits], m[fits], t[fits])]
            if len(kept) > FRONTIER_POINTS:
                kept = kept[_thin(o[kept], m[kept] + t[kept], budget)]
            cons = [(group[owner[i]][4], group[owner[i]][3][i - start[owner[i]]]) for i in kept]
            grown[tp] = Frontier(o[kept], m[kept], t[kept], cons)
        return grown

    def closing(self, last: bool, tp: int, s: Settings, inflight: float) -> tuple[float, float, float, UnitLayout | None]:
        """What a chunk's end adds, (objective, memory, transient, the head's layout or None): the head
        after its relayout (last chunk), or the send of the activations to the next chunk."""
        def make():
            if last:
                objective, memory, transient = self.step(len(self.units) - 1, s.ends, s, inflight)
                return objective + self.relayout_objective(s, tp, s.ends.tp), memory, transient, s.ends
            k = schedule_factor(s.schedule, s.pp, s.virtual, s.micro_batches)
            return k * p2p_seconds(self.hw, self.work, tp, self.world // s.pp, s.micro_batch), 0.0, 0.0, None
        return self._cached(("closing", last, tp, s, inflight), make)

    def best_in_chunk(self, f: Frontier, last: bool, tp: int, s: Settings, inflight: float) -> tuple | None:
        """The chunk's fastest complete assignment that fits in its share of a device: (objective, cons)."""
        objective, memory, transient, head = self.closing(last, tp, s, inflight)
        fits = f.memory + memory + np.maximum(f.transient, transient) <= self.hw.memory / s.virtual
        done = np.where(fits, f.objective + objective, np.inf)
        i = int(done.argmin())
        if done[i] == np.inf:
            return None
        return float(done[i]), (head, f.cons[i]) if head is not None else f.cons[i]

    # -- stage boundaries --

    def partition(self, s: Settings, bound: float = math.inf):
        """The least largest chunk objective over every cut into chunks, with the chunks' assignments;
        None if nothing fits or nothing beats `bound`."""
        n, chunks = len(self.specs), s.chunks
        # f[c]: {(end, tp of layer end - 1): (largest objective, [chunk assignments])}
        f = [{(0, s.ends.tp): (0.0, [])}]
        for c in range(chunks):
            last = c == chunks - 1
            inflight = in_flight(s.schedule, s.pp, s.virtual, s.micro_batches, c % s.pp)
            nxt: dict = {}
            for (start, tp_in), (worst, path) in f[c].items():
                if worst >= bound:
                    continue
                stop = n - (chunks - c - 1)  # the chunks after this one need a layer each
                for end, states, row in self.frontiers(s, start, tp_in, c == 0, stop, inflight, bound):
                    if not states:
                        break  # nothing longer can fit or beat the bound either
                    if last and end != n:
                        continue
                    for tp, frontier in states.items():
                        if max(worst, frontier.least) >= min(bound, nxt.get((end, tp), (math.inf,))[0]):
                            continue  # cannot improve on what reaches (end, tp) already
                        best = self._cached(("best", row, tp, last and s.ends),  # the head's layout if last
                                            lambda: self.best_in_chunk(frontier, last, tp, s, inflight))
                        if best is None:
                            continue
                        value = max(worst, best[0])
                        if value < bound and value < nxt.get((end, tp), (math.inf,))[0]:
                            nxt[(end, tp)] = (value, path + [best])
            f.append(nxt)
        done = [v for (end, _), v in f[chunks].items() if end == n]
        return min(done, key=lambda v: v[0]) if done else None

    def lower_bound(self, s: Settings) -> float:
        """No plan of settings `s` is faster than this: the largest chunk objective is at least the
        mean over chunks, and the sum over chunks is at least the least sum of the units' objectives
        whose memory (state and activations at the fewest in-flight micro-batches; relayouts and
        transients dropped) fits in all chunks' shares together. That knapsack is bounded by its
        Lagrangian relaxation: for any lam >= 0, sum of min(objective + lam memory) - lam capacity."""
        return self._cached(("bound", s), lambda: self._lower_bound(s))

    def _lower_bound(self, s: Settings) -> float:
        inflight = min(in_flight(s.schedule, s.pp, s.virtual, s.micro_batches, r) for r in range(s.pp))
        k = schedule_factor(s.schedule, s.pp, s.virtual, s.micro_batches)
        def costs(spec) -> np.ndarray:  # (objective, memory) of every option of a layer of type spec
            i = self.specs.index(spec)
            return np.array([self.step(i + 1, o, s, inflight)[:2] for o in self.options(i, s)])

        per_spec = {spec: self._cached(("bound costs", spec, s.pp, s.micro_batch, k, s.virtual, inflight),
                                       lambda spec=spec: costs(spec)) for spec in set(self.specs)}
        counts = {spec: self.specs.count(spec) for spec in per_spec}
        ends = [self.step(u, s.ends, s, inflight)[:2] for u in (0, len(self.units) - 1)]
        capacity = s.pp * self.hw.memory - sum(m for _, m in ends)
        fastest = sum(counts[spec] * costs[:, 0].min() for spec, costs in per_spec.items())
        frugal = sum(counts[spec] * costs[:, 1].min() for spec, costs in per_spec.items())
        if frugal > capacity:
            return math.inf  # nothing fits
        best = fastest
        scale = fastest / max(frugal, 1.0)
        for lam in scale * np.geomspace(1e-3, 1e3, 25):
            relaxed = sum(counts[spec] * (costs[:, 0] + lam * costs[:, 1]).min() for spec, costs in per_spec.items())
            best = max(best, relaxed - lam * capacity)
        return (best + sum(o for o, _ in ends)) / s.chunks

    # -- the whole search --

    def search(self, global_batch: int, uniform_only: bool = False, bound: float = math.inf):
        """The best (settings, chunk assignments) that beats `bound`: (plan, its step time, settings
        costed in full), or None. Settings are visited in lower-bound order, so the search stops at
        the first whose bound cannot beat the best plan so far."""
        settings = [s for s in pipeline_settings(self.cfg, self.world, global_batch, self.hw.max_tp, self.space)
                    if all(self.options(i, s) for i in range(len(self.specs)))]
        if not settings:
            raise ConfigError(f"global batch of {global_batch} sequences: no pipeline degree, micro-batch split and "
                              f"tensor degrees on {self.world} ranks give every layer a data-parallel degree that "
                              f"divides its micro-batch")
        ranked = sorted(((self.lower_bound(s), i, s) for i, s in enumerate(settings)), key=lambda t: t[:2])
        best, best_value, visited = None, bound, 0
        for lower, _, s in ranked:
            if lower >= best_value:
                break
            visited += 1
            found = self.uniform(s, best_value) if uniform_only else self.partition(s, best_value)
            if found is not None and found[0] < best_value:
                best_value, best = found[0], (s, found[1])
        if best is None:
            return None
        return self.to_plan(*best), best_value, visited

    def uniform(self, s: Settings, bound: float = math.inf):
        """The best plan with one layout for every layer (even stages), as `partition` reports it."""
        stages = even_stages(len(self.specs), s.chunks)
        by_spec = {spec: set(self.options(self.specs.index(spec), s)) for spec in set(self.specs)}
        best = None
        for layout in set().union(*by_spec.values()):
            per_spec = {spec: _uniform_layout(layout, spec, options) for spec, options in by_spec.items()}
            if None in per_spec.values():
                continue
            per_layer = [per_spec[spec] for spec in self.specs]
            path = []
            for c, (start, end) in enumerate(stages):
                chunk = self.chunk_of(s, c, per_layer, start, end)
                if chunk is None or chunk[0] >= min(bound, best[0] if best else math.inf):
                    break
                path.append(chunk)
            else:
                best = (max(p[0] for p in path), path)
        return best

    def chunk_of(self, s: Settings, c: int, per_layer: list[UnitLayout], start: int, end: int) -> tuple | None:
        """Chunk `c` (layers [start, end)) in the given layouts: (objective, cons), or None if it does
        not fit its share of a device."""
        inflight = in_flight(s.schedule, s.pp, s.virtual, s.micro_batches, c % s.pp)
        prev = s.ends.tp if c == 0 else per_layer[start - 1].tp
        f = self._begin(s, prev, c == 0, inflight)[prev]
        o, m, t, cons = float(f.objective[0]), float(f.memory[0]), float(f.transient[0]), f.cons[0]
        for i in range(start, end):
            objective, memory, transient = self.step(i + 1, per_layer[i], s, inflight)
            o, m, t = o + objective + self.relayout_objective(s, prev, per_layer[i].tp), m + memory, max(t, transient)
            cons, prev = (per_layer[i], cons), per_layer[i].tp
        return self.best_in_chunk(Frontier.single(o, m, t, cons), c == s.chunks - 1, prev, s, inflight)

    def to_plan(self, s: Settings, path: list[tuple]) -> Plan:
        """The plan of the chunk assignments `path` (the first holds the embedding, the last the head)."""
        layouts, stages, start = [], [], 0
        for c, p in enumerate(path):
            mine = layouts_of(p[1])
            mine = mine[1:] if c == 0 else mine
            mine = mine[:-1] if c == len(path) - 1 else mine
            layouts += mine
            stages.append((start, start + len(mine)))
            start += len(mine)
        return plan_of(s, self.world, layouts, stages)


def plan_of(s: Settings, world: int, layouts: list[UnitLayout], stages: list[tuple[int, int]]) -> Plan:
    """A plan from search settings, every layer's layout and the stage boundaries."""
    ends = Layout(tp=s.ends.tp, dp=s.ends.dp)
    return Plan(world_size=world,
                pipeline=Pipeline(degree=s.pp, stages=stages, virtual_stages=s.virtual, schedule=s.schedule,
                                  micro_batch_size=s.micro_batch, num_micro_batches=s.micro_batches),
                embedding=ends, head=replace(ends),
                layers=[LayerLayout(tp=o.tp, dp=o.dp, checkpoint="full" if o.checkpoint else "none", ep=o.ep)
                        for o in layouts],
                source="planner")


def _uniform_layout(layout: UnitLayout, spec, options: list[UnitLayout]) -> UnitLayout | None:
    """`layout` for a layer of type `spec`: its ep only applies to layers that split experts."""
    fitted = layout if spec.ffn in EP_SHARDS else replace(layout, ep=1)
    return fitted if fitted in options else None


def _period(specs) -> int:
    """The shortest period of the layer pattern."""
    n = len(specs)
    return next(p for p in range(1, n + 1) if all(specs[i] == specs[i % p] for i in range(n)))


def deepspeed_engines(hw) -> list[Engine]:
    """The DeepSpeed engines of the space: ZeRO stages 1-3 with and without optimizer offload, stage 3
    also with parameter offload, and stage 3's optimizer offload split at the host shares of
    OFFLOAD_RATIOS and at the balanced one (`cost.balanced_offload_ratio`, to two places)."""
    balanced = round(balanced_offload_ratio(hw), 2)
    ratios = sorted({*OFFLOAD_RATIOS, *([balanced] if 0 < balanced < 1 else [])})
    engines = []
    for stage in ZERO_STAGES:
        for params in (False, True) if stage == 3 else (False,):
            engines.append(Engine("deepspeed", stage, offload_params=params))
            engines += [Engine("deepspeed", stage, offload_optimizer=True, offload_params=params, offload_ratio=r)
                        for r in (ratios if stage == 3 else (1.0,))]
    return engines


def deepspeed_plans(hw, model_cfg, world: int, global_batch: int, space: Space = Space()) -> list[Plan]:
    """Every whole-model DeepSpeed plan of the space: an engine of `deepspeed_engines`, micro-batches of
    b sequences (a multiple of the world: ZeRO gives every rank an equal share) and every layer
    checkpointed or none."""
    if "deepspeed" not in space.engines:
        return []
    return [deepspeed_plan(model_cfg, world, e.zero_stage, offload_optimizer=e.offload_optimizer,
                           offload_params=e.offload_params, offload_ratio=e.offload_ratio,
                           checkpoint="full" if checkpoint else "none", micro_batch_size=b,
                           num_micro_batches=global_batch // b)
            for b in _divisors(global_batch) if b % world == 0 and b % space.micro_batch_multiple == 0
            for e in deepspeed_engines(hw) for checkpoint in space.checkpoints]


def best_deepspeed(hw, work: Workload, model_cfg, world: int, space: Space = Space()):
    """The fastest DeepSpeed plan that fits and its prediction, or None (of equals, the first of `deepspeed_plans`)."""
    fitting = [(prediction, plan) for plan in deepspeed_plans(hw, model_cfg, world, work.global_batch, space)
               if (prediction := predict(hw, work, plan)).fits]
    if not fitting:
        return None
    prediction, plan = min(fitting, key=lambda pair: pair[0].step_seconds)
    return plan, prediction


# How much faster a DeepSpeed plan must be predicted than the best native one to be chosen over it:
# the probes calibrate only the native runtime's terms, so a smaller lead is within the model's error.
ENGINE_MARGIN = 0.05


def choose(native, deepspeed, hw, space: Space) -> tuple[Plan, object, str]:
    """(plan, prediction, why) of the best native and the best DeepSpeed (plan, prediction), either
    None if none fits: DeepSpeed when only it fits or it is predicted ENGINE_MARGIN faster, else native."""
    if deepspeed is None:
        why = "native plans only (--engines)" if "deepspeed" not in space.engines else "no DeepSpeed plan fits"
        return *native, f"{why}; predicted {native[1].step_seconds:.4g} s/step"
    if native is None:
        why = ("DeepSpeed plans only (--engines)" if "native" not in space.engines else
               f"the only plan under the memory limit: no native plan fits in {human_bytes(hw.memory)} per device")
        return *deepspeed, f"{why}; predicted {deepspeed[1].step_seconds:.4g} s/step"
    ds, nat = deepspeed[1].step_seconds, native[1].step_seconds
    if ds < nat * (1 - ENGINE_MARGIN):
        return *deepspeed, f"predicted faster: {ds:.4g} s/step against {nat:.4g} s for the best native plan"
    margin = f", less than the {ENGINE_MARGIN:.0%} faster an engine switch needs" if ds < nat else ""
    return *native, (f"predicted {nat:.4g} s/step against {ds:.4g} s for the best DeepSpeed plan "
                     f"({engine_summary(deepspeed[0].engine)}{margin})")


def plan_search(hw, work: Workload, model_cfg, world: int, space: Space = Space()) -> SearchResult:
    """The fastest plan that fits, native or DeepSpeed, the fastest uniform native one, with their predictions.

    The uniform search runs first: its plan is in the per-layer space too (one layout everywhere,
    even stages), so its step time bounds the per-layer search from the start."""
    if work.global_batch % space.micro_batch_multiple:
        raise ConfigError(f"a global batch of {work.global_batch} sequences does not split into micro-batches of a "
                          f"multiple of {space.micro_batch_multiple} sequences (streamed data gives each of the "
                          f"{space.micro_batch_multiple} ranks an equal share of every micro-batch)")
    began = time.perf_counter()
    planner = Planner(hw, work, model_cfg, world, space)
    uniform = found = None
    if "native" in space.engines:
        uniform = planner.search(work.global_batch, uniform_only=True)
        bound = uniform[1] * (1 + 1e-9) if uniform else math.inf  # a per-layer plan as fast as it is found too
        found = planner.search(work.global_batch, bound=bound) or uniform
    native = None
    if found is not None:
        native = found[0], predict(hw, work, found[0])
        if not math.isclose(found[1], native[1].step_seconds, rel_tol=1e-9):
            raise AssertionError(f"the search scored its plan {found[1]} s, the cost model {native[1].step_seconds} s")
    deepspeed = best_deepspeed(hw, work, model_cfg, world, space)
    if native is None and deepspeed is None:
        raise ConfigError(_infeasible(planner, work))
    plan, prediction, reason = choose(native, deepspeed, hw, space)
    if plan.engine.deepspeed:
        plan.notes = f"planner chose deepspeed: {reason}"
    plan.predicted = Predicted(step_time_s=prediction.step_seconds, peak_memory_bytes=int(max(prediction.memory_per_rank)),
                               stage_peak_memory_bytes=[int(b) for b in prediction.memory_per_rank])
    return SearchResult(plan=plan, prediction=prediction, uniform_plan=uniform[0] if uniform else None,
                        uniform_prediction=predict(hw, work, uniform[0]) if uniform else None,
                        seconds=time.perf_counter() - began, visited=found[2] if found else 0,
                        native_prediction=native[1] if native else None,
                        deepspeed_plan=deepspeed[0] if deepspeed else None,
                        deepspeed_prediction=deepspeed[1] if deepspeed else None, reason=reason)


def _infeasible(planner: Planner, work: Workload) -> str:
    """Why nothing fits: the least memory a device needs under the most frugal plans of the space
    (native: every layer fsdp with full checkpointing at its largest tensor degree, the deepest
    pipeline; DeepSpeed: every plan whose offloaded bytes fit on the host)."""
    hw, least = planner.hw, math.inf
    settings = pipeline_settings(planner.cfg, planner.world, work.global_batch, hw.max_tp, planner.space)
    for s in settings if "native" in planner.space.engines else []:
        if not all(planner.options(i, s) for i in range(len(planner.specs))):
            continue
        frugal = [min(planner.options(i, s), key=lambda o: (o.dp != "fsdp", not o.checkpoint, -o.tp, -o.ep))
                  for i in range(len(planner.specs))]
        plan = plan_of(s, planner.world, frugal, even_stages(len(frugal), s.chunks))
        least = min(least, max(predict(hw, work, plan).memory_per_rank) * s.virtual)
    for plan in deepspeed_plans(hw, planner.cfg, planner.world, work.global_batch, planner.space):
        prediction = predict(hw, work, plan)
        if not hw.separate_host:  # the device is the host: the offloaded bytes need its memory too
            least = min(least, max(prediction.memory_per_rank) + prediction.host_bytes)
        elif prediction.host_bytes <= hw.host_memory:
            least = min(least, max(prediction.memory_per_rank))
    if least == math.inf:
        return (f"no plan fits: no plan of the search space splits a global batch of {work.global_batch} sequences "
                f"over {planner.world} ranks (DeepSpeed's micro-batches are multiples of the world size)")
    deepspeed = ", DeepSpeed ZeRO-3 with offload" if "deepspeed" in planner.space.engines else ""
    return (f"no plan fits: even the most frugal plan of the search space (fsdp where allowed, full checkpointing, "
            f"the widest tensor and expert degrees, the deepest pipeline{deepspeed}) needs {human_bytes(least)} per "
            f"device; {human_bytes(hw.memory)} available")
