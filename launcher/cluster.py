"""Hardware description for the planner: devices, their speed and memory, and the links between them.

A `ClusterSpec` is what the cost model knows about a cluster: ``nodes`` x ``devices_per_node``
devices of ``device_flops`` peak FLOP/s and ``device_memory`` bytes, joined inside a node by
``intra_node`` links and across nodes by ``inter_node`` links. A collective is costed with the
ring formulas of `ring_terms` over one `Link`: ``time = volume * nbytes / bandwidth + steps *
latency``, where ``bandwidth`` is the bus bandwidth (what nccl-tests reports as busbw: the bytes
per second each rank sends and receives at once) and ``latency`` the cost of one message step.
The profiler (`launcher.profile`) fits its measurements against the same formulas, so a measured
link and a published one mean the same thing.

Specs come from `builtin_cluster` (published hardware, below) or from a user's TOML or JSON file
(`load_cluster`), read strictly: every bad key or value is one `ConfigError` line naming the file,
the key and the value. This module does not import torch.

A spec file (TOML; JSON has the same keys)::

    name = "my-cluster"          # optional, default: the file's stem
    base = "h100-sxm"            # optional: start from a built-in spec and override its figures
    nodes = 4
    devices_per_node = 8
    device_flops = 989e12        # peak dense FLOP/s per device at the training precision
    device_memory = 80e9         # bytes per device usable for training
    compute_efficiency = 0.5     # optional: achievable fraction of device_flops
    [intra_node]
    bandwidth = 450e9            # bytes/s (bus bandwidth)
    latency = 5.7e-6             # seconds per message step
    [inter_node]
    bandwidth = 50e9
    latency = 6.6e-6
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from stratagem.errors import ConfigError, ConfigValueError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s a rank sends and receives at once in a collective (bus bandwidth)
    latency: float  # seconds per message step

    def __post_init__(self):
        if not self.bandwidth > 0:
            raise ConfigValueError("bandwidth", self.bandwidth, "must be positive")
        if not self.latency >= 0:
            raise ConfigValueError("latency", self.latency, "must not be negative")


def ring_terms(kind: str, group_size: int) -> tuple[float, int]:
    """``(volume, steps)`` of one collective over `group_size` ranks: it takes ``volume * nbytes /
    bandwidth + steps * latency`` seconds, nbytes as in `ClusterSpec.collective_seconds`.

    A ring all-reduce is a reduce-scatter then an all-gather: each is n - 1 steps moving 1/n of
    the tensor. An all-to-all keeps 1/n of its data and sends the rest over n - 1 steps.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; known: {', '.join(KINDS)}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, not {group_size}")
    n = group_size
    if n == 1:
        return 0.0, 0
    if kind == "send_recv":
        return 1.0, 1
    if kind == "all_reduce":
        return 2 * (n - 1) / n, 2 * (n - 1)
    return (n - 1) / n, n - 1


def collective_parts(kind: str, nbytes: float, group_size: int, link: Link) -> tuple[float, float]:
    """(latency, transfer) seconds of one collective over `link` by the ring formulas (`ring_terms`):
    what its message steps cost whatever their size, and what moving its bytes costs."""
    volume, steps = ring_terms(kind, group_size)
    return steps * link.latency, volume * nbytes / link.bandwidth


