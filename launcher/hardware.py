"""What the cost model asks of the machines: how long a unit's compute, a collective and an
optimizer step take, and how much memory a device has.

Two sources, one interface:

- `Analytic`: a `ClusterSpec`'s published figures. Forward time = FLOPs / (peak x efficiency),
  backward twice the forward (two matmuls per forward one), and once more with checkpointing; collectives by the ring formulas of
  `ClusterSpec.collective_seconds`; the optimizer step streams every state byte of its parameters
  twice (read and write) at the device's memory bandwidth.
- `Measured`: a profile of the devices at hand (`launcher.profile`): fitted per-layer-type times
  and per-collective latency and bandwidth, memory from the profile's machine.

Both give a collective's time in two parts, latency (its message steps) and transfer (its bytes),
and carry per-term correction factors (``corrections``, term -> factor, see `launcher.cost.TERMS`)
that calibration fits from measured runs; a term without one is taken as predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stratagem.launcher.cluster import ClusterSpec


class _Devices:
    """What both sources share: a cluster's memory and peak, and the correction factors."""

    cluster: ClusterSpec
    corrections: dict[str, float]

    @property
    def memory(self) -> float:
        return self.cluster.device_memory

    @property
    def peak_flops(self) -> float:
        return self.cluster.device_flops

    @property
    def max_tp(self) -> int:
        """Tensor parallelism stays within a node: its collectives run twice per sublayer."""
        return self.cluster.devices_per_node

    def corrected(self, terms: dict[str, float]) -> dict[str, float]:
        return {term: seconds * self.corrections.get(term, 1.0) for term, seconds in terms.items()}

    def collective_seconds(self, kind: str, nbytes: float, group_size: int, stride: int = 1) -> float:
        return sum(self.collective_parts(kind, nbytes, group_size, stride))


@dataclass
class Analytic(_Devices):
    cluster: ClusterSpec
    memory_bandwidth: float = 3.35e12  # bytes/s; H100 SXM's HBM3
    dp_overlap: float = 1.0  # GPUs reduce on their own streams while computing
    state_bytes_per_param: int = 16
    corrections: dict[str, float] = field(default_factory=dict)

    def layer_seconds(self, unit, tokens: float, checkpoint: bool) -> tuple[float, float]:
        """(forward, backward) seconds; a checkpointed backward runs the forward again first."""
        forward = unit.flops_per_token * tokens / (self.cluster.device_flops * self.cluster.compute_efficiency)
        return forward, (3 if checkpoint else 2) * forward

    def collective_parts(self, kind: str, nbytes: float, group_size: int, stride: int = 1) -> tuple[float, float]:
        """(latency, transfer) seconds of one collective."""
        return self.cluster.collective_parts(kind, nbytes, group_size, stride)

    def optimizer_seconds(self, params: float) -> float:
        return 2 * params * self.state_bytes_per_param / self.memory_bandwidth


@dataclass
class Measured(_Devices):
    """Times from a `launcher.profile.Profile`; gloo on CPU cores overlaps nothing by default."""

    profile: object
    dp_overlap: float = 0.0
    corrections: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cluster = self.profile.cluster()
        self.corrections = {**self.profile.corrections, **self.corrections}

    def layer_seconds(self, unit, tokens: float, checkpoint: bool) -> tuple[float, float]:
        """As measured; the profile's "head" entry covers the embedding, final norm, head and loss."""
        if unit.kind == "embedding" and unit.key not in self.profile.layer_keys():
            return 0.0, 0.0
        return self.profile.layer_seconds(unit.key, tokens, checkpoint=checkpoint and unit.kind == "layer")

    def collective_parts(self, kind: str, nbytes: float, group_size: int, stride: int = 1) -> tuple[float, float]:
        return self.profile.collective_parts(kind, nbytes, group_size) if group_size > 1 else (0.0, 0.0)

    def optimizer_seconds(self, params: float) -> float:
        return self.profile.optimizer_seconds(params)
