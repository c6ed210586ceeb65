"""The Plan: a model's parallel layout, layer by layer, as a versioned JSON document.

A planner writes plans, users may write them by hand, and the runtime (issue 6) applies one to a
single-device model. Everything a plan can get wrong is found here, before any process starts:
`load_plan` reads a file strictly, `Plan.validate` checks what needs no model, `check_plan` checks
the plan against a `ModelConfig`. Each problem is one line naming the file, the key path (e.g.
``layers[3].tp``), the value and what is wrong. Importing this module does not import torch.

The document (version 1; every key is required except ``engine``, ``tp_impl``, ``predicted`` and
``notes``)::

    {
      "version": 1,
      "world_size": 4,
      "pipeline": {"degree": 2, "stages": [[0, 3], [3, 4]], "virtual_stages": 1, "schedule": "1f1b",
                   "micro_batch_size": 4, "num_micro_batches": 4},
      "embedding": {"tp": 1, "dp": "fsdp"},
      "head": {"tp": 2, "dp": "fsdp"},
      "layers": [{"tp": 1, "dp": "fsdp", "checkpoint": "full", "ep": 1}, ...],
      "engine": {"kind": "native", "zero_stage": 0, "offload_optimizer": false, "offload_params": false,
                 "offload_ratio": 1.0, "config": ""},
      "tp_impl": "dtensor",
      "predicted": {"step_time_s": null, "peak_memory_bytes": null, "stage_peak_memory_bytes": null},
      "notes": ""
    }

The rules:

- **Pipeline.** ``world_size`` ranks form ``pipeline.degree`` groups of ``world_size / degree``
  ranks (the stage size). ``pipeline.stages`` are half-open layer ranges ``[start, end)``, one per
  model stage: ``degree * virtual_stages`` of them, non-empty, contiguous and covering layers
  ``0 .. n-1`` (uneven sizes allowed). Model stage ``s`` runs on pipeline rank ``s % degree``
  (the interleaved layout of torch.distributed.pipelining), so rank 0 holds the embedding and
  rank ``degree - 1`` the output head. Schedules map to torch.distributed.pipelining:
  ``gpipe`` -> ScheduleGPipe and ``1f1b`` -> Schedule1F1B (one stage per rank: virtual_stages 1;
  1f1b also needs num_micro_batches >= degree), ``interleaved_1f1b`` -> ScheduleInterleaved1F1B
  and ``zero_bubble`` -> ScheduleInterleavedZeroBubble (any virtual_stages; num_micro_batches
  must be a multiple of max(1, num_micro_batches // degree)). With degree 1 there is no pipeline
  and virtual_stages must be 1; the schedule is then unused.
- **Micro-batches.** ``micro_batch_size`` counts the sequences of one micro-batch over all the
  data-parallel ranks of a stage; one optimizer step is ``micro_batch_size * num_micro_batches``
  sequences. A layer with data-parallel degree d gives each of its d groups micro_batch_size / d
  sequences, so every layer's (and the embedding's and head's) d must divide micro_batch_size.
- **Tensor and data parallelism.** A layer (or the embedding, or the head) with tensor degree
  ``tp`` uses its stage's ranks as a (stage_size / tp, tp) mesh: tp divides the stage size and
  the data-parallel degree is stage_size / tp. ``dp`` says how those replicas keep the layer:
  ``ddp`` replicated, ``zero2`` gradients and optimizer state sharded but parameters kept
  gathered, ``fsdp`` everything sharded. ``tp`` must divide what the layer type shards
  (`TP_SHARDS`: heads for mixers, hidden widths for feed-forwards); a layer type without an entry
  there cannot be sharded and needs tp 1. The embedding and the head shard the vocabulary: tp
  divides vocab_size. A model with tied embeddings needs the same layout for both.
- **Expert parallelism** is carved out of a layer's data-parallel ranks: ``ep`` divides
  stage_size / tp, and the experts are split over ep ranks of each data-parallel group of
  ep (each rank holds num_experts / ep experts), so ep divides ``moe.num_experts``. ep > 1 only
  on layers whose feed-forward is ``moe``, and (for now) only with tp 1: a layer's experts are
  split by expert or by width, not both.
- **Activation checkpointing** per layer: ``none`` or ``full`` (recompute the whole layer).
- **Engine.** ``native`` is stratagem's runtime (everything above). ``deepspeed`` hands the whole
  model to DeepSpeed's ZeRO over all ranks: ``zero_stage`` 1 shards optimizer states, 2 also
  gradients, 3 also parameters; ``offload_optimizer`` keeps optimizer states and their update in
  host memory, ``offload_params`` (stage 3) the parameters too, and ``offload_ratio`` (stage 3 with
  optimizer offload) is the fraction of the optimizer's parameter subgroups updated on the host,
  the rest on the device (ZeRO-Offload++). DeepSpeed plans have no pipeline, tp 1 and ep 1
  everywhere, and every ``dp`` says what ZeRO does to that layer: ``zero2`` under stages 1 and 2
  (parameters kept whole), ``fsdp`` under stage 3. ``config`` names a DeepSpeed JSON of the user's,
  laid over the generated one (it may not contradict the plan). Activation checkpointing applies.
- **Tensor-parallel implementation** (``tp_impl``): ``dtensor`` (torch's DTensor styles, every
  layer type in `TP_SHARDS`) or ``megatron`` (megatron-core's ColumnParallelLinear and
  RowParallelLinear, for the layer types in `MEGATRON_TP`).
- **Predicted figures** are a planner's: step time in seconds, the highest peak memory of any
  rank in bytes, and per pipeline rank (``degree`` entries) the peak of that rank's stages.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from stratagem.errors import ConfigError, ConfigValueError

VERSION = 1
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")
DP_KINDS = ("ddp", "zero2", "fsdp")
CHECKPOINTS = ("none", "full")
ENGINES = ("native", "deepspeed")
ZERO_STAGES = (1, 2, 3)
TP_IMPLS = ("dtensor", "megatron")
# The layer types whose linear layers megatron-core's tensor-parallel layers replace (tp_impl "megatron").
MEGATRON_TP = ("attention", "swa", "mlp")

# Which layer types tensor parallelism can shard, and the model config fields (dotted for nested
# sections) its degree must divide. A type missing here cannot be sharded: its layers need tp 1.
TP_SHARDS: dict[str, tuple[str, ...]] = {
    # mixers: attention heads (and KV heads, sharded alongside)
    "attention": ("n_heads", "n_kv_heads"),
    "swa": ("n_heads", "n_kv_heads"),
    "gla": ("n_heads",),
    "deltanet": ("n_heads",),
    "gated_deltanet": ("n_heads",),
    # feed-forwards: the hidden width (column-wise in, row-wise out)
    "mlp": ("ffn_hidden",),
    "moe": ("expert_hidden",),  # each expert's width (ModelConfig.expert_hidden)
}
# Feed-forwards whose experts expert parallelism splits, and the field its degree must divide.
EP_SHARDS: dict[str, str] = {"moe": "moe.num_experts"}


class PlanError(ConfigValueError):
    """One key of a plan holds an impossible value; the message names the plan's file too."""

    def __init__(self, source: str, key: str, value: object, reason: str):
        super().__init__(key, value, reason)
        self.source = source
        self.args = (f"{source}: {key} = {_show(value)}: {reason}",)