def collective_seconds(kind: str, nbytes: float, group_size: int, link: Link) -> float:
    """Time of one collective over `link` by the ring formulas (`ring_terms`)."""
    return sum(collective_parts(kind, nbytes, group_size, link))


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    nodes: int
    devices_per_node: int
    device_flops: float  # peak dense FLOP/s per device at the training precision
    device_memory: int  # bytes per device usable for training
    intra_node: Link  # between devices of one node (NVLink; shared memory/loopback here)
    inter_node: Link  # between nodes (InfiniBand/Ethernet), per device
    compute_efficiency: float = 0.5  # achievable fraction of device_flops for matmul-heavy layers

    def __post_init__(self):
        if not self.name:
            raise ConfigValueError("name", self.name, "must not be empty")
        for key in ("nodes", "devices_per_node"):
            if getattr(self, key) < 1:
                raise ConfigValueError(key, getattr(self, key), "must be at least 1")
        for key in ("device_flops", "device_memory"):
            if not getattr(self, key) > 0:
                raise ConfigValueError(key, getattr(self, key), "must be positive")
        if not 0 < self.compute_efficiency <= 1:
            raise ConfigValueError("compute_efficiency", self.compute_efficiency, "must be in (0, 1]")

    @property
    def world(self) -> int:
        return self.nodes * self.devices_per_node

    def link(self, group_size: int, stride: int) -> Link:
        """The link a collective over `group_size` ranks spaced `stride` apart uses: intra_node if the
        group lies within one node (ranks are numbered node by node), else inter_node.

        The groups of one mesh dimension tile the ranks in blocks of ``group_size * stride``
        consecutive ranks; every group lies within a node when such a block divides a node (or
        when there is only one node).
        """
        if group_size < 1 or stride < 1:
            raise ValueError(f"group_size and stride must be at least 1, not {group_size} and {stride}")
        span = group_size * stride
        if span > self.world:
            raise ValueError(f"a group of {group_size} ranks {stride} apart spans {span} ranks; "
                             f"{self.name} has {self.world}")
        return self.intra_node if self.nodes == 1 or self.devices_per_node % span == 0 else self.inter_node

    def collective_seconds(self, kind: str, nbytes: float, group_size: int, stride: int = 1) -> float:
        """Time of one collective. kind in {"all_reduce","all_gather","reduce_scatter","all_to_all","send_recv"};
        nbytes = the full (unsharded) tensor size for all_reduce / all_gather output / reduce_scatter input /
        all_to_all total per rank; send_recv = bytes sent. Ring formulas: all_reduce 2(n-1)/n*B/bw + 2(n-1)*lat;
        all_gather and reduce_scatter (n-1)/n*B/bw + (n-1)*lat; all_to_all (n-1)/n*B/bw + (n-1)*lat;
        send_recv B/bw + lat; group_size 1 -> 0.0"""
        return sum(self.collective_parts(kind, nbytes, group_size, stride))

    def collective_parts(self, kind: str, nbytes: float, group_size: int, stride: int = 1) -> tuple[float, float]:
        """`collective_seconds` as (latency, transfer) seconds."""
        link = self.intra_node if group_size == 1 else self.link(group_size, stride)  # unused at 1: no terms
        return collective_parts(kind, nbytes, group_size, link)


# ---------------------------------------------------------------------------------------------
# Published hardware. Intra-node bandwidths are what nccl-tests measures as all_reduce busbw at
# large sizes on one 8-GPU node: 460-480 GB/s on H100 SXM5 (NVLink 4 with NVLink SHARP; the links
# run 450 GB/s per direction, 900 GB/s bidirectional per the H100 datasheet), 230-250 GB/s on
# A100 SXM4 (NVLink 3: 300 GB/s per direction, 600 GB/s bidirectional per the A100 datasheet).
# Inter-node: one InfiniBand port per GPU at line rate (DGX H100: 8 x 400 Gb/s NDR ConnectX-7;
# DGX A100: 8 x 200 Gb/s HDR ConnectX-6). Latencies are NCCL's own per-step figures for a ring
# with the Simple protocol (src/graph/tuning.cc, hwLat): 5.7 us over NVLink, 6.6 us over the
# network. Memory: the cards' 80 GB less ~5 GB for the CUDA context, NCCL buffers and allocator
# fragmentation (nvidia-smi reports 81,559 MiB on both).

_NVLINK4 = Link(bandwidth=450e9, latency=5.7e-6)  # realistic: the low end of measured busbw
_NVLINK3 = Link(bandwidth=240e9, latency=5.7e-6)  # realistic: measured busbw, not the 300 GB/s peak
_USABLE_80GB = 80 * 10**9

BUILTIN: dict[str, ClusterSpec] = {
    # H100 SXM5 datasheet: 1,979 TFLOP/s bf16 with 2:4 sparsity, i.e. 989 TFLOP/s dense.
    "h100-sxm": ClusterSpec(name="h100-sxm", nodes=1, devices_per_node=8, device_flops=989e12,
                            device_memory=_USABLE_80GB, intra_node=_NVLINK4,
                            inter_node=Link(bandwidth=400e9 / 8, latency=6.6e-6)),
    # A100 SXM4 80GB datasheet: 312 TFLOP/s bf16 dense.
    "a100-80g": ClusterSpec(name="a100-80g", nodes=1, devices_per_node=8, device_flops=312e12,
                            device_memory=_USABLE_80GB, intra_node=_NVLINK3,
                            inter_node=Link(bandwidth=200e9 / 8, latency=6.6e-6)),
}


