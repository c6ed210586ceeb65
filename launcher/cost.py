"""The planner's cost model: predicted step time and memory per rank of a plan on some hardware.

Sizes come only from the model's counts (`model.counts`: every layer type's parameters, FLOPs and
activation bytes); times from a `Hardware` (`launcher.hardware`): a layer's compute time and a
collective's time, either analytic (a cluster spec's peak FLOP/s and links) or measured (a profile).

Units. A plan lays out the embedding, every layer and the head ("units"), each with a tensor degree
tp, a data-parallel kind, checkpointing and (MoE layers) an expert degree ep, on a stage of S ranks
that runs micro-batches of b sequences of T tokens: the unit's data-parallel degree is S / tp and
each rank computes on b T tp / S tokens of a micro-batch. Per unit and micro-batch (`unit_cost`):

- compute: the hardware's forward and backward time for those tokens, divided by tp; a checkpointed
  unit's backward runs its forward again first, kept apart as recompute;
- tp: the Megatron split's all-reduces of [tokens, dim] over the tp ranks (one per sublayer in
  forward and one in backward; a MoE's experts all-reduce top_k + shared rows per token; the
  embedding one in forward; the head gathers its float32 logits in forward and all-reduces its
  input's gradient in backward), repeated with a checkpointed forward;
- ep: dispatch and combine all-to-alls of top_k rows per token in forward and in backward, and
  with more than one dp rank, in every forward, the all-reduce of the experts' token counts over
  the dp group (for load balancing) and their all-to-all over the ep group;
- dp: this runtime reduces gradients after every micro-batch's backward (no accumulation without
  sync): ddp all-reduces the gradients, zero2 all-gathers the parameters once per forward and
  reduce-scatters the gradients, fsdp all-gathers in forward and again in backward. Expert weights
  reduce over their own group (S / tp / ep ranks). **Overlap model**: a unit's dp collectives run
  during its compute, with the hardware's ``dp_overlap`` in [0, 1] as the fraction of the compute
  time they can hide behind (1 for GPUs' separate communication streams, about 0 for gloo on CPU
  cores that also compute): exposed = dp - overlap * min(dp, compute);
- relayout: between consecutive units of different tensor degrees, the all-gathers of
  `parallel.relayout` (forward into the larger degree, backward into the smaller);
- p2p: the last unit of a pipeline chunk sends its activations forward and receives their
  gradient back.

Every collective term is kept in two parts, transfer (bytes over bandwidth, named as the term) and
latency (``<term>_latency``: message steps times the per-step latency), because a real step pays
far more per message than a micro-benchmark of the collective alone (hooks, dispatch and ranks
waiting for each other at every call) and calibration has to be able to correct the two apart.

Memory per rank of a unit: model states by dp kind, with weight, gradient and optimizer bytes per
parameter (`StateBytes`; 4 + 4 + 8 in this runtime's float32 AdamW, 2 + 2 + 12 for the
mixed-precision AdamW of the ZeRO and Megatron papers): ddp keeps all, zero2 keeps the weights and
1 / dp of gradients and optimizer state, fsdp 1 / dp of everything plus gathered weights of the
unit at work and the one prefetched (transient); activations per in-flight micro-batch: the
unit's count with its tp-replicated part whole and the rest divided by tp, or only its input
when checkpointed (then one unit's full activations are live again during its recompute).

DeepSpeed plans (``engine.kind`` "deepspeed": no pipeline, tp 1, ZeRO over all W ranks) keep the
compute, tp, ep and activation terms above and replace the model states' (`zero_states`): ZeRO's
collectives (`zero_dp_calls`: DeepSpeed accumulates gradients between steps, so stages 1 and 2
reduce less often than this runtime), its sharding of the states (`zero_state_bytes`), the
optimizer and parameter offload to the host and the split update of ZeRO-Offload++
(`zero_update_seconds`, `split_update_seconds`), with the hardware's host figures (copy bandwidth,
host Adam rate, host memory). The host's bytes count against the host's memory, or against the
device's where the device is the host (CPU ranks).

Pipeline (`pipeline_seconds`). A rank runs v chunks (virtual stages) of the p ranks' p v; with
chunk times W_c (forward + backward of one micro-batch, all terms above) the schedule runs in
lock-step at the slowest chunk: ``(m v + (p - 1) beta) max_c W_c`` for m micro-batches, with
beta = 1 for GPipe, 1F1B and interleaved 1F1B (the bubble (p - 1) / (m v) of the Megatron paper)
and 1/3 for zero-bubble (splitting the backward into input and weight gradients, ZB-H1). Then the
optimizer step of a rank's parameter shards, v times its slowest chunk's. In-flight micro-batches
per chunk: 1 without pipelining, m for GPipe, p - r for 1F1B on pipeline rank r, and for the
interleaved schedules torch's warm-up ((v - 1) p + 2 (p - 1 - r)) plus one, over the rank's v chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stratagem.launcher.hardware import HOST_STATE_BYTES
from stratagem.model.counts import LayerCounts, ModelCounts, count_model
from stratagem.parallel.plan import Engine

COLLECTIVE_TERMS = ("tp", "ep", "dp", "relayout", "p2p")
# A collective term is split in two: its transfer (named as the term) and its latency ("<term>_latency",
# the per-message cost), so that calibration can correct them apart. "offload": parameters brought up
# from the host (DeepSpeed's parameter offload).
TERMS = ("compute", "recompute", *(t + part for t in COLLECTIVE_TERMS for part in ("", "_latency")), "offload",
         "optimizer")
BUBBLE_FACTOR = {"gpipe": 1.0, "1f1b": 1.0, "interleaved_1f1b": 1.0, "zero_bubble": 1 / 3}


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of the model states."""

    weight: int
    grad: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weight + self.grad + self.optimizer


