"""Pipeline parallelism from a Plan: stage modules cut from the full model, torch.distributed.pipelining
stages and the plan's schedule, and one training step.

The layout is the plan's (`parallel/plan.py`): model stage ``s`` holds the layers
``plan.pipeline.stages[s]`` (a half-open range) and runs on pipeline rank ``s % degree``; the
first stage also holds the embedding, the last the final norm and the output head. Building
takes two calls so that the other parallelisms can be applied to plain modules in between::

    modules = build_stage_modules(plan, model, pp_rank)   # single-device nn.Modules, one per owned stage
    ...                                                   # tensor / data / expert parallelism on each
    pipe = build_pipeline(plan, modules, group)           # PipelineStages and the plan's schedule
    loss = train_step(pipe, micro_batches)                # forward and backward of one optimizer step
    grad_norm = clip_grad_norm_(pipe, max_norm)
    optimizer.step()

Loss scaling. The one-process loop (`train.loop`) backpropagates ``loss_i / k`` for each of the k
micro-batches (``loss_i`` the mean token cross-entropy of micro-batch i) and sets the MoE
auxiliary losses' gradient to ``1 / k`` (`set_aux_loss_scale`). The pipeline does the same: the
schedule's loss function returns ``loss_i / k`` and the schedule is built with
``scale_grads=False``. With torch's default (``scale_grads=True``) a schedule divides every
gradient by k after its last backward, which suits an undivided loss but would also divide the
auxiliary losses' gradient, already 1 / k through the graph, once more. Without that division the
gradients are the one-process ones whenever they exist, so a data-parallel reduction of a stage
(an average over replicas) needs nothing more, and the per-micro-batch losses sum to the step's
mean loss.

Tied head. With ``tie_embeddings`` the head reads the embedding weight, which lives on the first
stage while the head runs on the last, on another rank. The last stage holds its own copy,
named ``tok_embeddings.weight`` as in the full model; both start equal, and after the backward
the two ranks add their gradients (`train_step`), so the same optimizer step keeps them equal.
`clip_grad_norm_` counts the weight once, as one process does. Both assume plain tensor
gradients: a sharded tied weight would exchange its local shards instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

from stratagem.errors import ConfigError
from stratagem.model.moe import set_aux_loss_scale
from stratagem.model.transformer import Transformer
from stratagem.parallel.grad_norm import clip_grad_norm_ as clip_model_grad_norm_
from stratagem.parallel.plan import Plan, check_plan

Schedule = PipelineScheduleSingle | PipelineScheduleMulti
SCHEDULE_CLASSES: dict[str, type[Schedule]] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}


class StageModule(nn.Module):
    """Layers ``[start, end)`` of a `Transformer`, plus its embedding if `first` and its final norm
    and head if `last`: ``tokens [B, T] -> hidden [B, T, dim]`` on the first stage, ``hidden ->
    hidden`` in the middle, ``-> logits [B, T, vocab_size] float32`` on the last.

    The modules are copies, so stages share no parameters (with each other or the full model).
    Parameter names are the full model's (``tok_embeddings.weight``, ``layers.5.ffn.router.weight``,
    ``norm.weight``, ``output.weight``): the layers sit in a ModuleDict keyed by their index in
    the model, so checkpoints and MoE metrics (``moe/layer5/...``) name them as one process does.
    A last stage of a tied model keeps its own ``tok_embeddings`` for the head (module docstring).
    """

    def __init__(self, model: Transformer, start: int, end: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.tied = model.output is None  # the model's head reads the embedding weight
        self.tok_embeddings = copy.deepcopy(model.tok_embeddings) if first or (last and self.tied) else None
        self.layers = nn.ModuleDict({str(i): copy.deepcopy(model.layers[i]) for i in range(start, end)})
        self.norm = copy.deepcopy(model.norm) if last else None
        self.output = copy.deepcopy(model.output) if last and not self.tied else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.first else x
        for layer in self.layers.values():
            h = layer(h)
        if not self.last:
            return h
        h = self.norm(h)
        logits = F.linear(h, self.tok_embeddings.weight) if self.tied else self.output(h)
        return logits.float()


def stage_indices(plan: Plan, pp_rank: int) -> list[int]:
    """The model stages pipeline rank `pp_rank` runs, in order: those with ``s % degree == pp_rank``."""
    return list(range(pp_rank, len(plan.pipeline.stages), plan.pipeline.degree))


def build_stage_modules(plan: Plan, model: Transformer, pp_rank: int) -> list[StageModule]:
    """The modules of pipeline rank `pp_rank`'s stages, cut from the full single-device `model`.

    The plan is checked against the model first (`check_plan`, as before launch: a plan for
    another model must not cut this one). MoE layers get their auxiliary losses' gradient scale
    1 / num_micro_batches, as in the one-process loop.
    """
    check_plan(plan, model.cfg)
    stages = plan.pipeline.stages
    modules = [StageModule(model, *stages[s], first=s == 0, last=s == len(stages) - 1)
               for s in stage_indices(plan, pp_rank)]
    for module in modules:
        set_aux_loss_scale(module, 1 / plan.pipeline.num_micro_batches)
    return modules


@dataclass
class TiedWeight:
    """This rank's copy of a tied embedding / head weight and the pipeline rank holding the other."""

    weight: nn.Parameter
    peer: int
    counted: bool  # whether the gradient norm counts this copy (the embedding's: yes, the head's: no)