def builtin_cluster(name: str, nodes: int = 1) -> ClusterSpec:
    """The built-in spec `name` with `nodes` nodes."""
    if name not in BUILTIN:
        raise ConfigError(f"unknown cluster {name!r}; built-in clusters: {', '.join(sorted(BUILTIN))}")
    return dataclasses.replace(BUILTIN[name], nodes=nodes)


# ---------------------------------------------------------------------------------------------
# Spec files

_LINKS = ("intra_node", "inter_node")
_INTEGERS = ("nodes", "devices_per_node", "device_memory")
_NUMBERS = ("device_flops", "compute_efficiency")
_KEYS = ("name", "base", *_INTEGERS, *_NUMBERS, *_LINKS)


def load_cluster(path_or_name: str | Path, nodes: int | None = None) -> ClusterSpec:
    """A built-in spec by name, or a spec file (.toml or .json); `nodes` overrides its node count."""
    if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
        raise ConfigError(f"nodes = {nodes!r}: must be a positive integer")
    text = str(path_or_name)
    if text in BUILTIN:
        return builtin_cluster(text, nodes or 1)
    path = Path(text)
    if path.suffix not in (".toml", ".json") and not path.exists():
        raise ConfigError(f"{text}: neither a cluster spec file (.toml or .json) nor a built-in cluster "
                          f"(built-in: {', '.join(sorted(BUILTIN))})")
    table = _read_table(path)
    spec = cluster_from_dict(table, str(path), default_name=path.stem)
    return dataclasses.replace(spec, nodes=nodes) if nodes is not None else spec


def _read_table(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: cluster spec file not found")
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"{path}: a cluster spec is a .toml or .json file")
    try:
        text = path.read_text()
        table = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: invalid {path.suffix[1:].upper()}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected an object of cluster figures at the top level, found {table!r}")
    return table


def cluster_from_dict(table: dict, source: str, default_name: str = "") -> ClusterSpec:
    """Strictly build a ClusterSpec from parsed TOML/JSON; every problem is one line naming `source`."""
    _check_keys(table, _KEYS, "", source)
    values: dict = {}
    base = table.get("base")
    if base is not None:
        if not isinstance(base, str) or base not in BUILTIN:
            raise ConfigError(f"{source}: base = {base!r}: not a built-in cluster "
                              f"(built-in: {', '.join(sorted(BUILTIN))})")
        values = {f.name: getattr(BUILTIN[base], f.name) for f in dataclasses.fields(ClusterSpec)}
    values["name"] = default_name or base or ""
    for key in ("name", *_INTEGERS, *_NUMBERS):
        if key in table:
            values[key] = _value(table[key], key, source)
    for key in _LINKS:
        if key in table:
            values[key] = _link(table[key], values.get(key), key, source)
    missing = [f.name for f in dataclasses.fields(ClusterSpec)
               if f.name not in values and f.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing key {missing[0]!r}")
    try:
        return ClusterSpec(**values)
    except ConfigValueError as err:
        raise ConfigError(f"{source}: {err}") from None


def _check_keys(table: dict, known: tuple[str, ...], prefix: str, source: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {prefix}{key}{hint}")


def _value(value, key: str, source: str):
    """`value` as the type of `key`: a string, an integer (integral numbers such as 80e9 accepted) or a number."""
    label = f"{source}: {key} = {value!r}"
    if key == "name":
        if not isinstance(value, str):
            raise ConfigError(f"{label}: expected a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{label}: expected a number")
    if key in _INTEGERS:
        if not float(value).is_integer():
            raise ConfigError(f"{label}: expected an integer")
        return int(value)
    return float(value)


def _link(table, base: Link | None, key: str, source: str) -> Link:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {key} = {table!r}: expected a table with bandwidth and latency")
    _check_keys(table, ("bandwidth", "latency"), f"{key}.", source)
    values = dataclasses.asdict(base) if base is not None else {}
    for name, value in table.items():
        values[name] = _value(value, f"{key}.{name}", source)
    for name in ("bandwidth", "latency"):
        if name not in values:
            raise ConfigError(f"{source}: missing key {key}.{name}")
    try:
        return Link(**values)
    except ConfigValueError as err:
        raise ConfigError(f"{source}: {key}.{err}") from None