FP32_ADAM = StateBytes(weight=4, grad=4, optimizer=8)  # this runtime: float32 weights, AdamW's m and v
MIXED_ADAM = StateBytes(weight=2, grad=2, optimizer=12)  # bf16 weights and grads, fp32 master, m and v


@dataclass(frozen=True)
class Workload:
    """What is trained: the model's counts at a sequence length, sequences per optimizer step."""

    counts: ModelCounts
    dim: int
    vocab_size: int
    top_k: int  # routed experts per token (0 without MoE)
    shared_experts: int
    num_experts: int
    seq_len: int
    global_batch: int  # sequences per optimizer step
    state: StateBytes = FP32_ADAM
    activation_bytes: int = 4  # bytes per activation value

    @classmethod
    def of(cls, model_cfg, seq_len: int, global_batch: int, state: StateBytes = FP32_ADAM,
           activation_bytes: int = 4) -> Workload:
        moe = getattr(model_cfg, "moe", None)
        uses_moe = any(spec.ffn == "moe" for spec in model_cfg.layer_specs())
        return cls(counts=count_model(model_cfg, seq_len, activation_bytes), dim=model_cfg.dim,
                   vocab_size=model_cfg.vocab_size, top_k=moe.top_k if uses_moe else 0,
                   shared_experts=moe.num_shared_experts if uses_moe else 0,
                   num_experts=moe.num_experts if uses_moe else 0, seq_len=seq_len,
                   global_batch=global_batch, state=state, activation_bytes=activation_bytes)

    @property
    def n_layers(self) -> int:
        return len(self.counts.layers)


@dataclass(frozen=True)
class Unit:
    """One thing a plan lays out: "embedding", a layer (its counts) or "head"."""

    kind: str  # "embedding", "layer" or "head"
    params: int
    expert_params: int
    flops_per_token: int  # forward
    activation_bytes_per_token: int
    replicated_bytes_per_token: int  # of the activations, what tp does not divide
    input_bytes_per_token: int
    key: str  # the profile's name for its type: "mixer/ffn", "embedding", "head"
    ffn: str = ""

    @classmethod
    def layer(cls, c: LayerCounts) -> Unit:
        return cls("layer", c.params, c.expert_params, c.flops_per_token, c.activation_bytes_per_token,
                   c.tp_replicated_activation_bytes_per_token, c.input_bytes_per_token, f"{c.mixer}/{c.ffn}", c.ffn)


def units(work: Workload) -> list[Unit]:
    """The embedding, every layer and the head, in order (a tied head holds the embedding's weight)."""
    counts = work.counts
    head_params = counts.head_params or counts.embedding_params
    head_flops = counts.forward_flops_per_token - sum(c.flops_per_token for c in counts.layers)
    embedding = Unit("embedding", counts.embedding_params, 0, 0, 0, 0, 0, "embedding")
    head = Unit("head", head_params + counts.final_norm_params, 0, head_flops, counts.head_activation_bytes_per_token,
                counts.head_activation_bytes_per_token, work.activation_bytes * work.dim, "head")
    return [embedding, *(Unit.layer(c) for c in counts.layers), head]