@dataclass
class Layout:
    """How the embedding or the output head is laid out over its stage's ranks."""

    tp: int
    dp: str


@dataclass
class LayerLayout(Layout):
    """One transformer layer's layout."""

    checkpoint: str
    ep: int


@dataclass
class Pipeline:
    degree: int
    stages: list[tuple[int, int]]  # half-open layer ranges, one per model stage
    virtual_stages: int
    schedule: str
    micro_batch_size: int  # sequences per micro-batch, over all data-parallel ranks of a stage
    num_micro_batches: int


@dataclass
class Engine:
    """The library that runs the plan: stratagem's own runtime, or DeepSpeed's ZeRO."""

    kind: str = "native"  # native | deepspeed
    zero_stage: int = 0  # deepspeed: 1, 2 or 3
    offload_optimizer: bool = False  # deepspeed: optimizer states and update in host memory
    offload_params: bool = False  # deepspeed stage 3: parameters in host memory
    offload_ratio: float = 1.0  # deepspeed stage 3, optimizer offload: share of the update on the host
    config: str = ""  # deepspeed: the user's DeepSpeed JSON, laid over the generated one

    @property
    def deepspeed(self) -> bool:
        return self.kind == "deepspeed"


@dataclass
class Predicted:
    step_time_s: float | None = None
    peak_memory_bytes: int | None = None  # the highest of any rank
    stage_peak_memory_bytes: list[int] | None = None  # one per pipeline rank


