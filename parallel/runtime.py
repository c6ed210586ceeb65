"""Apply a Plan to a single-device `Transformer` on this rank, and train it: the parallel runtime.

Every rank builds the same full model (same seed), then `parallelize(model, plan)` keeps and lays
out this rank's part, each parallelism applied by its own module, in this order:

1. meshes, collectively, for every layout of the plan (`parallel.mesh.StageMeshes`); rank r is
   stage-local rank ``r % stage_size`` of pipeline rank ``r // stage_size``;
2. the stage modules of this pipeline rank, cut by layer range (`parallel.pipeline`), names as in
   the full model;
3. per layer: experts split over the expert-parallel group (`parallel.expert_parallel`: every MoE
   layer with data-parallel degree > 1 gets the all-to-all dispatcher, so its load statistics
   are global even with ep 1), tensor parallelism (`parallel.tensor_parallel`), activation
   checkpointing (torch's checkpoint wrapper), a relayout of the incoming activations when the
   layer's tensor degree differs from the one before (`parallel.relayout`), and data parallelism
   of the plan's kind over the layer's dp mesh (`parallel.data_parallel`; experts over their
   replicas); the same for the embedding and the head;
4. with more than one pipeline rank, PipelineStages and the plan's schedule.

Loss and gradient convention (`parallel.relayout`): a rank's loss on a micro-batch is the mean
token loss of the rows it holds at the head, divided by the number of micro-batches and by the
head's dp degree; summed over the head's dp groups and the micro-batches this is the one-process
mean. Data parallelism therefore sums gradients (divide factor 1) for every layer, and each MoE
layer's auxiliary losses are scaled by 1 / (micro-batches x that layer's dp degree): each dp
group adds its own tokens' share. Every plan then computes the one-process loss and gradients.

Data: every rank is handed the step's global micro-batches (``[micro_batch_size, T + 1]`` each)
and takes its rows: inputs at the embedding's layout, targets at the head's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from stratagem.model.moe import MoE, moe_metrics, update_expert_biases
from stratagem.model.transformer import Transformer
from stratagem.train.engine import Engine, StateView
from stratagem.parallel.data_parallel import apply_data_parallel
from stratagem.parallel.deepspeed_engine import check_deepspeed_config
from stratagem.parallel.expert_parallel import split_experts
from stratagem.parallel.grad_norm import clip_grad_norm_
from stratagem.parallel.megatron_tp import parallelize_block_megatron
from stratagem.parallel.mesh import StageMeshes, stage_tps
from stratagem.parallel.pipeline import (PipelineRun, StageModule, build_pipeline, build_stage_modules,
                                         stage_indices)
from stratagem.parallel.pipeline import train_step as pipeline_train_step
from stratagem.errors import ConfigError
from stratagem.parallel.plan import Plan, check_plan, uniform_plan
from stratagem.parallel.relayout import local_batch, relayout
from stratagem.parallel.tensor_parallel import parallelize_block, parallelize_embedding, parallelize_head

__all__ = ["ParallelModel", "check_train_plan", "default_plan", "parallelize"]


def default_plan(config, world: int) -> Plan:
    """Plain data parallelism (ddp) over `world` ranks with the config's batch: each rank takes
    train.micro_batch_size sequences of every micro-batch."""
    sequences = config.train.global_batch_tokens // config.data.seq_len
    micro = config.train.micro_batch_size * world
    if sequences % micro:
        raise ConfigError(f"train.global_batch_tokens = {config.train.global_batch_tokens}: {sequences} sequences "
                          f"per step do not split into micro-batches of train.micro_batch_size x {world} ranks = {micro}")
    plan = uniform_plan(config.model, world, micro_batch_size=micro, num_micro_batches=sequences // micro)
    plan.source = f"data-parallel plan for {world} ranks"
    return plan


def check_train_plan(config, plan: Plan, world: int) -> None:
    """Everything a run under `plan` needs of the config, as one line, before any process starts:
    the plan fits the model and the world, and it cuts the config's batch."""
    check_plan(plan, config.model, world=world)
    pipe, tc = plan.pipeline, config.train
    sequences = pipe.micro_batch_size * pipe.num_micro_batches
    if sequences * config.data.seq_len != tc.global_batch_tokens:
        raise ConfigError(f"{plan.source}: pipeline.micro_batch_size x num_micro_batches = {sequences} sequences of "
                          f"data.seq_len {config.data.seq_len} per step, but train.global_batch_tokens = "
                          f"{tc.global_batch_tokens}")
    held_out = tc.micro_batch_size * tc.eval_batches  # the evaluation set, re-cut into the plan's micro-batches
    chunks = pipe.num_micro_batches if pipe.degree > 1 else 1  # pipelined evaluation runs whole schedules
    if held_out % (pipe.micro_batch_size * chunks):
        raise ConfigError(f"{plan.source}: the {held_out} held-out sequences (train.micro_batch_size x eval_batches) "
                          f"do not split into {chunks} x {pipe.micro_batch_size}-sequence micro-batches of the plan")
    if plan.engine.deepspeed:
        check_deepspeed_config(plan, tc)
    if tc.autocast != "none":
        raise ConfigError(f"train.autocast = {tc.autocast!r}: not supported under a parallel plan yet; use \"none\"")