@dataclass(frozen=True)
class UnitLayout:
    tp: int = 1
    dp: str = "ddp"
    checkpoint: bool = False
    ep: int = 1


@dataclass
class UnitCost:
    """One unit under one layout on one stage: seconds per micro-batch by term, seconds per step
    (the optimizer's), and bytes per rank."""

    seconds: dict[str, float]  # per micro-batch, forward + backward, by term
    optimizer_seconds: float  # per step
    state_bytes: float
    activation_bytes: float  # per in-flight micro-batch
    transient_bytes: float  # live only while this unit works
    host_bytes: float = 0.0  # model states offloaded to host memory (DeepSpeed)

    @property
    def micro_batch_seconds(self) -> float:
        return sum(self.seconds.values())


@dataclass
class ModelStates:
    """What keeping a unit's weights, gradients and optimizer states costs a rank: data-parallel
    collectives per micro-batch (calls as `_collectives` takes them), parameter bytes brought up from
    the host per micro-batch, the optimizer step's seconds, and bytes in device and host memory."""

    calls: list[tuple]
    optimizer_seconds: float
    device_bytes: float
    host_bytes: float = 0.0
    fetch_bytes: float = 0.0


def _collectives(hw, term: str, calls) -> dict[str, float]:
    """`term`'s seconds from `calls`, each (count, kind, nbytes, group_size, stride): its transfer as
    `term` and its latency as `term`_latency."""
    latency = transfer = 0.0
    for count, kind, nbytes, group_size, stride in calls:
        lat, xfer = hw.collective_parts(kind, nbytes, group_size, stride)
        latency, transfer = latency + count * lat, transfer + count * xfer
    return {term: transfer, f"{term}_latency": latency}


def _dp_calls(kind: str, params: float, dp: int, stride: int, state: StateBytes) -> list[tuple]:
    """A unit's data-parallel collectives per micro-batch for `params` local parameters over `dp` ranks."""
    if dp == 1 or params == 0:
        return []
    if kind == "ddp":
        return [(1, "all_reduce", params * state.grad, dp, stride)]
    gathers = 2 if kind == "fsdp" else 1
    return [(gathers, "all_gather", params * state.weight, dp, stride),
            (1, "reduce_scatter", params * state.grad, dp, stride)]


# The model states each dp kind shards over its ranks, and each ZeRO stage (stage 2 is zero2, 3 is fsdp).
SHARDED = {"ddp": (), "zero2": ("grad", "optimizer"), "fsdp": ("weight", "grad", "optimizer")}
ZERO_SHARDED = {1: ("optimizer",), 2: SHARDED["zero2"], 3: SHARDED["fsdp"]}


def _state_bytes(sharded: tuple[str, ...], params: float, dp: int, state: StateBytes) -> float:
    """Bytes per rank of `params` parameters' states, those named in `sharded` split over `dp` ranks."""
    return params * sum(getattr(state, s) / (dp if s in sharded else 1) for s in ("weight", "grad", "optimizer"))