@dataclass
class Plan:
    world_size: int
    pipeline: Pipeline
    embedding: Layout
    head: Layout
    layers: list[LayerLayout]
    engine: Engine = field(default_factory=Engine)
    tp_impl: str = "dtensor"  # dtensor | megatron
    predicted: Predicted = field(default_factory=Predicted)
    notes: str = ""
    # where the plan came from (its file), for messages; not part of the document
    source: str = field(default="plan", compare=False, repr=False)

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage."""
        return self.world_size // self.pipeline.degree

    def dp_degree(self, layout: Layout) -> int:
        """The data-parallel degree of a layer (or the embedding or head) laid out as `layout`."""
        return self.stage_size // layout.tp

    def stage_of(self, layer: int) -> int:
        """The model stage holding `layer`."""
        return next(s for s, (start, end) in enumerate(self.pipeline.stages) if start <= layer < end)

    def to_dict(self) -> dict:
        """The document; ``engine`` and ``tp_impl`` only when they differ from the native defaults."""
        out = {"version": VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "source" or (f.name in _OMITTED_DEFAULTS and value == _OMITTED_DEFAULTS[f.name]):
                continue
            out[f.name] = _plain(value)
        return out

    def to_json(self) -> str:
        """The document as JSON text: one line per layer, ending in a newline."""
        return _format_json(self.to_dict()) + "\n"

    def validate(self) -> None:
        """Check everything that needs no model; raise `PlanError` for the first problem."""
        _validate(self, _failer(self.source))


_OMITTED_DEFAULTS = {"engine": Engine(), "tp_impl": "dtensor"}


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _show(value) -> str:
    """A value as JSON spells it (the file is JSON), e.g. "zero3", null, [[0, 2], [3, 4]]."""
    try:
        return json.dumps(_plain(value))
    except TypeError:
        return repr(value)


def _failer(source: str):
    def fail(key: str, value: object, reason: str) -> typing.NoReturn:
        raise PlanError(source, key, value, reason)

    return fail


# ---------------------------------------------------------------------------------------------
# Reading and writing


def load_plan(path: str | Path) -> Plan:
    """Read and validate (without a model) the plan at `path`; every problem is one ConfigError line."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: plan file not found")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: invalid JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{source}: cannot read: {err}") from None
    return plan_from_dict(document, source)


def plan_from_dict(document: object, source: str = "plan") -> Plan:
    """Build and validate (without a model) a Plan from a parsed JSON document."""
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level, found {_show(document)}")
    document = dict(document)
    if "version" not in document:
        raise ConfigError(f"{source}: missing key 'version' (this stratagem reads plan version {VERSION})")
    version = document.pop("version")
    if version != VERSION or isinstance(version, bool):
        raise PlanError(source, "version", version, f"unknown plan version; this stratagem reads version {VERSION}")
    plan = _read(document, Plan, "", source)
    plan.source = source
    plan.validate()
    return plan