@dataclass
class PipelineRun:
    """What one pipeline rank needs to train: its stage modules (as given, possibly parallelised),
    their PipelineStages, the schedule and the pipeline process group."""

    plan: Plan
    modules: list[nn.Module]
    stages: list[PipelineStage]
    schedule: Schedule
    group: dist.ProcessGroup
    tied: TiedWeight | None
    input_shape: tuple[int, ...] | None = None  # the first step's micro-batch shape: the p2p buffers'

    @property
    def has_first(self) -> bool:
        return any(stage.is_first for stage in self.stages)

    @property
    def has_last(self) -> bool:
        return any(stage.is_last for stage in self.stages)


def build_pipeline(plan: Plan, modules: Sequence[nn.Module], group: dist.ProcessGroup | None = None,
                   loss_divisor: float | None = None) -> PipelineRun:
    """Wrap this rank's stage modules (`build_stage_modules`' order) into PipelineStages on
    `group` (the ranks at the same position of every stage; the default group in a pure
    pipeline) and build the plan's schedule with the loss of the module docstring: each
    micro-batch's mean divided by `loss_divisor` (default: num_micro_batches; the plan runtime
    also divides by the head's data-parallel degree, `parallel.runtime`)."""
    group = dist.group.WORLD if group is None else group
    pipe = plan.pipeline
    if dist.get_world_size(group) != pipe.degree:
        raise ConfigError(f"{plan.source}: pipeline.degree = {pipe.degree}, but the pipeline process group "
                          f"has {dist.get_world_size(group)} ranks")
    pp_rank = dist.get_rank(group)
    stages = [PipelineStage(module, s, len(pipe.stages), next(module.parameters()).device, group=group)
              for s, module in zip(stage_indices(plan, pp_rank), modules, strict=True)]
    cls = SCHEDULE_CLASSES[pipe.schedule]
    schedule = cls(stages[0] if issubclass(cls, PipelineScheduleSingle) else stages, pipe.num_micro_batches,
                   loss_fn=partial(micro_batch_loss, divisor=loss_divisor or pipe.num_micro_batches), scale_grads=False)
    return PipelineRun(plan=plan, modules=list(modules), stages=stages, schedule=schedule, group=group,
                       tied=_tied_weight(modules, pp_rank, pipe.degree))


def _tied_weight(modules: Sequence[nn.Module], pp_rank: int, degree: int) -> TiedWeight | None:
    """The embedding of a tied model on the first stage's rank, or its head copy on the last's."""
    for module in modules:
        if module.tied and module.first != module.last:
            return TiedWeight(module.tok_embeddings.weight, peer=degree - 1 - pp_rank, counted=module.first)
    return None