@dataclass
class ParallelModel(Engine):
    """This rank's part of a model laid out by a plan: what the training loop drives."""

    plan: Plan
    meshes: StageMeshes
    modules: list[StageModule]  # this pipeline rank's stage modules, parameter names as the full model's
    pipe: PipelineRun | None  # None without pipelining (one stage)

    def parameters(self):
        return [p for module in self.modules for p in module.parameters()]

    @functools.cached_property
    def state_module(self) -> StateView:
        """This rank's modules under the full model's parameter names (optimizer, checkpoints)."""
        return StateView(self.modules)

    @property
    def head_dp(self):
        return self.meshes.layout(self.plan.head.tp)["dp"]

    def train_step(self, micro_batches: list[torch.Tensor]) -> float:
        """Forward and backward of one optimizer step on the step's global micro-batches; returns
        the step's mean loss (the same on every rank). Gradients accumulate: zero them between steps."""
        if self.pipe is not None:
            local = [self._inputs_and_targets(tokens) for tokens in micro_batches]
            total = pipeline_train_step(self.pipe, local)
        else:
            total = 0.0
            divisor = len(micro_batches) * self.head_dp.size()
            for tokens in micro_batches:
                loss = self._local_loss(tokens) / divisor
                loss.backward()
                total += loss.detach()
        return _sum_over(total, self.head_dp)

    def _local_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Without pipelining: the mean token loss of this rank's rows of a global micro-batch."""
        inputs = local_batch(tokens, self.meshes.layout(self.plan.embedding.tp))[:, :-1]
        targets = local_batch(tokens, self.meshes.layout(self.plan.head.tp))[:, 1:]
        return F.cross_entropy(self.modules[0](inputs).flatten(0, 1), targets.flatten())

    def _inputs_and_targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pipeline reads inputs (first stage) and targets (last stage) from one tensor: this
        rank's rows at the embedding's layout on the first stage's rank, at the head's on the
        last's (with more than one pipeline rank no rank holds both)."""
        layout = self.plan.embedding if self.pipe.has_first else self.plan.head
        return local_batch(tokens, self.meshes.layout(layout.tp))

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        """Mean loss over `batches` (global micro-batches) in eval mode, on every rank; under
        pipelining in groups of num_micro_batches (a multiple of it: `check_train_plan`)."""
        for module in self.modules:
            module.eval()
        if self.pipe is not None:
            k = self.plan.pipeline.num_micro_batches
            groups = [batches[i:i + k] for i in range(0, len(batches), k)]
            total = sum(pipeline_train_step(self.pipe, [self._inputs_and_targets(t) for t in group], forward_only=True)
                        for group in groups) / len(groups)
        else:
            divisor = len(batches) * self.head_dp.size()
            total = sum(self._local_loss(tokens).item() for tokens in batches) / divisor
        for module in self.modules:
            module.train()
        return _sum_over(total, self.head_dp)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip as one process clips the whole model (`parallel.grad_norm`); the norm before."""
        tied = self.pipe.tied if self.pipe is not None else None
        return clip_grad_norm_(self.parameters(), max_norm, skip=tied.weight if tied and not tied.counted else None,
                               group=self.pipe.group if self.pipe is not None else None)

    def after_optimizer_step(self) -> None:
        """Aux-loss-free MoE bias updates (their loads are global, so every replica moves alike)."""
        for module in self.modules:
            update_expert_biases(module)

    def moe_metrics(self) -> dict[str, float]:
        """Every MoE layer's step statistics, gathered from the pipeline ranks that hold them."""
        mine = {}
        for module in self.modules:
            mine.update(moe_metrics(module))
        if self.pipe is None:
            return mine
        gathered = [None] * dist.get_world_size(self.pipe.group)
        dist.all_gather_object(gathered, mine, group=self.pipe.group)
        return {key: value for part in gathered for key, value in sorted(part.items())}