def dump_plan(plan: Plan, path: str | Path) -> None:
    """Write `plan` as JSON to `path` (what `load_plan` reads back to an equal Plan)."""
    Path(path).write_text(plan.to_json())


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _read(value, hint, path: str, source: str):
    """Strictly read JSON `value` as type `hint`; `path` is its key path for messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _read(value, hint, path, source)
    if dataclasses.is_dataclass(hint):
        return _read_object(value, hint, path, source)
    if origin is list:
        if not isinstance(value, list):
            raise PlanError(source, path, value, "expected an array")
        return [_read(item, args[0], f"{path}[{i}]", source) for i, item in enumerate(value)]
    if origin is tuple:
        if not (isinstance(value, list) and len(value) == len(args)):
            raise PlanError(source, path, value, f"expected an array of {len(args)} items")
        return tuple(_read(item, kind, f"{path}[{i}]", source) for i, (item, kind) in enumerate(zip(value, args)))
    accepted = (int, float) if hint is float else hint
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, accepted):
        raise PlanError(source, path, value, f"expected {_KIND_NAMES[hint]}")
    return float(value) if hint is float else value


def _read_object(value, cls, path: str, source: str):
    if not isinstance(value, dict):
        raise PlanError(source, path, value, "expected an object")
    prefix = f"{path}." if path else ""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {prefix}{key}{hint}")
    for name, f in fields.items():
        if name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where = f"{path}: " if path else ""
            raise ConfigError(f"{source}: {where}missing key {name!r}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _read(item, hints[key], prefix + key, source) for key, item in value.items()})


def _format_json(value, indent: str = "") -> str:
    """JSON with objects opened up to the layer level: each layer (and stage list) stays on one line."""
    compact = json.dumps(value)
    inner = indent + "  "
    if isinstance(value, dict) and (not indent or len(compact) > 100):
        items = [f"{inner}{json.dumps(k)}: {_format_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "[\n" + ",\n".join(inner + json.dumps(v) for v in value) + "\n" + indent + "]"
    return compact


# ---------------------------------------------------------------------------------------------
# Validation


def _validate(plan: Plan, fail) -> None:
    pipe = plan.pipeline
    if plan.world_size < 1:
        fail("world_size", plan.world_size, "must be at least 1")
    _positive(fail, "pipeline", pipe, ("degree", "virtual_stages", "micro_batch_size", "num_micro_batches"))
    if plan.world_size % pipe.degree:
        fail("pipeline.degree", pipe.degree, f"does not divide world_size = {plan.world_size}")
    _validate_schedule(pipe, fail)
    _validate_stages(pipe, len(plan.layers), fail)
    for key, layout in _layouts(plan):
        if layout.dp not in DP_KINDS:
            fail(f"{key}.dp", layout.dp, f"unknown data-parallel kind; known: {', '.join(DP_KINDS)}")
        if layout.tp < 1 or plan.stage_size % layout.tp:
            fail(f"{key}.tp", layout.tp, f"does not divide the stage size {plan.stage_size} "
                                         f"(world_size {plan.world_size} / pipeline.degree {pipe.degree})")
        if pipe.micro_batch_size % plan.dp_degree(layout):
            fail("pipeline.micro_batch_size", pipe.micro_batch_size,
                 f"is not a multiple of {key}'s data-parallel degree {plan.dp_degree(layout)} "
                 f"(each data-parallel group gets an equal share of a micro-batch)")
    for i, layer in enumerate(plan.layers):
        if layer.checkpoint not in CHECKPOINTS:
            fail(f"layers[{i}].checkpoint", layer.checkpoint, f"unknown checkpointing; known: {', '.join(CHECKPOINTS)}")
        if layer.ep < 1 or plan.dp_degree(layer) % layer.ep:
            fail(f"layers[{i}].ep", layer.ep,
                 f"does not divide layer {i}'s data-parallel degree {plan.dp_degree(layer)} (stage size "
                 f"{plan.stage_size} / tp {layer.tp}); expert parallelism is carved out of the data-parallel ranks")
        if layer.ep > 1 and layer.tp > 1:
            fail(f"layers[{i}].ep", layer.ep, f"expert parallelism with tp {layer.tp} on the same layer is not "
                                              f"supported yet (experts split by expert or by width, not both); use tp 1")
    if plan.tp_impl not in TP_IMPLS:
        fail("tp_impl", plan.tp_impl, f"unknown tensor-parallel implementation; known: {', '.join(TP_IMPLS)}")
    _validate_engine(plan, fail)
    _validate_predicted(plan.predicted, pipe.degree, fail)


def _validate_engine(plan: Plan, fail) -> None:
    engine = plan.engine
    if engine.kind not in ENGINES:
        fail("engine.kind", engine.kind, f"unknown engine; known: {', '.join(ENGINES)}")
    if not engine.deepspeed:
        defaults = Engine()
        for key in ("zero_stage", "offload_optimizer", "offload_params", "offload_ratio", "config"):
            if getattr(engine, key) != getattr(defaults, key):
                fail(f"engine.{key}", getattr(engine, key), f"is a DeepSpeed setting; engine.kind is {engine.kind}")
        return
    if engine.zero_stage not in ZERO_STAGES:
        fail("engine.zero_stage", engine.zero_stage, "DeepSpeed's ZeRO stage must be 1, 2 or 3")
    if engine.offload_params and engine.zero_stage != 3:
        fail("engine.offload_params", engine.offload_params, f"parameter offload needs ZeRO stage 3, "
                                                             f"engine.zero_stage is {engine.zero_stage}")
    if not 0 < engine.offload_ratio <= 1:
        fail("engine.offload_ratio", engine.offload_ratio, "must lie in (0, 1]")
    if engine.offload_ratio < 1 and not (engine.zero_stage == 3 and engine.offload_optimizer):
        fail("engine.offload_ratio", engine.offload_ratio, "a partial host update needs ZeRO stage 3 with "
                                                           "engine.offload_optimizer")
    if plan.pipeline.degree != 1:
        fail("pipeline.degree", plan.pipeline.degree, "the deepspeed engine runs ZeRO data parallelism only; use 1")
    want = "fsdp" if engine.zero_stage == 3 else "zero2"
    for key, layout in _layouts(plan):
        if layout.tp != 1:
            fail(f"{key}.tp", layout.tp, "the deepspeed engine runs ZeRO data parallelism only; use 1")
        if layout.dp != want:
            fail(f"{key}.dp", layout.dp, f"ZeRO stage {engine.zero_stage} {'shards' if want == 'fsdp' else 'keeps'} "
                                         f"every layer's parameters: use {_show(want)}")
        if getattr(layout, "ep", 1) != 1:
            fail(f"{key}.ep", layout.ep, "the deepspeed engine runs ZeRO data parallelism only; use 1")


def _positive(fail, section: str, obj, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(obj, key) < 1:
            fail(f"{section}.{key}", getattr(obj, key), "must be at least 1")


def _validate_schedule(pipe: Pipeline, fail) -> None:
    if pipe.schedule not in SCHEDULES:
        fail("pipeline.schedule", pipe.schedule, f"unknown schedule; known: {', '.join(SCHEDULES)}")
    if pipe.virtual_stages > 1 and pipe.degree == 1:
        fail("pipeline.virtual_stages", pipe.virtual_stages, "needs a pipeline: pipeline.degree is 1")
    if pipe.degree == 1:
        return
    if pipe.schedule in SINGLE_STAGE_SCHEDULES and pipe.virtual_stages != 1:
        fail("pipeline.virtual_stages", pipe.virtual_stages,
             f"schedule {pipe.schedule} runs one stage per rank; use interleaved_1f1b or zero_bubble")
    if pipe.schedule == "1f1b" and pipe.num_micro_batches < pipe.degree:
        fail("pipeline.num_micro_batches", pipe.num_micro_batches,
             f"schedule 1f1b needs at least pipeline.degree = {pipe.degree} micro-batches")
    rounds = max(1, pipe.num_micro_batches // pipe.degree)
    if pipe.schedule not in SINGLE_STAGE_SCHEDULES and pipe.num_micro_batches % rounds:
        fail("pipeline.num_micro_batches", pipe.num_micro_batches,
             f"schedule {pipe.schedule} needs a multiple of its {rounds} rounds "
             f"(num_micro_batches // pipeline.degree): use a multiple of {pipe.degree}")


def _validate_stages(pipe: Pipeline, n_layers: int, fail) -> None:
    expected = pipe.degree * pipe.virtual_stages
    if len(pipe.stages) != expected:
        fail("pipeline.stages", pipe.stages, f"has {_count(len(pipe.stages), 'stage')}; pipeline.degree "
                                             f"{pipe.degree} x virtual_stages {pipe.virtual_stages} needs {expected}")
    end = 0
    for s, (start, stop) in enumerate(pipe.stages):
        if start != end:
            fail(f"pipeline.stages[{s}]", [start, stop], f"must start at layer {end}, where the previous stage ends")
        if stop <= start:
            fail(f"pipeline.stages[{s}]", [start, stop], "is empty; a stage holds at least one layer")
        end = stop
    if end != n_layers:
        fail(f"pipeline.stages[{len(pipe.stages) - 1}]", list(pipe.stages[-1]),
             f"must end at {n_layers}: the stages cover all {n_layers} entries of layers")


def _validate_predicted(predicted: Predicted, degree: int, fail) -> None:
    for key in ("step_time_s", "peak_memory_bytes"):
        value = getattr(predicted, key)
        if value is not None and value < 0:
            fail(f"predicted.{key}", value, "must not be negative")
    stages = predicted.stage_peak_memory_bytes
    if stages is not None and (len(stages) != degree or any(v < 0 for v in stages)):
        fail("predicted.stage_peak_memory_bytes", stages,
             f"must list {degree} non-negative byte counts, one per pipeline rank")


def _layouts(plan: Plan) -> list[tuple[str, Layout]]:
    return [("embedding", plan.embedding), ("head", plan.head),
            *((f"layers[{i}]", layer) for i, layer in enumerate(plan.layers))]


def check_plan(plan: Plan, model_cfg, world: int | None = None) -> None:
    """Validate `plan` for a model (a `ModelConfig`) and, if given, a job of `world` ranks.

    Raises one `PlanError` / `ConfigError` line naming the plan's source, the key and the layer.
    """
    fail = _failer(plan.source)
    if world is not None and world != plan.world_size:
        fail("world_size", plan.world_size, f"the plan is for {plan.world_size} ranks, the job has {world}")
    plan.validate()
    specs = model_cfg.layer_specs()
    if len(plan.layers) != len(specs):
        raise ConfigError(f"{plan.source}: layers: {len(plan.layers)} entries, "
                          f"but the model has n_layers = {len(specs)}")
    for i, (layer, spec) in enumerate(zip(plan.layers, specs)):
        for kind in (spec.mixer, spec.ffn):
            _check_divides(fail, f"layers[{i}].tp", layer.tp, model_cfg, TP_SHARDS.get(kind),
                           f"layer {i} ({kind})", "tensor parallelism")
        if layer.ep > 1:
            if spec.ffn not in EP_SHARDS:
                fail(f"layers[{i}].ep", layer.ep,
                     f"layer {i}'s feed-forward is {spec.ffn}; expert parallelism needs a moe layer")
            _check_divides(fail, f"layers[{i}].ep", layer.ep, model_cfg, (EP_SHARDS[spec.ffn],),
                           f"layer {i} ({spec.ffn})", "expert parallelism")
        if plan.tp_impl == "megatron" and layer.tp > 1:
            for kind in (spec.mixer, spec.ffn):
                if kind not in MEGATRON_TP:
                    fail(f"layers[{i}].tp", layer.tp, f"layer {i} ({kind}) has no megatron-core tensor-parallel "
                                                      f"layers (tp_impl \"megatron\" covers {', '.join(MEGATRON_TP)}); "
                                                      f"use tp 1 or tp_impl \"dtensor\"")
    for key in ("embedding", "head"):
        _check_divides(fail, f"{key}.tp", getattr(plan, key).tp, model_cfg, ("vocab_size",), f"the {key}",
                       "tensor parallelism")
    if getattr(model_cfg, "tie_embeddings", False) and plan.head != plan.embedding:
        fail("head", plan.head, f"differs from embedding = {_show(plan.embedding)}; the model ties the head "
                                f"to the embedding, so both need one layout")


def _check_divides(fail, key: str, degree: int, model_cfg, fields, what: str, parallelism: str) -> None:
    if degree == 1:
        return
    if fields is None:
        fail(key, degree, f"{what} cannot be sharded (no {parallelism} rule for its type); use 1")
    for name in fields:
        size = _field(model_cfg, name)
        if size is None:
            fail(key, degree, f"the model config has no {name} for {what}")
        if size % degree:
            fail(key, degree, f"does not divide {name} = {size} of {what}")


def _field(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


# ---------------------------------------------------------------------------------------------
# Building and describing


def even_stages(n_layers: int, count: int) -> list[tuple[int, int]]:
    """`count` contiguous layer ranges covering `n_layers`, sizes differing by at most one (larger first)."""
    if not 1 <= count <= n_layers:
        raise ConfigValueError("pipeline.stages", count, f"cannot split {n_layers} layers into {count} stages")
    base, extra = divmod(n_layers, count)
    bounds = [0]
    for s in range(count):
        bounds.append(bounds[-1] + base + (s < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def uniform_plan(model_cfg, world: int, tp: int = 1, pp: int = 1, dp: str = "ddp", *, checkpoint: str = "none",
                 ep: int = 1, virtual_stages: int = 1, schedule: str = "1f1b", micro_batch_size: int | None = None,
                 num_micro_batches: int | None = None, notes: str = "") -> Plan:
    """The same layout for every layer: `pp` even stages of world / pp ranks, each a (dp, tp) mesh.

    `ep` applies to the moe layers (the others get 1). By default a micro-batch gives every
    data-parallel rank one sequence and there are `pp` micro-batches. Checked against the model.
    """
    specs = model_cfg.layer_specs()
    if ep > 1 and not any(spec.ffn in EP_SHARDS for spec in specs):
        raise PlanError("uniform plan", "ep", ep, "the model has no moe layer to split into experts")
    n_stages = pp * virtual_stages
    stages = even_stages(len(specs), n_stages) if 1 <= n_stages <= len(specs) else []  # else validate() says why
    dp_ranks = world // pp // tp if pp >= 1 and tp >= 1 else 1
    plan = Plan(
        world_size=world,
        pipeline=Pipeline(degree=pp, stages=stages, virtual_stages=virtual_stages, schedule=schedule,
                          micro_batch_size=micro_batch_size or max(1, dp_ranks),
                          num_micro_batches=num_micro_batches or max(1, pp)),
        embedding=Layout(tp=tp, dp=dp),
        head=Layout(tp=tp, dp=dp),
        layers=[LayerLayout(tp=tp, dp=dp, checkpoint=checkpoint, ep=ep if spec.ffn in EP_SHARDS else 1)
                for spec in specs],
        notes=notes,
        source="uniform plan",
    )
    check_plan(plan, model_cfg)
    return plan


def deepspeed_plan(model_cfg, world: int, zero_stage: int, *, offload_optimizer: bool = False,
                   offload_params: bool = False, offload_ratio: float = 1.0, config: str = "",
                   checkpoint: str = "none", micro_batch_size: int | None = None,
                   num_micro_batches: int = 1, notes: str = "") -> Plan:
    """The whole model under DeepSpeed's ZeRO `zero_stage` over `world` ranks (every layout tp 1,
    ep 1, dp as the stage implies); checked against the model."""
    plan = uniform_plan(model_cfg, world, dp="fsdp" if zero_stage == 3 else "zero2", checkpoint=checkpoint,
                        micro_batch_size=micro_batch_size, num_micro_batches=num_micro_batches, notes=notes)
    plan.engine = Engine(kind="deepspeed", zero_stage=zero_stage, offload_optimizer=offload_optimizer,
                         offload_params=offload_params, offload_ratio=offload_ratio, config=config)
    plan.source = f"deepspeed ZeRO-{zero_stage} plan"
    check_plan(plan, model_cfg)
    return plan


def summary(plan: Plan) -> str:
    """One line: the mesh, the layers' degrees and kinds, and the pipeline schedule."""
    pipe = plan.pipeline
    tps = sorted({layer.tp for layer in plan.layers})
    kinds = [k for k in DP_KINDS if any(layer.dp == k for layer in plan.layers)]
    eps = sorted({layer.ep for layer in plan.layers})
    checkpointed = sum(layer.checkpoint != "none" for layer in plan.layers)
    engine = f", {engine_summary(plan.engine)}" if plan.engine.deepspeed else ""
    return (f"{plan.world_size} ranks = pipeline {pipe.degree} x {plan.stage_size}{engine}, "
            f"{_count(len(plan.layers), 'layer')} in {_count(len(pipe.stages), 'stage')}, "
            f"tp {'/'.join(map(str, tps))}, dp {'/'.join(kinds)}, ep {'/'.join(map(str, eps))}, "
            f"{checkpointed} checkpointed, {_batches(pipe)}")