def micro_batch_loss(logits: torch.Tensor, targets: torch.Tensor, divisor: float) -> torch.Tensor:
    """One micro-batch's mean token cross-entropy over `divisor` (num_micro_batches: the k of a
    step sum to the step's mean, and their gradients to the one-process loop's)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) / divisor


def train_step(pipe: PipelineRun, micro_batches: Sequence[torch.Tensor] | None, forward_only: bool = False) -> float:
    """Forward and backward of one optimizer step; returns its mean loss on every pipeline rank.

    `micro_batches` are the step's num_micro_batches token tensors ``[b, T + 1]`` (inputs
    ``[:, :-1]``, targets ``[:, 1:]``), as the one-process loop reads them; `forward_only` runs the
    schedule's forward-only evaluation instead (no gradients). Only the ranks of the
    first and the last stage read them; the others may pass None. Gradients accumulate into
    ``.grad`` (zero them between steps). The loss is summed on the last stage and all-reduced.
    """
    step_inputs = {}
    if pipe.has_first or pipe.has_last:
        _check_micro_batches(pipe, micro_batches)
    if pipe.has_first:
        step_inputs["arg_mbs"] = [(tokens[:, :-1],) for tokens in micro_batches]
    if pipe.has_last:
        step_inputs["target_mbs"] = [tokens[:, 1:] for tokens in micro_batches]
    losses: list[torch.Tensor] = []
    if forward_only:  # evaluation: the same losses, no backward (`forward_only`)
        pipe.schedule.eval(losses=losses, **step_inputs)
    else:
        pipe.schedule.step(losses=losses, return_outputs=False, **step_inputs)
    if pipe.tied is not None and not forward_only:
        _add_peer_grad(pipe.tied, pipe.group)
    total = torch.stack(losses).sum().detach() if pipe.has_last else torch.zeros(())
    dist.all_reduce(total, group=pipe.group)
    return total.item()


def _check_micro_batches(pipe: PipelineRun, micro_batches: Sequence[torch.Tensor] | None) -> None:
    """One line for what the schedule would otherwise fail on obscurely, or hang on."""
    count = pipe.plan.pipeline.num_micro_batches
    if micro_batches is None or len(micro_batches) != count:
        given = 0 if micro_batches is None else len(micro_batches)
        raise ConfigError(f"{pipe.plan.source}: pipeline.num_micro_batches = {count}, but the step "
                          f"has {given} micro-batches")
    shapes = {tuple(tokens.shape) for tokens in micro_batches}
    expected = pipe.input_shape or next(iter(shapes))
    if shapes != {expected}:
        raise ConfigError(f"pipeline micro-batches all need the shape {list(expected)} (the first one's; the "
                          f"stages' buffers are sized on the first step), got {sorted(map(list, shapes))}")
    pipe.input_shape = expected


def _add_peer_grad(tied: TiedWeight, group: dist.ProcessGroup) -> None:
    """Exchange the tied weight's gradient with the peer rank and add: both copies then hold the
    gradient one process gives the single weight (the embedding's plus the head's)."""
    grad = tied.weight.grad
    if isinstance(grad, DTensor):  # both copies have one layout (the plan ties the head's to the embedding's)
        grad = grad.to_local()
    other = torch.empty_like(grad)
    ops = [dist.P2POp(dist.isend, grad, group=group, group_peer=tied.peer),
           dist.P2POp(dist.irecv, other, group=group, group_peer=tied.peer)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    grad.add_(other)


def clip_grad_norm_(pipe: PipelineRun, max_norm: float) -> float:
    """Scale every stage's gradients so that their global norm is at most `max_norm` (pass inf
    to only measure it), as one process clips the whole model's; returns the norm before.

    The squared norms of the pipeline ranks are summed; the head's copy of a tied weight is left
    out, since one process counts that weight once.
    """
    skipped = pipe.tied.weight if pipe.tied is not None and not pipe.tied.counted else None
    return clip_model_grad_norm_((p for module in pipe.modules for p in module.parameters()), max_norm,
                                 skip=skipped, group=pipe.group)
