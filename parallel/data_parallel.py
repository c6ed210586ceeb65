"""Data parallelism of one module over a 1-D data-parallel DeviceMesh: the plan's three ``dp`` kinds.

``apply_data_parallel(module, mesh, kind)`` makes `module`'s parameters (those not already taken
by an earlier call on a submodule) one communication group over `mesh`, in place:

- ``ddp``: parameters replicated on every rank, gradients all-reduced (mean) in backward;
- ``zero2``: parameters, gradients and optimizer state sharded; a forward all-gathers the
  parameters and keeps them until its backward, which reduce-scatters the gradients;
- ``fsdp``: as zero2, but the parameters are freed after the forward and gathered again in
  backward (the least memory, one more all-gather).

Like `torch.distributed.fsdp.fully_shard`, it is called bottom-up: the plan runtime calls it per
layer, on the embedding and the head, and last on the root module, which takes what is left (the
final norm). Kinds can differ between calls. A mesh of size 1 keeps the parameters whole and
reduces nothing, except for dividing by ``gradient_divide_factor`` if one is given.

All three kinds run on one engine, FSDP2: ``fully_shard`` for zero2 (``reshard_after_forward=
False``) and fsdp, and FSDP2's replicate-only mode (``replicate`` of
``torch.distributed._composable.replicate_with_fsdp``) for ddp. Both were checked on gloo with
torch 2.14 (as was ``fully_shard`` on a (dp, 1) HSDP mesh, which computes the same). FSDP2's
replicate was chosen because it takes the 1-D mesh as it is (the HSDP mesh needs a second mesh
dimension made up for it), and because one engine for every kind lets a model mix kinds per layer
under one root, gives DTensor parameters (so distributed checkpoints treat every kind alike) and
one way to set the gradient divisor; torch's older composable ``replicate`` (DDP's reducer) has
none of the last two. The price: during forward and backward FSDP2's replicate holds a gathered
copy of the parameters beside the replicated ones (tests/test_data_parallel.py measures it).

``gradient_divide_factor``: gradients are summed over the mesh and divided by this instead of the
mesh size. Expert parallelism needs it: an expert's gradient on one rank already sums the tokens
of its whole expert-parallel group (`parallel/expert_parallel.py`). Gloo has no PREMUL_SUM, which
FSDP2 uses for a custom divisor, so a sharded kind on more than one rank reduces with SUM and then
divides (``set_force_sum_reduction_for_comms``). Replicated or on one rank, FSDP2 already divides
its local copy of the gradient before the (SUM) all-reduce, and forcing SUM there would divide twice.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from stratagem.errors import ConfigValueError
from stratagem.parallel.plan import DP_KINDS

__all__ = ["apply_data_parallel", "check_dp_kind"]

# FSDP2 warns, on every rank and for every wrapped module whose output is a view, that an in-place
# op on that output would skip its pre-backward hook. No module here changes another's output in
# place, and every plan's gradients are checked against one process (tests/test_runtime.py), so
# the dozens of lines per run say nothing.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor", category=UserWarning)


def check_dp_kind(kind: str) -> None:
    """Raise `ConfigValueError` (one line) unless `kind` is one of the plan's ``dp`` kinds."""
    if kind not in DP_KINDS:
        raise ConfigValueError("dp", kind, f"unknown data-parallel kind; known: {', '.join(DP_KINDS)}")


def apply_data_parallel(module: nn.Module, mesh: DeviceMesh, kind: str, *,
                        gradient_divide_factor: float | None = None) -> FSDPModule:
    """Make `module` data-parallel over the 1-D `mesh` as `kind` (``ddp``, ``zero2``, ``fsdp``), in
    place; its gradients become sum / `gradient_divide_factor` over the mesh (default: the mean)."""
    check_dp_kind(kind)
    if gradient_divide_factor is not None and gradient_divide_factor <= 0:
        raise ConfigValueError("gradient_divide_factor", gradient_divide_factor, "must be positive")
    if mesh.ndim != 1:
        raise ValueError(f"apply_data_parallel expects a 1-D data-parallel mesh, got {mesh.ndim} dimensions")
    if kind == "ddp":
        replicate(module, mesh=mesh)
    else:
        fully_shard(module, mesh=mesh, reshard_after_forward=kind == "fsdp")
    if gradient_divide_factor is not None:
        module.set_gradient_divide_factor(gradient_divide_factor)
        module.set_force_sum_reduction_for_comms(kind != "ddp" and mesh.size() > 1)
    return module