def describe(plan: Plan, specs=None) -> str:
    """A header (world, pipeline, stages, predicted figures, notes) and a per-layer table.

    `specs`, the model's `LayerSpec`s, adds the layer types.
    """
    pipe = plan.pipeline
    lines = [f"world       {plan.world_size} ranks = pipeline {pipe.degree} x {plan.stage_size} ranks per stage",
             f"pipeline    {_count(len(pipe.stages), 'stage')} ({pipe.virtual_stages} per pipeline rank), "
             f"{_batches(pipe)}",
             "stages      " + ", ".join(f"{s}: {_layer_range(a, b)} (rank {s % pipe.degree})"
                                        for s, (a, b) in enumerate(pipe.stages))]
    p = plan.predicted
    figures = []
    if p.step_time_s is not None:
        figures.append(f"step time {p.step_time_s:.4g} s")
    if p.peak_memory_bytes is not None:
        figures.append(f"peak memory {_gib(p.peak_memory_bytes)} per rank")
    if p.stage_peak_memory_bytes is not None:
        figures.append("by pipeline rank " + ", ".join(map(_gib, p.stage_peak_memory_bytes)))
    if figures:
        lines.append("predicted   " + "; ".join(figures))
    if plan.engine.deepspeed:
        lines.append("engine      " + engine_summary(plan.engine))
    if plan.tp_impl != "dtensor":
        lines.append(f"tp layers   {plan.tp_impl}")
    if plan.notes:
        lines.append("notes       " + plan.notes)
    lines.append("")
    types_ = ("mixer", "ffn") if specs is not None else ()
    header = ("layer", *types_, "stage", "tp", "dp", "dp kind", "ep", "checkpoint")
    last = len(pipe.stages) - 1
    rows = [("embed", *("embedding", "-")[:len(types_)], "0", *_cells(plan, plan.embedding), "-", "-")]
    for i, layer in enumerate(plan.layers):
        kinds = (specs[i].mixer, specs[i].ffn) if specs is not None else ()
        rows.append((str(i), *kinds, str(plan.stage_of(i)), *_cells(plan, layer), str(layer.ep), layer.checkpoint))
    rows.append(("head", *("output", "-")[:len(types_)], str(last), *_cells(plan, plan.head), "-", "-"))
    widths = [max(len(row[c]) for row in (header, *rows)) for c in range(len(header))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    table.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + table)


def engine_summary(engine: Engine) -> str:
    """E.g. "deepspeed ZeRO-3, optimizer offloaded (60% of the update on the host), parameters offloaded"."""
    if not engine.deepspeed:
        return engine.kind
    parts = [f"deepspeed ZeRO-{engine.zero_stage}"]
    if engine.offload_optimizer:
        share = f" ({engine.offload_ratio:.0%} of the update on the host)" if engine.offload_ratio < 1 else ""
        parts.append(f"optimizer offloaded{share}")
    if engine.offload_params:
        parts.append("parameters offloaded")
    if engine.config:
        parts.append(f"over {engine.config}")
    return ", ".join(parts)


def _cells(plan: Plan, layout: Layout) -> tuple[str, str, str]:
    return str(layout.tp), str(plan.dp_degree(layout)), layout.dp


def _layer_range(start: int, end: int) -> str:
    return f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"


def _count(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _batches(pipe: Pipeline) -> str:
    schedule = f"schedule {pipe.schedule}" if pipe.degree > 1 else "no pipeline schedule"
    return (f"{_count(pipe.num_micro_batches, 'micro-batch', 'micro-batches')} x "
            f"{_count(pipe.micro_batch_size, 'sequence')}, {schedule}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
