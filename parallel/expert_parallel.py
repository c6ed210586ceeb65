"""Expert parallelism: the ranks of an expert-parallel group each keep 1/ep of a MoE layer's experts,
and an all-to-all dispatcher sends every token row to the rank holding its expert and back.

**Mesh.** A layer's data-parallel ranks (dp of them, each training on its own tokens) are laid out
as the 2-D DeviceMesh ``("edp", "ep")`` of shape (dp / ep, ep), row-major over the data-parallel
mesh: data-parallel ranks ``[i * ep, (i + 1) * ep)`` form the i-th expert-parallel group (the plan's
"ep ranks of each data-parallel group of ep"), and the ranks at the same place j of every group form
an expert-data-parallel group: replicas of the same experts. Place j holds the experts
``[j * E / ep, (j + 1) * E / ep)``. `expert_parallel_mesh` lays it over a data-parallel mesh
(DeviceMesh's private ``_unflatten``, torch 2.14's only way to reshape an existing mesh). Building
a mesh is collective over the whole world (its `new_group` calls), so in a pipelined job, where
stages hold different layers, the runtime builds these meshes up front on every rank, as
`parallel.mesh` does for its layouts, and passes them in.

**Forward.** Every rank routes its own tokens over all E experts (the router and the expert bias
stay whole), then `ExpertParallelDispatcher`:

1. ``dispatch``: sorts its kept assignments by expert (`LocalDispatcher`'s gather), so the rows for
   each rank of the group are contiguous; exchanges the per-expert counts (all-to-all of an [E]
   tensor); sends the rows with an autograd-aware all-to-all of the real, uneven split sizes; and
   regroups the received rows, which arrive by source rank, by local expert (ascending, then
   source rank) as `GroupedExperts` expects;
2. ``combine``: undoes the regrouping, sends the expert outputs back by the reverse all-to-all, and
   weights and sums each token's rows as `LocalDispatcher` does;
3. ``reduce_load``: sums the per-expert counts over all dp ranks (every rank that trains the layer
   on different tokens), so the balance loss's f, the aux-loss-free bias and the metrics are those
   of one process on the whole batch.

**Gradients.** With equal token counts per rank, the one-process loss on the whole batch is the
mean over the dp ranks r of their losses L_r. A non-expert parameter's gradient on rank r is
dL_r/dθ: the mean over all dp ranks (`apply_data_parallel`'s default) is right. An expert weight's
gradient on rank r is different: the all-to-all's backward returns to r the gradients of every
token its experts took, from every rank of its expert-parallel group, so it already sums dL_s/dW
over the ep ranks s of the group. Summing that over the expert-data-parallel replicas (one per
group) covers all dp ranks, so the sum must be divided by dp, not by the dp / ep replicas that a
mean would divide by: ``gradient_divide_factor = dp`` (torchtitan divides the same way).

The rows move with ``torch.distributed._functional_collectives.all_to_all_single``, which has
autograd (its backward is the reverse all-to-all): in torch 2.14 it replaces the deprecated
``torch.distributed.nn.functional.all_to_all_single``, which warns on every call; on gloo both
move the same rows and gradients.

Routing, dropping (capacity is per forward call: each rank's own tokens) and the auxiliary losses
stay in `model/moe.py`; this module only swaps the dispatcher and the experts' weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import parallelize_module

from stratagem.errors import ConfigValueError
from stratagem.model.moe import DispatchContext, LocalDispatcher, MoE
from stratagem.parallel.data_parallel import apply_data_parallel, check_dp_kind
from stratagem.parallel.tensor_parallel import LocalParams

__all__ = ["EP_DIMS", "ExpertParallelDispatcher", "apply_expert_parallel", "expert_parallel_mesh",
           "rows_by_local_expert", "split_experts"]

EP_DIMS = ("edp", "ep")  # the expert-parallel mesh: replicas of the same experts x one expert-parallel group


@dataclass
class ExpertParallelContext:
    """What `ExpertParallelDispatcher.combine` needs to bring the expert outputs home."""

    local: DispatchContext  # the sent rows' tokens and routing weights, for the weighted sum
    restore: torch.Tensor  # expert-input row order -> arrival order (by source rank)
    send_splits: list[int]  # rows sent to each rank of the group
    recv_splits: list[int]  # rows received from each


def rows_by_local_expert(received_counts: torch.Tensor) -> torch.Tensor:
    """For rows that arrived grouped by source rank, then local expert (``received_counts[s, l]``
    rows from rank s for expert l), the permutation that groups them by local expert, then source
    rank: ``expert_input = received.index_select(0, order)``. Rows keep their order within a block."""
    ranks, local_experts = received_counts.shape
    expert_of_row = torch.arange(local_experts, device=received_counts.device).repeat(ranks)
    return torch.sort(expert_of_row.repeat_interleave(received_counts.flatten()), stable=True).indices


class ExpertParallelDispatcher:
    """Token movement of a MoE layer whose experts are split over `ep_group` (this rank, at place j
    of the group, holds experts ``[j * E / ep, (j + 1) * E / ep)``); `load_group` is every rank
    that trains the layer on other tokens (the layer's data-parallel group). The methods of
    `LocalDispatcher`; see the module docstring."""

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup, load_group: dist.ProcessGroup):
        self.num_experts = num_experts
        self.ep_group, self.load_group = ep_group, load_group
        self.ep = ep_group.size()
        self.local_experts = num_experts // self.ep
        self._gather = LocalDispatcher(num_experts)

    def dispatch(self, x: torch.Tensor, expert_indices: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ExpertParallelContext]:
        """``x [N, dim]``, ``expert_indices [N, k]`` (global, `DROPPED` = none), ``weights [N, k]`` ->
        ``(expert_input [M, dim] for this rank's experts grouped by local expert, tokens_per_expert
        [E / ep], ctx)``, M the rows all ranks of the group sent here."""
        rows, counts, local = self._gather.dispatch(x, expert_indices, weights)  # rows by global expert
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.ep_group)
        received_counts = received_counts.view(self.ep, self.local_experts)
        send_splits = counts.view(self.ep, self.local_experts).sum(1).tolist()
        recv_splits = received_counts.sum(1).tolist()
        received = funcol.all_to_all_single(rows, recv_splits, send_splits, self.ep_group)
        order = rows_by_local_expert(received_counts)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=order.device)
        ctx = ExpertParallelContext(local=local, restore=restore, send_splits=send_splits, recv_splits=recv_splits)
        return received.index_select(0, order), received_counts.sum(0), ctx

    def combine(self, expert_output: torch.Tensor, ctx: ExpertParallelContext) -> torch.Tensor:
        """``[M, dim]`` expert outputs -> ``[N, dim]``: each row back to its token's rank, then the
        weighted sum over a token's rows (zeros for a token without any)."""
        by_source = expert_output.index_select(0, ctx.restore)
        returned = funcol.all_to_all_single(by_source, ctx.send_splits, ctx.recv_splits, self.ep_group)
        return self._gather.combine(returned, ctx.local)

    def reduce_load(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-expert counts summed over every rank of the layer's data-parallel group."""
        total = counts.clone()
        dist.all_reduce(total, group=self.load_group)
        return total


def expert_parallel_mesh(dp_mesh: DeviceMesh, ep: int) -> DeviceMesh:
    """The ("edp", "ep") mesh of shape (dp / ep, ep) over the 1-D `dp_mesh`, row-major. Collective:
    every rank of the world calls it with the same arguments, in the same order."""
    if ep < 1 or dp_mesh.size() % ep:
        raise ConfigValueError("ep", ep, "must be a positive divisor of the layer's data-parallel size "
                                         f"{dp_mesh.size()}")
    return dp_mesh._unflatten(0, (dp_mesh.size() // ep, ep), EP_DIMS)


def _moe_layers_to_split(model: nn.Module, dp_mesh: DeviceMesh, ep_mesh: DeviceMesh, dp_kind: str,
                         layers: Sequence[int] | None) -> list[int]:
    """The indices of the layers to split, after checking everything (one-line `ConfigValueError`)."""
    check_dp_kind(dp_kind)
    if ep_mesh.mesh_dim_names != EP_DIMS or ep_mesh.mesh.flatten().tolist() != dp_mesh.mesh.tolist():
        raise ValueError(f"the expert-parallel mesh {ep_mesh} must be {EP_DIMS} over {dp_mesh}, row-major "
                         "(see expert_parallel_mesh)")
    ep = ep_mesh.size(1)
    moe = [i for i, block in enumerate(model.layers) if isinstance(block.ffn, MoE)]
    chosen = moe if layers is None else list(layers)
    for i in chosen:
        if i not in moe:
            raise ConfigValueError("layers", chosen,
                                   f"layer {i} has no moe feed-forward (model layers with one: {moe})")
    if ep > 1 and not chosen:
        raise ConfigValueError("ep", ep, "expert parallelism needs moe layers; the model has none")
    for i in chosen:
        num_experts = model.layers[i].ffn.cfg.num_experts
        if num_experts % ep:
            raise ConfigValueError("ep", ep, f"must divide moe.num_experts = {num_experts} (layer {i})")
    return chosen


def split_experts(moe: MoE, ep_mesh: DeviceMesh, load_group: dist.ProcessGroup) -> None:
    """Keep only this rank's experts of `moe` and swap in the all-to-all dispatcher; no data
    parallelism. Over an `ep_mesh` of more than one rank, w1, w2 and w3 become DTensors sharded by
    expert (``Shard(0)``: place j holds ``[j * E / ep, (j + 1) * E / ep)``), whose forward uses the
    local experts (`parallel.tensor_parallel.LocalParams`): checkpoints and gradient norms see the
    whole [E, ...] weights, so a checkpoint reshards to any other expert degree."""
    experts, ep = moe.experts, ep_mesh.size()
    if ep > 1:
        parallelize_module(experts, ep_mesh, LocalParams({name: Shard(0) for name in ("w1", "w2", "w3")}))
    experts.num_experts //= ep
    moe.dispatcher = ExpertParallelDispatcher(moe.cfg.num_experts, ep_mesh.get_group(), load_group)


def apply_expert_parallel(model: nn.Module, dp_mesh: DeviceMesh, ep_mesh: DeviceMesh, *, dp_kind: str,
                          layers: Sequence[int] | None = None) -> None:
    """Split the experts of `model`'s MoE layers (all, or the `layers` indices of ``model.layers``)
    over the "ep" dimension of `ep_mesh` (`expert_parallel_mesh` of the 1-D data-parallel
    `dp_mesh`), and make those layers data-parallel as `dp_kind`: the experts over their replicas
    ("edp", gradients divided by dp), the rest of each layer over `dp_mesh`.

    Call it before `apply_data_parallel` on anything that contains these layers (bottom-up). With
    ep 1 nothing is split, but the load still becomes global over `dp_mesh`. Every problem (ep not
    dividing the expert count, no MoE layer, an unknown kind) is reported before any change.
    """
    chosen = _moe_layers_to_split(model, dp_mesh, ep_mesh, dp_kind, layers)
    for i in chosen:
        block = model.layers[i]
        split_experts(block.ffn, ep_mesh["ep"], dp_mesh.get_group())
        apply_data_parallel(block.ffn.experts, ep_mesh["edp"], dp_kind, gradient_divide_factor=dp_mesh.size())
        apply_data_parallel(block, dp_mesh, dp_kind)
