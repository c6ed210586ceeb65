"""What the cost model asks of the machines: how long a unit's compute, a collective and an
optimizer step take, and how much memory a device has.

Two sources, one interface:

- `Analytic`: a `ClusterSpec`'s published figures. Forward time = FLOPs / (peak x efficiency),
  backward twice the forward (two matmuls per forward one), and once more with checkpointing; collectives by the ring formulas of
  `ClusterSpec.collective_seconds`; the optimizer step streams every state byte of its parameters
  twice (read and write) at the device's memory bandwidth.
- `Measured`: a profile of the devices at hand (`launcher.profile`): fitted per-layer-type times
  and per-collective latency and bandwidth, memory from the profile's machine.

For DeepSpeed's offload both also say what the host offers: the time of a host <-> device copy,
of the host's AdamW update, the host memory per rank, and whether the host is a separate processor
(``separate_host``: a GPU's host CPU runs the host part of a split update while the GPU runs the
rest; CPU ranks are their own host, so the two parts share cores and memory).

Both give a collective's time in two parts, latency (its message steps) and transfer (its bytes),
and carry per-term correction factors (``corrections``, term -> factor, see `launcher.cost.TERMS`)
that calibration fits from measured runs; a term without one is taken as predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stratagem.launcher.cluster import ClusterSpec

# Bytes per parameter DeepSpeed keeps on the host for the optimizer's host share, whatever the device
# precision: the float32 master weight, gradient and AdamW's m and v.
HOST_STATE_BYTES = 16


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
    """Published figures. The host's, per GPU of a DGX H100 (8 GPUs): PCIe Gen5 x16 runs 64 GB/s each
    way, pinned copies reach about 50; two Xeon 8480C with 8 DDR5-4800 channels each (2 x 307 GB/s)
    and 2 TB of memory. The host's AdamW update streams its 16 float32 state bytes per parameter
    (HOST_STATE_BYTES) twice at the host memory bandwidth, as the device's does at its own."""

    cluster: ClusterSpec
    memory_bandwidth: float = 3.35e12  # bytes/s; H100 SXM's HBM3
    dp_overlap: float = 1.0  # GPUs reduce on their own streams while computing
    state_bytes_per_param: int = 16
    corrections: dict[str, float] = field(default_factory=dict)
    host_link_bandwidth: float = 50e9  # bytes/s each way between a GPU and its host (PCIe Gen5 x16, pinned)
    host_memory_bandwidth: float = 2 * 307e9 / 8  # bytes/s of the host's memory per GPU
    host_memory: float = 2e12 / 8  # bytes of host memory per GPU
    separate_host = True

    def layer_seconds(self, unit, tokens: float, checkpoint: bool) -> tuple[float, float]:
        """(forward, backward) seconds; a checkpointed backward runs the forward again first."""
        forward = unit.flops_per_token * tokens / (self.cluster.device_flops * self.cluster.compute_efficiency)
        return forward, (3 if checkpoint else 2) * forward

    def collective_parts(self, kind: str, nbytes: float, group_size: int, stride: int = 1) -> tuple[float, float]:
        """(latency, transfer) seconds of one collective."""
        return self.cluster.collective_parts(kind, nbytes, group_size, stride)

    def optimizer_seconds(self, params: float) -> float:
        return 2 * params * self.state_bytes_per_param / self.memory_bandwidth

    def host_optimizer_seconds(self, params: float) -> float:
        return 2 * params * HOST_STATE_BYTES / self.host_memory_bandwidth

    def host_copy_seconds(self, nbytes: float) -> float:
        return nbytes / self.host_link_bandwidth


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

    @property
    def separate_host(self) -> bool:
        return self.profile.host.separate_device

    @property
    def host_memory(self) -> float:
        """The ranks' memory: host and device memory are one (`launcher.profile.HostProfile`)."""
        return self.memory

    def host_optimizer_seconds(self, params: float) -> float:
        return params * self.profile.host.adam_seconds_per_param

    def host_copy_seconds(self, nbytes: float) -> float:
        return nbytes / self.profile.host.copy_bandwidth
