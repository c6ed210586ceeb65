"""Gradient-norm clipping over parameters of any layout: plain tensors and DTensors on any meshes.

`torch.nn.utils.clip_grad_norm_` needs all gradients on one mesh; a plan gives each layer its own
(data-parallel shards, tensor-parallel shards, expert replicas) and a pipeline spreads the
layers over ranks. The norm is computed per group of gradients that share a mesh and placements
(a DTensor norm reduces over its shards: `full_tensor`), the squares summed over the groups and
then over the pipeline ranks, and every gradient is scaled by the same coefficient, as one
process clips the whole model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float, *, skip: torch.Tensor | None = None,
                    group: dist.ProcessGroup | None = None) -> float:
    """Scale the gradients of `params` so that their global norm is at most `max_norm` (inf only
    measures it) and return the norm before. `skip` is a parameter scaled but not counted (the
    last stage's copy of a tied weight); `group` (the pipeline ranks) holds the other parts of
    the model, whose squared norms are added."""
    params = [p for p in params if p.grad is not None]
    by_layout: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p is not skip:
            grad = p.grad
            layout = (grad.device_mesh, tuple(grad.placements)) if isinstance(grad, DTensor) else None
            by_layout[layout].append(grad)
    squares = torch.zeros((), dtype=torch.float32)
    for grads in by_layout.values():
        norm = torch.nn.utils.get_total_norm(grads)
        squares = squares + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float().square()
    if group is not None:
        dist.all_reduce(squares, group=group)
    norm = squares.sqrt()
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0).item()
    for p in params:
        p.grad.mul_(coefficient)
    return norm.item()
