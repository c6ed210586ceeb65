"""The device meshes of a Plan, built once, collectively, and shared by every layer of a stage.

A Plan (`parallel.plan`) splits the world into ``pp`` pipeline groups of ``S = world / pp``
consecutive ranks, and lays each layer out on its stage as a (dp, tp) mesh of shape (S / tp, tp):
stage rank r (rank minus the stage's first rank) has dp index ``r // tp`` and tp index ``r % tp``.

Why one world-wide mesh per shape. DeviceMesh creates its process groups with `new_group`, which
every rank of the world must call, for every group, in the same order, members or not. A stage
cannot build its own meshes alone. So each shape is built as one mesh over the whole world,
("pp", "dp", "tp") of shape (pp, S / tp, tp); rank r's row of the "pp" dimension is its own
stage, and slicing ("dp", "tp") gives that stage's mesh. Every rank builds every shape a plan
needs, in the plan's order (`StageMeshes.for_plan`), before any layer runs; afterwards nothing
is created, only looked up. Layers (and stages) of the same tensor degree share one mesh and
its groups.

Relayout (`parallel.relayout`) also needs, for tensor degrees ``small`` dividing ``big``, the
groups of ``big / small`` ranks that share the dp index under ``big`` and the tp index under
``small``: the "group" dimension of a ("pp", "dp", "group", "tp") mesh of shape
(pp, S / big, big / small, small). Their ranks hold consecutive batch slices under ``small``
which together make one slice under ``big``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from math import gcd

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

LAYOUT_DIMS = ("pp", "dp", "tp")
GROUP_DIMS = ("pp", "dp", "group", "tp")


def relayout_steps(src_tp: int, dst_tp: int) -> list[tuple[int, int]]:
    """The (small, big) degree pairs whose groups relayout src_tp -> dst_tp uses.

    Through g = gcd(src, dst): a local slice src -> g (its backward gathers over (g, src)),
    then a gather g -> dst over (g, dst). A step with small == big moves nothing and is left out.
    """
    g = gcd(src_tp, dst_tp)
    return [(g, big) for big in (src_tp, dst_tp) if big != g]


def stage_tps(plan, stage: int) -> list[int]:
    """The tensor degrees model stage `stage` of `plan` runs, in the order activations meet them:
    the embedding (first stage) or the previous stage's last layer (whose layout its input
    arrives in), its layers, and the head (last stage)."""
    stages = plan.pipeline.stages
    start, end = stages[stage]
    before = plan.embedding.tp if stage == 0 else plan.layers[start - 1].tp
    return ([before] + [layer.tp for layer in plan.layers[start:end]]
            + ([plan.head.tp] if stage == len(stages) - 1 else []))


class StageMeshes:
    """Every mesh of a job's layouts: this rank's stage as (dp, tp) meshes and relayout groups.

    ``stage_tps`` lists, for every model stage, the tensor degrees it runs in order (embedding,
    layers, head). Building is collective: every rank must construct StageMeshes with the same
    arguments, at the same point of the program.
    """

    def __init__(self, world_size: int, pp_degree: int, stage_tps: Sequence[Sequence[int]],
                 device_type: str = "cpu", expert_layouts: Sequence[tuple[int, int]] = ()):
        if world_size % pp_degree:
            raise ValueError(f"pipeline degree {pp_degree} does not divide world size {world_size}")
        self.world_size, self.pp_degree = world_size, pp_degree
        self.stage_size = world_size // pp_degree
        self.device_type = device_type
        # the ranks at one place of every stage: the pipeline's point-to-point partners
        self.pipeline = self._world((self.stage_size,), ("pp", "stage"))["pp"] if pp_degree > 1 else None
        self._layouts: dict[int, DeviceMesh] = {}
        self._groups: dict[tuple[int, int], DeviceMesh] = {}
        for tps in stage_tps:
            for tp in tps:
                if tp < 1 or self.stage_size % tp:
                    raise ValueError(f"tensor degree {tp} does not divide the stage size {self.stage_size}")
                if tp not in self._layouts:
                    self._layouts[tp] = self._world((self.stage_size // tp, tp), LAYOUT_DIMS)["dp", "tp"]
            for src, dst in pairwise(tps):
                for small, big in relayout_steps(src, dst):
                    if (small, big) not in self._groups:
                        shape = (self.stage_size // big, big // small, small)
                        self._groups[small, big] = self._world(shape, GROUP_DIMS)["group"]

        # ("edp", "ep") meshes of the (tp, ep) layouts of MoE layers (`parallel.expert_parallel`)
        from stratagem.parallel.expert_parallel import expert_parallel_mesh

        self._experts = {(tp, ep): expert_parallel_mesh(self.layout(tp)["dp"], ep) for tp, ep in expert_layouts}

    @classmethod
    def for_plan(cls, plan, device_type: str = "cpu") -> StageMeshes:
        """The meshes a `Plan` needs: every stage's layouts, in layer order, their relayouts, and
        an experts mesh for every (tp, ep) pair of its layers (a plan does not know which layers
        are MoE; a few unused groups cost less than a second pass)."""
        return cls(plan.world_size, plan.pipeline.degree, [stage_tps(plan, s) for s in range(len(plan.pipeline.stages))],
                   device_type, sorted({(layer.tp, layer.ep) for layer in plan.layers}))

    def experts(self, tp: int, ep: int) -> DeviceMesh:
        """The ("edp", "ep") mesh of a MoE layer of tensor degree `tp` and expert degree `ep`."""
        return self._lookup(self._experts, (tp, ep))

    def layout(self, tp: int) -> DeviceMesh:
        """This rank's stage as the 2-D ("dp", "tp") mesh of shape (stage_size / tp, tp)."""
        return self._lookup(self._layouts, tp)

    def group(self, small: int, big: int) -> DeviceMesh:
        """The 1-D mesh of the big / small ranks sharing this rank's dp index under `big` and tp
        index under `small`, in the order of their batch slices under `small`."""
        return self._lookup(self._groups, (small, big))

    def _world(self, shape: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
        """One mesh over the whole world: every stage's ranks in one row of the "pp" dimension."""
        return init_device_mesh(self.device_type, (self.pp_degree, *shape), mesh_dim_names=names)

    def _lookup(self, meshes: dict, key) -> DeviceMesh:
        if key not in meshes:
            raise KeyError(f"no mesh for {key} over stages of {self.stage_size} ranks: meshes are built "
                           f"collectively up front, so list every layout in StageMeshes(stage_tps=...)")
        return meshes[key]