def _sum_over(value, mesh) -> float:
    total = torch.as_tensor(value, dtype=torch.float64).clone()
    dist.all_reduce(total, group=mesh.get_group())
    return total.item()


def parallelize(model: Transformer, plan: Plan) -> ParallelModel:
    """Lay out `model` (full weights, the same on every rank) by `plan` on this rank; collective."""
    check_plan(plan, model.cfg, world=dist.get_world_size())
    meshes = StageMeshes.for_plan(plan)
    pp_rank = dist.get_rank() // plan.stage_size
    modules = build_stage_modules(plan, model, pp_rank)
    for stage, module in zip(stage_indices(plan, pp_rank), modules, strict=True):
        _parallelize_stage(module, stage, plan, meshes)
    pipe = None
    if plan.pipeline.degree > 1:
        head_dp = plan.dp_degree(plan.head)
        pipe = build_pipeline(plan, modules, meshes.pipeline.get_group(),
                              loss_divisor=plan.pipeline.num_micro_batches * head_dp)
    return ParallelModel(plan=plan, meshes=meshes, modules=modules, pipe=pipe)


def _parallelize_stage(module: StageModule, stage: int, plan: Plan, meshes: StageMeshes) -> None:
    """Tensor, expert and data parallelism, checkpointing and relayouts of one stage module."""
    tps = stage_tps(plan, stage)  # [incoming layout, layers..., head if last]
    head = meshes.layout(plan.head.tp)
    if module.first or (module.last and module.tied):
        parallelize_embedding(module, meshes.layout(plan.embedding.tp)["tp"])
    if module.last:
        parallelize_head(module, head["tp"])
    micro_batches = plan.pipeline.num_micro_batches
    for position, (key, block) in enumerate(list(module.layers.items())):
        index, layout = int(key), plan.layers[int(key)]
        mesh = meshes.layout(layout.tp)
        dp_mesh = mesh["dp"]
        experts_mesh = None
        if isinstance(block.ffn, MoE):
            block.ffn.aux_loss_scale = 1 / (micro_batches * dp_mesh.size())
            if dp_mesh.size() > 1:
                experts_mesh = meshes.experts(layout.tp, layout.ep)
                split_experts(block.ffn, experts_mesh["ep"], dp_mesh.get_group())
        if plan.tp_impl == "megatron" and layout.tp > 1:
            parallelize_block_megatron(block, mesh["tp"])
        else:
            parallelize_block(block, mesh["tp"], index)
        if experts_mesh is not None:
            apply_data_parallel(block.ffn.experts, experts_mesh["edp"], layout.dp, gradient_divide_factor=1)
        if layout.checkpoint == "full":
            block = module.layers[key] = checkpoint_wrapper(block)
        if tps[position] != layout.tp:
            block.register_forward_pre_hook(_relayout_hook(meshes, tps[position], layout.tp))
        apply_data_parallel(block, dp_mesh, layout.dp, gradient_divide_factor=1)
    if module.last:
        last_tp = tps[-2]
        if last_tp != plan.head.tp:
            module.norm.register_forward_pre_hook(_relayout_hook(meshes, last_tp, plan.head.tp))
        if not module.tied:
            apply_data_parallel(module.norm, head["dp"], plan.head.dp, gradient_divide_factor=1)
            apply_data_parallel(module.output, head["dp"], plan.head.dp, gradient_divide_factor=1)
    if module.first and not module.tied:
        embedding = meshes.layout(plan.embedding.tp)
        apply_data_parallel(module.tok_embeddings, embedding["dp"], plan.embedding.dp, gradient_divide_factor=1)
    # the root takes what is left: a tied embedding (read by the head, not only called) and its norm
    root = plan.head if module.last else plan.embedding
    apply_data_parallel(module, meshes.layout(root.tp)["dp"], root.dp, gradient_divide_factor=1)


def _relayout_hook(meshes: StageMeshes, src_tp: int, dst_tp: int):
    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (relayout(args[0], meshes, src_tp, dst_tp), *args[1:])

    return hook
