"""Timing shared by the layer benchmarks: forward + backward of several layers, taken in turns.

Imported by file name from the scripts' own folder, like `report`.
"""

from __future__ import annotations

import time

import torch


def fwd_bwd_seconds(layer: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds for one forward and backward pass (gradients of the input and the weights)."""
    layer.zero_grad(set_to_none=True)
    began = time.perf_counter()
    layer(x).sum().backward()
    return time.perf_counter() - began


def time_in_turns(layers: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """One warm-up pass per layer (allocator, lazy tables, first-call overheads), then `rounds`
    rounds timing every layer once, in turn, so that all see the same machine load."""
    for layer in layers.values():
        fwd_bwd_seconds(layer, x)
    seconds: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            seconds[name].append(fwd_bwd_seconds(layer, x))
    return seconds