def native_states(hw, unit: Unit, layout: UnitLayout, dp: int, state: StateBytes) -> ModelStates:
    """This runtime's model states: the dense weights over the dp group, the experts' over dp / ep
    ranks, each as the layout's dp kind shards them; the optimizer updates what the rank keeps."""
    dense = (unit.params - unit.expert_params) / layout.tp
    experts = unit.expert_params / (layout.tp * layout.ep)
    groups = ((dense, dp, layout.tp), (experts, dp // layout.ep, layout.tp * layout.ep))  # (params, ranks, stride)
    calls = [call for params, ranks, stride in groups for call in _dp_calls(layout.dp, params, ranks, stride, state)]
    kept = sum(params if layout.dp == "ddp" else params / ranks for params, ranks, _ in groups)
    held = sum(_state_bytes(SHARDED[layout.dp], params, ranks, state) for params, ranks, _ in groups)
    return ModelStates(calls=calls, optimizer_seconds=hw.optimizer_seconds(kept), device_bytes=held)


def zero_dp_calls(stage: int, params: float, world: int, micro_batches: int, state: StateBytes) -> list[tuple]:
    """ZeRO's collectives per micro-batch for `params` parameters over `world` ranks, in a step of
    `micro_batches` micro-batches (a call made once per step counts 1 / m). DeepSpeed accumulates
    gradients between optimizer steps: stage 1 all-reduces them once per step, stage 2
    reduce-scatters each micro-batch's into the partitions; both all-gather the updated weights once
    per step. Stage 3 gathers the weights for every forward and every backward and reduce-scatters
    every micro-batch's gradients: native fsdp (`_dp_calls`)."""
    if stage == 3:
        return _dp_calls("fsdp", params, world, 1, state)
    if world == 1 or params == 0:
        return []
    once = 1 / micro_batches
    reduce = (once, "all_reduce", params * state.grad, world, 1) if stage == 1 else \
        (1, "reduce_scatter", params * state.grad, world, 1)
    return [reduce, (once, "all_gather", params * state.weight, world, 1)]


def host_share(engine: Engine) -> float:
    """r, the share of a rank's optimizer partition updated on the host: offload_ratio with optimizer
    offload (1 unless split), else 0."""
    return engine.offload_ratio if engine.offload_optimizer else 0.0


def zero_state_bytes(engine: Engine, params: float, world: int, state: StateBytes) -> tuple[float, float]:
    """(device, host) bytes per rank of `params` parameters' states under `engine` over W = `world` ranks.

    ZeRO stage 1 shards the optimizer states, 2 also the gradients (native zero2), 3 also the weights
    (native fsdp): device P (w + g + o / W), P (w + (g + o) / W), P (w + g + o) / W (`_state_bytes`).
    Optimizer offload takes the host share r (`host_share`) of the partition q = P / W off the device
    (its optimizer states, and under stages 2 and 3, whose gradients are partitioned, its gradients:
    r q (o + g)) and keeps r q HOST_STATE_BYTES on the host. Parameter offload (stage 3) moves the
    weight partition q w from the device to the host."""
    partition, r = params / world, host_share(engine)
    device = _state_bytes(ZERO_SHARDED[engine.zero_stage], params, world, state)
    device -= r * partition * (state.optimizer + (state.grad if engine.zero_stage > 1 else 0))
    host = r * partition * HOST_STATE_BYTES
    if engine.offload_params:
        device, host = device - partition * state.weight, host + partition * state.weight
    return device, host


def split_update_seconds(host: float, device: float, transfer: float, overlap: bool) -> float:
    """An optimizer step split between host and device (ZeRO-Offload++): the two parts run at once,
    then the host part's transfers: max(host, device) + transfer. Where the device is the host's own
    cores (`overlap` False: CPU ranks) the parts take turns: host + device + transfer."""
    return (max(host, device) if overlap else host + device) + transfer


def zero_update_seconds(hw, engine: Engine, partition: float, state: StateBytes) -> float:
    """One step's update of a rank's q = `partition` parameters under `engine`: the host share r q at
    the host's AdamW rate, its gradients copied down and (unless the weights live on the host) its
    updated weights copied up, r q (g + w) bytes at the host link's bandwidth; the rest (1 - r) q on
    the device; combined by `split_update_seconds`."""
    r = host_share(engine)
    up = 0 if engine.offload_params else state.weight
    return split_update_seconds(hw.host_optimizer_seconds(r * partition), hw.optimizer_seconds((1 - r) * partition),
                                hw.host_copy_seconds(r * partition * (state.grad + up)), hw.separate_host)


def balanced_offload_ratio(hw) -> float:
    """The host share r at which a split update's two parts end together, r h = (1 - r) d for per-
    parameter host and device update times h and d: r = d / (h + d). The split's time max(r h,
    (1 - r) d) + r t (t: per-parameter transfers) is least there when t < d: below it the device part
    dominates and shrinks faster with r than the transfers grow; above it the host part grows."""
    host, device = hw.host_optimizer_seconds(1.0), hw.optimizer_seconds(1.0)
    return device / (host + device)


def zero_states(hw, unit: Unit, engine: Engine, world: int, micro_batches: int, state: StateBytes) -> ModelStates:
    """A unit's model states in a DeepSpeed plan (tp 1, ZeRO over all `world` ranks): `zero_dp_calls`,
    `zero_update_seconds` of its partition, `zero_state_bytes`, and under parameter offload its
    weight partition brought up from the host before every forward and every backward."""
    partition = unit.params / world
    device, host = zero_state_bytes(engine, unit.params, world, state)
    return ModelStates(calls=zero_dp_calls(engine.zero_stage, unit.params, world, micro_batches, state),
                       optimizer_seconds=zero_update_seconds(hw, engine, partition, state), device_bytes=device,
                       host_bytes=host, fetch_bytes=2 * partition * state.weight if engine.offload_params else 0.0)


def _tp_all_reduces(unit: Unit, work: Workload) -> tuple[float, float]:
    """(forward, backward) all-reduces of [tokens, dim] rows per token of a tensor-parallel unit."""
    if unit.kind == "embedding":
        return 1, 0
    if unit.kind == "head":
        return 0, 1
    ffn_rows = work.top_k + work.shared_experts if unit.ffn == "moe" else 1
    return 1 + ffn_rows, 2


NATIVE = Engine()


def unit_cost(hw, work: Workload, unit: Unit, layout: UnitLayout, stage_size: int, micro_batch: int,
              engine: Engine = NATIVE, micro_batches: int = 1) -> UnitCost:
    """`unit` laid out as `layout` on a stage of `stage_size` ranks running micro-batches of `micro_batch`
    sequences, `micro_batches` of them per step, its states kept by `engine`."""
    tp, ep, state = layout.tp, layout.ep, work.state
    dp = stage_size // tp
    tokens = micro_batch * work.seq_len / dp  # per rank
    row_bytes = _rows_bytes(work, micro_batch, tp, stage_size)
    fwd, bwd = hw.layer_seconds(unit, tokens, layout.checkpoint)  # a checkpointed backward recomputes
    recompute = min(fwd, bwd) / tp if layout.checkpoint else 0.0  # the forward again, inside the backward
    compute = (fwd + bwd) / tp - recompute
    forwards = 2 if layout.checkpoint else 1
    tp_calls = []
    if tp > 1:
        f_rows, b_rows = _tp_all_reduces(unit, work)
        tp_calls.append((forwards * f_rows + b_rows, "all_reduce", row_bytes, tp, 1))
        if unit.kind == "head":  # the logits, gathered in float32 over the vocabulary
            tp_calls.append((forwards, "all_gather", tokens * work.vocab_size * 4, tp, 1))
    ep_calls = [(2 * (forwards + 1), "all_to_all", row_bytes * work.top_k, ep, tp)] if ep > 1 else []
    if unit.ffn == "moe" and dp > 1:  # every forward: the experts' token counts, summed over the dp group
        counts = work.num_experts * 8
        ep_calls += [(forwards, "all_reduce", counts, dp, tp), (forwards, "all_to_all", counts, ep, tp)]
    states = (zero_states(hw, unit, engine, dp, micro_batches, state) if engine.deepspeed
              else native_states(hw, unit, layout, dp, state))
    dp_terms = _collectives(hw, "dp", states.calls)
    dp_s = sum(dp_terms.values())
    exposed = 1 - hw.dp_overlap * min(dp_s, compute + recompute) / dp_s if dp_s else 0.0
    offload = hw.host_copy_seconds(states.fetch_bytes) if states.fetch_bytes else 0.0
    replicated = unit.replicated_bytes_per_token
    full = tokens * (replicated + (unit.activation_bytes_per_token - replicated) / tp)
    kept = tokens * unit.input_bytes_per_token if layout.checkpoint else full
    local = (unit.params - unit.expert_params) / tp + unit.expert_params / (tp * ep)
    gathered = 2 * local * state.weight if layout.dp == "fsdp" and dp > 1 else 0.0
    return UnitCost(
        seconds=hw.corrected({"compute": compute, "recompute": recompute, **_collectives(hw, "tp", tp_calls),
                              **_collectives(hw, "ep", ep_calls), **{t: exposed * x for t, x in dp_terms.items()},
                              "offload": offload}),
        optimizer_seconds=hw.corrected({"optimizer": states.optimizer_seconds})["optimizer"],
        state_bytes=states.device_bytes,
        activation_bytes=kept,
        transient_bytes=gathered + (full if layout.checkpoint else 0.0),
        host_bytes=states.host_bytes,
    )


def relayout_terms(hw, work: Workload, src_tp: int, dst_tp: int, stage_size: int, micro_batch: int) -> dict[str, float]:
    """Moving a micro-batch's activations from tensor degree `src_tp` to `dst_tp` and the gradient back
    (`parallel.relayout`: slice to g = gcd, all-gather up to dst in forward; the reverse in backward)."""
    g = math.gcd(src_tp, dst_tp)
    calls = []
    if dst_tp > g:  # forward gathers the rows of dst's larger slice
        calls.append((1, "all_gather", _rows_bytes(work, micro_batch, dst_tp, stage_size), dst_tp // g, g))
    if src_tp > g:  # backward gathers the gradient of src's rows
        calls.append((1, "all_gather", _rows_bytes(work, micro_batch, src_tp, stage_size), src_tp // g, g))
    return hw.corrected(_collectives(hw, "relayout", calls))


def relayout_seconds(hw, work: Workload, src_tp: int, dst_tp: int, stage_size: int, micro_batch: int) -> float:
    return sum(relayout_terms(hw, work, src_tp, dst_tp, stage_size, micro_batch).values()) if src_tp != dst_tp else 0.0


def _rows_bytes(work: Workload, micro_batch: int, tp: int, stage_size: int) -> float:
    """Bytes of the [tokens, dim] activations a rank holds of a micro-batch at tensor degree `tp`."""
    return micro_batch * work.seq_len * tp / stage_size * work.dim * work.activation_bytes


def p2p_terms(hw, work: Workload, tp: int, stage_size: int, micro_batch: int) -> dict[str, float]:
    """A chunk boundary: this rank's activation rows sent forward and their gradient received back."""
    nbytes = _rows_bytes(work, micro_batch, tp, stage_size)
    return hw.corrected(_collectives(hw, "p2p", [(2, "send_recv", nbytes, 2, stage_size)]))


def p2p_seconds(hw, work: Workload, tp: int, stage_size: int, micro_batch: int) -> float:
    return sum(p2p_terms(hw, work, tp, stage_size, micro_batch).values())


def in_flight(schedule: str, pp: int, virtual: int, micro_batches: int, pp_rank: int) -> float:
    """Micro-batches whose activations one chunk of pipeline rank `pp_rank` holds at its peak."""
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(micro_batches)
    if schedule == "1f1b":
        return float(min(micro_batches, pp - pp_rank))
    warmup = (virtual - 1) * pp + 2 * (pp - 1 - pp_rank)
    return min(micro_batches * virtual, warmup + 1) / virtual


def schedule_factor(schedule: str, pp: int, virtual: int, micro_batches: int) -> float:
    """K of the lock-step model: step pipeline time = K x the slowest chunk's micro-batch time."""
    return micro_batches * virtual + (pp - 1) * BUBBLE_FACTOR[schedule]


@dataclass
class ChunkCost:
    """A chunk (the units one pipeline rank runs as one virtual stage) for one micro-batch."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TERMS, 0.0))
    state_bytes: float = 0.0
    activation_bytes: float = 0.0  # per in-flight micro-batch
    transient_bytes: float = 0.0
    host_bytes: float = 0.0

    @property
    def micro_batch_seconds(self) -> float:
        return sum(v for k, v in self.seconds.items() if k != "optimizer")

    def memory(self, inflight: float) -> float:
        return self.state_bytes + inflight * self.activation_bytes + self.transient_bytes

    def add_seconds(self, seconds: dict[str, float]) -> None:
        for term, value in seconds.items():
            self.seconds[term] += value

    def add(self, cost: UnitCost) -> None:
        self.add_seconds(cost.seconds)
        self.seconds["optimizer"] += cost.optimizer_seconds
        self.state_bytes += cost.state_bytes
        self.activation_bytes += cost.activation_bytes
        self.transient_bytes = max(self.transient_bytes, cost.transient_bytes)
        self.host_bytes += cost.host_bytes


@dataclass
class Prediction:
    step_seconds: float
    tokens_per_second: float
    mfu: float | None  # model FLOPs utilisation against the hardware's peak, when it has one
    memory_per_rank: list[float]  # bytes, per pipeline rank (every rank of a stage alike)
    breakdown: dict[str, float]  # seconds per step of each term on the slowest chunk, and the bubble
    fits: bool
    host_bytes: float = 0.0  # per rank, in host memory (DeepSpeed's offload)


def chunk_costs(hw, work: Workload, plan) -> list[ChunkCost]:
    """Every chunk (model stage) of `plan`, costed."""
    layouts = _unit_layouts(plan)
    all_units = units(work)
    size, micro = plan.stage_size, plan.pipeline.micro_batch_size
    chunks = []
    for s, (start, end) in enumerate(plan.pipeline.stages):
        first, last = s == 0, s == len(plan.pipeline.stages) - 1
        span = range(start + 1 - first, end + 1 + last)  # unit indices: the embedding is unit 0
        chunk = ChunkCost()
        previous = layouts[start].tp  # the embedding's, or the previous stage's last layer's
        for u in span:
            layout = layouts[u]
            chunk.add(unit_cost(hw, work, all_units[u], layout, size, micro, plan.engine,
                                plan.pipeline.num_micro_batches))
            chunk.add_seconds(relayout_terms(hw, work, previous, layout.tp, size, micro))
            previous = layout.tp
        if not last:
            chunk.add_seconds(p2p_terms(hw, work, previous, size, micro))
        chunks.append(chunk)
    return chunks


def _unit_layouts(plan) -> list[UnitLayout]:
    return ([UnitLayout(tp=plan.embedding.tp, dp=plan.embedding.dp)]
            + [UnitLayout(tp=l.tp, dp=l.dp, checkpoint=l.checkpoint == "full", ep=l.ep) for l in plan.layers]
            + [UnitLayout(tp=plan.head.tp, dp=plan.head.dp)])


def step_seconds(chunks: list[ChunkCost], schedule: str, pp: int, virtual: int, micro_batches: int) -> float:
    """The lock-step pipeline model: K x the slowest chunk, then v x the slowest chunk's optimizer step."""
    k = schedule_factor(schedule, pp, virtual, micro_batches)
    return max(k * c.micro_batch_seconds + virtual * c.seconds["optimizer"] for c in chunks)


def chunk_memory(chunks: list[ChunkCost], schedule: str, pp: int, virtual: int, micro_batches: int) -> list[float]:
    """Peak bytes of every chunk with its in-flight micro-batches (chunk c runs on pipeline rank c % pp)."""
    return [c.memory(in_flight(schedule, pp, virtual, micro_batches, i % pp)) for i, c in enumerate(chunks)]


def predict(hw, work: Workload, plan) -> Prediction:
    """Step time, throughput and memory per pipeline rank of `plan` (checked against the model before).

    It fits when every chunk needs at most 1 / v of a device's memory: with v virtual stages the
    planner gives each of a rank's chunks an equal share (the search assumes the same). What a
    DeepSpeed plan offloads (one chunk: no pipeline) fits in the host's memory, or, where the
    device is the host (`hw.separate_host` False), in the device's beside the rest."""
    pipe = plan.pipeline
    p, v, m = pipe.degree, pipe.virtual_stages, pipe.num_micro_batches
    chunks = chunk_costs(hw, work, plan)
    seconds = step_seconds(chunks, pipe.schedule, p, v, m)
    memory = chunk_memory(chunks, pipe.schedule, p, v, m)
    k = schedule_factor(pipe.schedule, p, v, m)
    slowest = max(chunks, key=lambda c: k * c.micro_batch_seconds + v * c.seconds["optimizer"])
    breakdown = {t: m * v * s if t != "optimizer" else v * s for t, s in slowest.seconds.items()}
    breakdown["bubble"] = (p - 1) * BUBBLE_FACTOR[pipe.schedule] * slowest.micro_batch_seconds
    tokens = work.global_batch * work.seq_len
    peak = getattr(hw, "peak_flops", None)
    mfu = work.counts.train_flops_per_token * tokens / seconds / (peak * plan.world_size) if peak else None
    host = sum(c.host_bytes for c in chunks)
    device = max(memory) + (0.0 if hw.separate_host else host)
    return Prediction(step_seconds=seconds, tokens_per_second=tokens / seconds, mfu=mfu,
                      memory_per_rank=[sum(memory[r::p]) for r in range(p)], breakdown=breakdown,
                      fits=device <= hw.memory / v and host <= hw.host_memory, host_bytes=host)
