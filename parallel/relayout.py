"""Moving activations between consecutive layers of different (dp, tp) layouts inside a stage.

Layout. A stage of S ranks runs a layer of tensor degree t as a (S / t, t) mesh (`parallel.mesh`).
The stage's micro-batch is split contiguously along the batch into S / t slices; stage rank r
holds slice ``r // t``, replicated over its tp group (the t ranks of that dp index), and every
layer takes and returns such plain, replicated tensors. So only the batch rows a rank holds
change between layouts, never a tensor's other dimensions.

Going from degree t1 to t2:

- t1 divides t2 (fewer, larger slices): all-gather along the batch over the t2 / t1 ranks that
  share the new dp index and the old tp index (`StageMeshes.group(t1, t2)`); they hold the
  consecutive old slices that make up the new one. Its backward keeps this rank's rows of the
  gradient and sums nothing: the gradient arrives replicated over the t2 group, each replica
  already the whole gradient of those rows, so a sum would count it t2 / t1 times.
- t2 divides t1 (more, smaller slices): a local slice, no communication. Its backward
  all-gathers the gradient over the same kind of group (t1 / t2 ranks), because the layer before
  needs the gradient of all its rows on every replica. (Zero-padding the gradient and leaving the
  sum to the tp group's reduction would not do: only the sharded parts of a layer reduce over
  tp; its residual path and replicated parameters take their gradient as it comes.)
- Neither divides the other: both steps, through g = gcd(t1, t2): slice to g, gather to t2. The
  gather then moves exactly the rows the rank lacks at degree g, and both steps reuse the
  groups above. Each step is a DTensor redistribution (Replicate <-> Shard(0) on a 1-D group
  mesh), whose autograd gives exactly the backward described.

Loss and gradient convention. Every rank computes its loss on the rows it holds at the output
head's layout, normalised by the stage's whole micro-batch: ``sum of its token losses /
(tokens of the micro-batch)``, i.e. its slice's mean divided by the head's dp degree. The sum of
these over the head's dp groups (one rank per group: tp replicas hold the same value) is the
one-process mean. Every activation gradient a rank holds is then the full gradient of that
total for its rows, replicated over its tp group, and a parameter's gradient on a rank is its dp
group's share of the total: data parallelism must SUM parameter gradients over each layer's dp
ranks (``gradient_divide_factor=1``), whatever that layer's dp degree. Averaging over the
layer's own dp degree would be wrong as soon as two layers' degrees differ.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from stratagem.parallel.mesh import StageMeshes, relayout_steps


def relayout(x: torch.Tensor, meshes: StageMeshes, src_tp: int, dst_tp: int) -> torch.Tensor:
    """This rank's batch rows of `x` under tensor degree `src_tp` -> its rows under `dst_tp`."""
    for small, big in relayout_steps(src_tp, dst_tp):
        group = meshes.group(small, big)
        x = _split(x, group) if big == src_tp else _gather(x, group)
    return x


def _gather(x: torch.Tensor, group: DeviceMesh) -> torch.Tensor:
    """Concatenate the group's slices along the batch; backward keeps this rank's slice."""
    return DTensor.from_local(x, group, [Shard(0)]).redistribute(group, [Replicate()]).to_local()


def _split(x: torch.Tensor, group: DeviceMesh) -> torch.Tensor:
    """This rank's part of the batch; backward all-gathers the group's gradients."""
    _require_split(x.shape[0], group.size())
    return DTensor.from_local(x, group, [Replicate()]).redistribute(group, [Shard(0)]).to_local()


def local_batch(batch: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The rows of the stage's `batch` this rank holds on a layer's ("dp", "tp") `mesh`."""
    dp = mesh["dp"]
    _require_split(batch.shape[0], dp.size())
    return batch.chunk(dp.size())[dp.get_local_rank()]


def _require_split(rows: int, ranks: int) -> None:
    if rows % ranks:
        raise ValueError(f"a batch of {rows} rows does not split over {ranks} data-parallel ranks")
