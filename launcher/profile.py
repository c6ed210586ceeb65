"""Measure the machine at hand for the planner: `stratagem profile`.

On ``ranks`` real local ranks (`launcher.local.run_local`: gloo on CPUs, with the threads per rank
training gets), every rank measures the same things at the same time, so the timings see the
contention of training on that many ranks:

- per layer type of the model (key ``"mixer/ffn"``, the model's shape fixed by its config) at
  ``seq_len``: forward and backward seconds of one `Block` for several micro-batch sizes, with
  and without activation checkpointing (its backward recomputes the forward), tensor degree 1;
  the same for the embedding, final norm, output head and loss (key ``"head"``); and always for
  an ``attention/mlp`` block of the model's shape, the reference `Profile.cluster` estimates the
  device's FLOP/s from. Each pass is fitted as ``seconds = a + b * tokens``.
- the optimizer step (AdamW as training builds it) in seconds per parameter.
- the host, for DeepSpeed's offload (`HostProfile`): a tensor copy's bandwidth (unpinned, and
  pinned where this machine can pin memory), and the host's AdamW rate: DeepSpeed's CPU Adam when
  its op was built at install, else torch's AdamW, which is the optimizer step above (the ranks
  compute on the CPU). The ranks are their own host: offload moves bytes within the same memory.
- collectives (all_reduce, all_gather, reduce_scatter, all_to_all, send_recv) from 4 KiB to
  16 MiB on groups of 2, 4 and ``ranks`` consecutive ranks, every group of a size at once (as the
  data-parallel groups of a mesh run together), fitted per (kind, group size) to the ring formulas
  of `launcher.cluster.ring_terms`, so the latency and bandwidth mean what a `ClusterSpec`'s do.
- activation bytes per token saved for backward, with and without checkpointing (the saved
  tensors, as tests/test_model.py measures them, per token: the difference between two
  micro-batch sizes, so per-call constants drop out), beside the layer type's count. Parameter
  counts and FLOPs come from the layer types (`model.counts`), never re-derived.

Fits minimise the relative error (timings span orders of magnitude) with a non-negative
intercept and slope; ``residual`` is the root mean square of the relative errors at the measured
points (0.05 = 5%). Every timing is the median of all ranks' samples; the points of one item are
sampled in turn, round after round (`_measure`), so that load from elsewhere spreads over them.

The result is a versioned JSON document (`Profile.to_dict`) with the machine's fingerprint;
`load_profile` refuses one of another machine, of another version or a corrupt one, with one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from stratagem.errors import ConfigError, StratagemError
from stratagem.launcher.cluster import KINDS, ClusterSpec, Link, collective_parts, ring_terms
from stratagem.model.config import ModelConfig
from stratagem.model.counts import count_model
from stratagem.model.layers import LayerSpec
from stratagem.model.transformer import Block, Transformer
from stratagem.train.config import TrainConfig
from stratagem.train.optim import build_optimizer

VERSION = 2  # 2: observations, and corrections of the transfer/latency terms (launcher.cost.TERMS)
HEAD = "head"
REFERENCE = LayerSpec("attention", "mlp")  # the block whose speed estimates the device's FLOP/s
DTYPE = torch.float32  # multi-rank training runs in float32 (no autocast under a plan yet)
STATE_BYTES_PER_PARAM = 16  # float32 weight and gradient, AdamW's two moments
COPY_BYTES = 2**26  # the tensor a host copy moves: well beyond the caches
TORCH_ADAM = "torch.optim.AdamW"
DEEPSPEED_ADAM = "deepspeed.ops.adam.DeepSpeedCPUAdam"


class ProfileError(StratagemError):
    """A profile file cannot be used here (another machine, an old version, corrupt, or too few entries)."""


class MissingLayerType(ProfileError, KeyError):
    """The profile has no entry for a layer type (a KeyError too, for callers that look types up)."""

    __str__ = StratagemError.__str__  # one plain line, not KeyError's quoted repr


@dataclass(frozen=True)
class ProfileSettings:
    """How much to measure; the defaults keep a tiny model's profile under a minute on 4 ranks."""

    micro_batches: tuple[int, ...] = (1, 2, 4, 8)
    repeats: int = 5  # timed runs of every point at least, after one warm-up
    max_repeats: int = 30
    seconds: float = 1.0  # more runs, up to max_repeats, while a measured item takes less than this
    message_sizes: tuple[int, ...] = tuple(4096 * 4**i for i in range(7))  # 4 KiB .. 16 MiB
    optimizer_params: int = 2**20
    probes: bool = True  # then time a few real plans and calibrate (`launcher.probe`)

    def __post_init__(self):
        if len(set(self.micro_batches)) < 2 or min(self.micro_batches) < 1:
            raise ConfigError(f"micro_batches = {self.micro_batches}: need two or more distinct positive sizes")
        if len(set(self.message_sizes)) < 2 or min(self.message_sizes) < 64:
            raise ConfigError(f"message_sizes = {self.message_sizes}: need two or more distinct sizes "
                              f"of 64 bytes or more")
        if not 1 <= self.repeats <= self.max_repeats or self.optimizer_params < 1 or self.seconds < 0:
            raise ConfigError(f"repeats = {self.repeats}, max_repeats = {self.max_repeats}, seconds = {self.seconds}, "
                              f"optimizer_params = {self.optimizer_params}: need 1 <= repeats <= max_repeats, "
                              f"seconds >= 0 and optimizer_params >= 1")


# ---------------------------------------------------------------------------------------------
# Fits


@dataclass(frozen=True)
class LinearFit:
    """``y = intercept + slope * x`` fitted to measured ``points`` (x, y)."""

    intercept: float
    slope: float
    residual: float  # root mean square relative error at the points
    points: tuple[tuple[float, float], ...]

    def __call__(self, x: float) -> float:
        return self.intercept + self.slope * x

    @classmethod
    def fit(cls, points) -> LinearFit:
        """Least squares on relative errors (weights 1 / y^2), intercept and slope held non-negative."""
        points = tuple((float(x), float(y)) for x, y in sorted(points))
        w = [1 / y**2 for _, y in points]
        s, sx, sy = sum(w), sum(wi * x for wi, (x, _) in zip(w, points)), sum(wi * y for wi, (_, y) in zip(w, points))
        sxx = sum(wi * x * x for wi, (x, _) in zip(w, points))
        sxy = sum(wi * x * y for wi, (x, y) in zip(w, points))
        det = s * sxx - sx * sx
        slope = (s * sxy - sx * sy) / det if det > 0 else 0.0
        intercept = (sy - slope * sx) / s
        if intercept < 0:  # through the origin
            intercept, slope = 0.0, sxy / sxx
        if slope < 0:  # a constant
            intercept, slope = sy / s, 0.0
        residual = math.sqrt(sum(((intercept + slope * x - y) / y) ** 2 for x, y in points) / len(points))
        return cls(intercept, slope, residual, points)

    @classmethod
    def from_dict(cls, d: dict) -> LinearFit:
        return cls(float(d["intercept"]), float(d["slope"]), float(d["residual"]),
                   tuple((float(x), float(y)) for x, y in d["points"]))


@dataclass(frozen=True)
class LayerProfile:
    """One layer type's measurements (seconds against tokens per micro-batch) and counts."""

    shape_hash: str  # `shape_hash` of the model and seq_len it was measured at
    params: int  # from the counts
    flops_per_token: int  # forward matmul FLOPs, from the counts
    forward: LinearFit
    backward: LinearFit
    forward_checkpointed: LinearFit | None  # None for the head: plans never checkpoint it
    backward_checkpointed: LinearFit | None  # recomputes the forward
    activation_bytes_per_token: float  # measured: saved for backward, no checkpointing
    checkpointed_activation_bytes_per_token: float | None  # measured, with checkpointing
    counted_activation_bytes_per_token: int | None  # the layer type's count (None for the head)

    @property
    def state_bytes(self) -> int:
        """Weights, gradients and optimizer state in float32 training with AdamW."""
        return self.params * STATE_BYTES_PER_PARAM

    @classmethod
    def from_dict(cls, d: dict) -> LayerProfile:
        fits = ("forward", "backward", "forward_checkpointed", "backward_checkpointed")
        return cls(**{**d, **{name: LinearFit.from_dict(d[name]) if d[name] is not None else None for name in fits}})


@dataclass(frozen=True)
class CollectiveFit:
    """One collective kind on groups of one size: its `Link` by the ring formulas."""

    latency: float  # seconds per message step
    bandwidth: float  # bytes/s (bus bandwidth)
    residual: float
    points: tuple[tuple[float, float], ...]  # (nbytes as in ClusterSpec.collective_seconds, seconds)

    @property
    def link(self) -> Link:
        return Link(bandwidth=self.bandwidth, latency=self.latency)

    @classmethod
    def fit(cls, kind: str, group_size: int, points) -> CollectiveFit:
        """Fit ``seconds = steps * latency + volume * nbytes / bandwidth`` (`ring_terms`)."""
        volume, steps = ring_terms(kind, group_size)
        line = LinearFit.fit([(volume * nbytes, seconds) for nbytes, seconds in points])
        if line.slope <= 0:
            raise ProfileError(f"{kind} on {group_size} ranks: measured times do not grow with the message size "
                               f"({line.points}); the machine is too busy to measure, try again")
        return cls(latency=line.intercept / steps, bandwidth=1 / line.slope, residual=line.residual,
                   points=tuple(sorted((float(b), float(s)) for b, s in points)))

    @classmethod
    def from_dict(cls, d: dict) -> CollectiveFit:
        return cls(float(d["latency"]), float(d["bandwidth"]), float(d["residual"]),
                   tuple((float(b), float(s)) for b, s in d["points"]))


@dataclass(frozen=True)
class HostProfile:
    """What offloading to the host (DeepSpeed's optimizer and parameter offload) costs here.

    The ranks compute on the CPU, so "device" and "host" are the same memory: offloading frees no
    memory, and a host <-> device transfer is a memory copy (`copy_bandwidth`: a tensor copied on
    every rank at once, as each rank's offload copies its own partition)."""

    separate_device: bool  # False: the ranks' device is the host itself
    copy_bandwidth: float  # bytes/s per rank of an unpinned tensor copy: what the cost model charges
    pinned_copy_bandwidth: float | None  # from pinned memory; None where pinning needs a driver this machine lacks
    adam_seconds_per_param: float  # one rank's AdamW update on the host, float32
    adam: str  # which AdamW that is
    note: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> HostProfile:
        pinned = d["pinned_copy_bandwidth"]
        return cls(bool(d["separate_device"]), float(d["copy_bandwidth"]), None if pinned is None else float(pinned),
                   float(d["adam_seconds_per_param"]), str(d["adam"]), str(d["note"]))


# ---------------------------------------------------------------------------------------------
# The machine


@dataclass(frozen=True)
class Machine:
    """What a profile's timings depend on besides the model: it must match to reuse a profile."""

    hostname: str
    cpu_model: str
    cores: int
    torch: str
    threads_per_rank: int
    ranks: int


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rank_threads(ranks: int) -> int:
    """The intra-op threads each of `ranks` local ranks trains with (what `run_local` gives them)."""
    return int(os.environ.get("OMP_NUM_THREADS", max(1, (os.cpu_count() or 1) // ranks)))


def this_machine(ranks: int) -> Machine:
    return Machine(hostname=socket.gethostname(), cpu_model=cpu_model(), cores=os.cpu_count() or 1,
                   torch=torch.__version__, threads_per_rank=rank_threads(ranks), ranks=ranks)


def memory_available() -> int:
    """Bytes the kernel reports as available for new work (MemAvailable), 0 if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def shape_hash(cfg: ModelConfig, seq_len: int) -> str:
    """What a layer type's measurements depend on: the model's shape and seq_len, not its depth or pattern."""
    shape = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("n_layers", "pattern", "ffn")}
    return hashlib.sha1(json.dumps([shape, seq_len], sort_keys=True).encode()).hexdigest()[:16]


def layer_key(spec: LayerSpec) -> str:
    return f"{spec.mixer}/{spec.ffn}"


def default_profile_path(ranks: int, cfg: ModelConfig, seq_len: int) -> Path:
    """profiles/<hostname>-<ranks>r-<shape>.json: one file per machine, rank count and model shape."""
    return Path("profiles") / f"{socket.gethostname()}-{ranks}r-{shape_hash(cfg, seq_len)[:8]}.json"


# ---------------------------------------------------------------------------------------------
# The profile


@dataclass
class Profile:
    machine: Machine
    seq_len: int
    dtype: str
    layers: dict[str, LayerProfile]  # by layer key, and "head"
    optimizer_seconds_per_param: float
    collectives: dict[str, dict[int, CollectiveFit]]  # kind -> group size -> fit
    memory_available: int  # bytes, when measured
    created: str  # ISO time
    wall_seconds: float
    host: HostProfile
    source: str = "profile"  # the file it was read from, for messages
    corrections: dict[str, float] = dataclasses.field(default_factory=dict)  # cost term -> factor (launcher.calibrate)
    # measured runs the corrections are fitted to: {"run", "plan", "terms", "measured_s", "at"} (launcher.calibrate)
    observations: list[dict] = dataclasses.field(default_factory=list)

    def layer_keys(self) -> list[str]:
        """The measured layer types ("mixer/ffn") and "head" (embedding, final norm, head and loss)."""
        return list(self.layers)

    def layer(self, key: str) -> LayerProfile:
        if key not in self.layers:
            raise MissingLayerType(f"{self.source}: no layer type {key!r} in this profile (it has "
                                   f"{', '.join(self.layers)}); profile the model: stratagem profile --model ...")
        return self.layers[key]

    def layer_seconds(self, key: str, tokens: float, checkpoint: bool) -> tuple[float, float]:
        """Forward and backward seconds of layer type `key` (or "head") on a micro-batch of `tokens`
        tokens; with `checkpoint`, the backward includes the recomputed forward."""
        entry = self.layer(key)
        forward, backward = ((entry.forward_checkpointed, entry.backward_checkpointed) if checkpoint
                             else (entry.forward, entry.backward))
        if forward is None:
            raise MissingLayerType(f"{self.source}: {key!r} has no checkpointed timing (plans never checkpoint it)")
        return forward(tokens), backward(tokens)

    def optimizer_seconds(self, params: int) -> float:
        return self.optimizer_seconds_per_param * params

    def collective_link(self, kind: str, group_size: int) -> Link:
        """The fitted link of `kind` on the measured group size nearest `group_size` (the larger on a tie)."""
        if kind not in self.collectives:
            raise ValueError(f"unknown collective {kind!r}; known: {', '.join(KINDS)}")
        fits = self.collectives[kind]
        return fits[min(fits, key=lambda g: (abs(g - group_size), -g))].link

    def collective_parts(self, kind: str, nbytes: float, group_size: int) -> tuple[float, float]:
        """(latency, transfer) seconds of one collective (nbytes as in `ClusterSpec.collective_seconds`)
        by the ring formulas with the latency and bandwidth measured on the nearest group size; zeros on
        one rank."""
        return collective_parts(kind, nbytes, group_size, self.collective_link(kind, group_size))

    def collective_seconds(self, kind: str, nbytes: float, group_size: int) -> float:
        return sum(self.collective_parts(kind, nbytes, group_size))

    def cluster(self) -> ClusterSpec:
        """This machine as a cluster spec: one node of `ranks` devices, the link of the all-reduce on
        the largest measured group, device_flops the FLOP/s an attention/mlp block of the profiled
        shape reaches in training (3x its forward FLOPs) at the largest measured micro-batch, hence
        compute_efficiency 1, and each rank's share of the memory available when measured."""
        ranks = self.machine.ranks
        link = self.collectives["all_reduce"][max(self.collectives["all_reduce"])].link
        ref = self.layer(layer_key(REFERENCE))
        tokens = max(x for x, _ in ref.forward.points)
        flops = 3 * ref.flops_per_token * tokens / (ref.forward(tokens) + ref.backward(tokens))
        return ClusterSpec(name=f"{self.machine.hostname}-{ranks}r", nodes=1, devices_per_node=ranks,
                           device_flops=flops, device_memory=max(1, self.memory_available // ranks),
                           intra_node=link, inter_node=link, compute_efficiency=1.0)

    def mismatch(self, cfg: ModelConfig, seq_len: int) -> str | None:
        """Why this profile does not cover `cfg` at `seq_len` (None if it does)."""
        if seq_len != self.seq_len:
            return f"measured at seq_len {self.seq_len}, not {seq_len}"
        wanted = shape_hash(cfg, seq_len)
        for key in [*dict.fromkeys(map(layer_key, cfg.layer_specs())), HEAD]:
            if key not in self.layers:
                return f"no layer type {key!r} (it has {', '.join(self.layers)})"
            if self.layers[key].shape_hash != wanted:
                return f"{key!r} was measured for another model shape"
        return None

    def check_model(self, cfg: ModelConfig, seq_len: int) -> None:
        """Raise a one-line ProfileError unless this profile covers every layer type of `cfg` at `seq_len`."""
        reason = self.mismatch(cfg, seq_len)
        if reason:
            raise ProfileError(f"{self.source}: does not fit the model: {reason}; "
                               f"run stratagem profile --model ... --seq-len {seq_len}")

    def to_dict(self) -> dict:
        return {
            "version": VERSION,
            "machine": dataclasses.asdict(self.machine),
            "created": self.created,
            "wall_seconds": self.wall_seconds,
            "seq_len": self.seq_len,
            "dtype": self.dtype,
            "memory_available": self.memory_available,
            "optimizer_seconds_per_param": self.optimizer_seconds_per_param,
            "layers": {key: dataclasses.asdict(entry) for key, entry in self.layers.items()},
            "collectives": {kind: {str(g): dataclasses.asdict(fit) for g, fit in fits.items()}
                            for kind, fits in self.collectives.items()},
            "host": dataclasses.asdict(self.host),
            "corrections": dict(self.corrections),
            "observations": list(self.observations),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "profile") -> Profile:
        """The inverse of `to_dict` (the version is checked by `load_profile`). A profile from before
        the host figures gets them measured now (`host_alone`), and says so in their note."""
        machine, optimizer = Machine(**d["machine"]), float(d["optimizer_seconds_per_param"])
        return cls(machine=machine, seq_len=int(d["seq_len"]), dtype=str(d["dtype"]),
                   layers={key: LayerProfile.from_dict(entry) for key, entry in d["layers"].items()},
                   optimizer_seconds_per_param=optimizer,
                   collectives={kind: {int(g): CollectiveFit.from_dict(fit) for g, fit in fits.items()}
                                for kind, fits in d["collectives"].items()},
                   memory_available=int(d["memory_available"]), created=str(d["created"]),
                   wall_seconds=float(d["wall_seconds"]),
                   host=HostProfile.from_dict(d["host"]) if "host" in d else host_alone(machine, optimizer),
                   source=source,
                   corrections={str(k): float(v) for k, v in d.get("corrections", {}).items()},
                   observations=list(d.get("observations", [])))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        partial.replace(path)  # never a half-written profile under the real name
        self.source = str(path)

    def summary(self) -> str:
        """Tables of the fits, in ms and us/token, GB/s and us."""
        lines = [f"{'layer type':<22} {'pass':<9} {'a (ms)':>8} {'b (us/token)':>13} {'resid':>6}   "
                 f"activations B/token: measured (counted), checkpointed"]
        for key, e in self.layers.items():
            counted = f" ({e.counted_activation_bytes_per_token})" if e.counted_activation_bytes_per_token else ""
            ckpt = (f", {e.checkpointed_activation_bytes_per_token:.0f}"
                    if e.checkpointed_activation_bytes_per_token is not None else "")
            passes = [("fwd", e.forward), ("bwd", e.backward), ("ckpt fwd", e.forward_checkpointed),
                      ("ckpt bwd", e.backward_checkpointed)]
            for i, (name, fit) in enumerate(p for p in passes if p[1] is not None):
                tail = f"   {e.activation_bytes_per_token:.0f}{counted}{ckpt}" if i == 0 else ""
                lines.append(f"{key if i == 0 else '':<22} {name:<9} {fit.intercept * 1e3:8.3f} "
                             f"{fit.slope * 1e6:13.3f} {fit.residual:6.1%}{tail}")
        lines += ["", f"{'collective':<15} {'ranks':>5} {'latency (us)':>13} {'bandwidth (GB/s)':>17} {'resid':>6}"]
        for kind, fits in self.collectives.items():
            for g, fit in fits.items():
                lines.append(f"{kind:<15} {g:>5} {fit.latency * 1e6:13.1f} {fit.bandwidth / 1e9:17.3f} "
                             f"{fit.residual:6.1%}")
        lines += ["", f"optimizer (AdamW) {self.optimizer_seconds_per_param * 1e9:.2f} ns per parameter; "
                      f"memory available {self.memory_available / 2**30:.1f} GiB"]
        host = self.host
        pinned = (f"pinned {host.pinned_copy_bandwidth / 1e9:.2f} GB/s" if host.pinned_copy_bandwidth is not None
                  else "no pinned memory here")
        lines += [f"host (offload) {'a separate device' if host.separate_device else 'the ranks are their own host'}; "
                  f"copy {host.copy_bandwidth / 1e9:.2f} GB/s per rank ({pinned}); AdamW {host.adam} "
                  f"{host.adam_seconds_per_param * 1e9:.2f} ns per parameter "
                  f"({1 / host.adam_seconds_per_param / 1e6:.0f}M parameters/s)"] + ([host.note] if host.note else [])
        return "\n".join(lines)


def load_profile(path: str | Path, expect_ranks: int | None = None) -> Profile:
    """Read a profile; refuse (one ProfileError line naming the file) a missing or corrupt one, another
    version's, another machine's, or, with `expect_ranks`, one measured on another number of ranks."""
    profile, problem = _read_profile(Path(path), expect_ranks)
    if problem:
        raise ProfileError(f"{path}: {problem}; measure this machine with stratagem profile")
    return profile


def _read_profile(path: Path, expect_ranks: int | None) -> tuple[Profile | None, str | None]:
    """The profile at `path` and None, or None and why it cannot be used here."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "no profile yet"
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"corrupt profile (invalid JSON: {err})"
    except OSError as err:
        return None, f"cannot read the profile: {err}"
    version = document.get("version") if isinstance(document, dict) else None
    if version != VERSION:
        return None, f"profile version {version!r}; this stratagem reads version {VERSION}"
    try:
        profile = Profile.from_dict(document, str(path))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return None, f"corrupt profile ({type(err).__name__}: {err})"
    differences = machine_differences(profile.machine, expect_ranks)
    if differences:
        return None, f"a profile of another machine: {'; '.join(differences)}"
    return profile, None


def machine_differences(measured: Machine, expect_ranks: int | None = None) -> list[str]:
    """How `measured` differs from this machine (ranks and threads only if `expect_ranks` is given)."""
    here = this_machine(expect_ranks or measured.ranks)
    fields = ["hostname", "cpu_model", "cores", "torch"] + (["ranks", "threads_per_rank"] if expect_ranks else [])
    return [f"{name} {getattr(measured, name)!r}, here {getattr(here, name)!r}"
            for name in fields if getattr(measured, name) != getattr(here, name)]


# ---------------------------------------------------------------------------------------------
# Measuring


def profile_machine(cfg: ModelConfig, ranks: int, seq_len: int, settings: ProfileSettings = ProfileSettings(),
                    progress: bool = True) -> Profile:
    """Measure `cfg`'s layer types at `seq_len`, the optimizer and the collectives on `ranks` local ranks."""
    from stratagem.launcher.local import run_local  # imports the elastic launcher

    _check_arguments(ranks, seq_len)
    cfg.validate()
    began = time.perf_counter()
    available = memory_available()
    results = run_local(ranks, _measure_rank, cfg, seq_len, settings, progress)
    timings: dict[tuple, list[float]] = {}
    for rank_timings, _ in results:
        for item, seconds in rank_timings.items():
            timings.setdefault(item, []).extend(seconds)
    info = results[0][1]
    median = {item: statistics.median(seconds) for item, seconds in timings.items()}
    counted_hash = shape_hash(cfg, seq_len)
    layers = {key: _layer_profile(key, median, info["activations"][key], info["counts"][key], counted_hash)
              for key in info["counts"]}
    collectives = {kind: {g: CollectiveFit.fit(kind, g, [(item[2], s) for item, s in median.items()
                                                          if item[:2] == (kind, g)])
                          for g in info["group_sizes"]} for kind in KINDS}
    machine = dataclasses.replace(this_machine(ranks), threads_per_rank=info["threads"])
    optimizer = median[("optimizer",)] / info["optimizer_params"]
    deepspeed = ("host_adam",) in median
    host = _host_profile(median, median[("host_adam",)] / info["optimizer_params"] if deepspeed else optimizer,
                         DEEPSPEED_ADAM if deepspeed else TORCH_ADAM,
                         "" if deepspeed else "DeepSpeed's CPU Adam op is not prebuilt here (compiling it takes "
                                              "minutes): torch's AdamW, the optimizer step above, stands in")
    return Profile(machine=machine, seq_len=seq_len, dtype=str(DTYPE).removeprefix("torch."), layers=layers,
                   optimizer_seconds_per_param=optimizer, collectives=collectives, memory_available=available,
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   wall_seconds=time.perf_counter() - began, host=host)


def _check_arguments(ranks: int, seq_len: int) -> None:
    if ranks < 2:
        raise ConfigError(f"ranks = {ranks}: a profile needs at least 2 ranks (it measures collectives)")
    if seq_len < 1:
        raise ConfigError(f"seq_len = {seq_len}: must be positive")


def _layer_profile(key: str, median: dict, activations: dict, counts: dict, shape: str) -> LayerProfile:
    def fit(kind: str, checkpoint: bool) -> LinearFit | None:
        points = [(item[3], s) for item, s in median.items() if item[:3] == (kind, key, checkpoint)]
        return LinearFit.fit(points) if points else None

    return LayerProfile(shape_hash=shape, params=counts["params"], flops_per_token=counts["flops_per_token"],
                        forward=fit("forward", False), backward=fit("backward", False),
                        forward_checkpointed=fit("forward", True), backward_checkpointed=fit("backward", True),
                        activation_bytes_per_token=activations[False],
                        checkpointed_activation_bytes_per_token=activations.get(True),
                        counted_activation_bytes_per_token=counts["activation_bytes_per_token"])


def ensure_profile(cfg: ModelConfig, ranks: int, seq_len: int, path: str | Path | None = None, force: bool = False,
                   settings: ProfileSettings = ProfileSettings(), say=print, progress: bool = True) -> Profile:
    """The profile at `path` (default `default_profile_path`) if it is this machine's on `ranks` ranks
    and covers `cfg` at `seq_len`; otherwise, or with `force`, measure and write it. `say` tells which."""
    _check_arguments(ranks, seq_len)
    path = Path(path) if path is not None else default_profile_path(ranks, cfg, seq_len)
    profile, reason = (None, "--force") if force else _read_profile(path, expect_ranks=ranks)
    reason = reason or profile.mismatch(cfg, seq_len)
    if reason is None:
        say(f"{path}: reusing the profile measured {profile.created} (same machine, {ranks} ranks, model shape "
            f"and seq_len {seq_len}); --force measures again")
        return profile
    say(f"{path}: {reason}; measuring on {ranks} ranks")
    profile = profile_machine(cfg, ranks, seq_len, settings, progress)
    if settings.probes:
        from stratagem.launcher.probe import calibrate_with_probes

        calibrate_with_probes(profile, cfg, ranks, seq_len, say)
    profile.save(path)
    return profile


def _measure_rank(cfg: ModelConfig, seq_len: int, settings: ProfileSettings, progress: bool) -> tuple[dict, dict]:
    """One rank's timings ({item: [seconds, ...]}) and, the same on every rank, what else it measured."""
    torch.manual_seed(dist.get_rank())
    say = _reporter(progress and dist.get_rank() == 0)
    timings: dict[tuple, list] = {}
    info: dict = {"threads": torch.get_num_threads(), "activations": {}, "counts": {}}
    for key, modules, passes, counts in _workloads(cfg, seq_len):
        info["counts"][key] = counts
        info["activations"][key] = {ckpt: _activation_bytes_per_token(module, passes, cfg, seq_len)
                                    for ckpt, module in modules.items()}
        steps = {(ckpt, batch * seq_len): _forward_backward(*passes(module, cfg, batch, seq_len))
                 for ckpt, module in modules.items() for batch in settings.micro_batches}
        for (ckpt, tokens), samples in _measure(steps, settings).items():
            timings[("forward", key, ckpt, tokens)] = [f for f, _ in samples]
            timings[("backward", key, ckpt, tokens)] = [b for _, b in samples]
        say(key, " | ".join(f"{'ckpt ' if ckpt else ''}fwd {_ms(timings, ('forward', key, ckpt))} "
                            f"bwd {_ms(timings, ('backward', key, ckpt))}" for ckpt in modules) + " ms")
    weights = _weights(settings.optimizer_params)
    info["optimizer_params"] = sum(w.numel() for w in weights)
    timings.update(_measure({("optimizer",): _timed(build_optimizer(weights, TrainConfig()).step)}, settings))
    say("optimizer", f"AdamW step {_ms(timings, ('optimizer',))} ms over {info['optimizer_params']:,} parameters")
    if deepspeed_cpu_adam_prebuilt():
        timings.update(_measure({("host_adam",): _timed(_deepspeed_cpu_adam(weights).step)}, settings))
        say("host adam", f"{DEEPSPEED_ADAM} step {_ms(timings, ('host_adam',))} ms")
    timings.update(_measure(_copies(COPY_BYTES), settings))
    say("host copy", f"{_human(COPY_BYTES)} in {_ms(timings, ('copy',))} ms (unpinned"
                     f"{', pinned' if ('copy', True) in timings else ''})")
    world = dist.get_world_size()
    info["group_sizes"] = sorted({g for g in (2, 4, world) if world % g == 0})
    for g in info["group_sizes"]:
        group = _consecutive_groups(g)
        for kind in KINDS:
            steps = {}
            for nbytes in settings.message_sizes:
                op, actual = _collective(kind, nbytes, group)
                steps[(kind, g, actual)] = _timed(op)
            timings.update(_measure(steps, settings, group))
            say(f"{kind} x{g}", " ".join(f"{_human(item[2])}:{statistics.median(timings[item]) * 1e3:.2f}"
                                        for item in steps) + " ms")
    return timings, info


def _reporter(enabled: bool):
    began = time.perf_counter()

    def say(item: str, text: str) -> None:
        if enabled:
            print(f"  [{time.perf_counter() - began:5.1f}s] {item:<20} {text}", flush=True)

    return say


def _ms(timings: dict, prefix: tuple) -> str:
    """This rank's medians of the items starting with `prefix`, in ms, joined by '/'."""
    return "/".join(f"{statistics.median(seconds) * 1e3:.2f}" for item, seconds in timings.items()
                    if item[:len(prefix)] == prefix)


def _human(nbytes: float) -> str:
    return f"{nbytes / 2**20:g}M" if nbytes >= 2**20 else f"{nbytes / 2**10:g}K"


def _workloads(cfg: ModelConfig, seq_len: int):
    """``(key, {checkpoint: module}, passes, counts)`` for every layer type of `cfg`, the reference
    block and the head; counts come from the layer types (`Block`) and `count_model`."""
    for spec in dict.fromkeys([*cfg.layer_specs(), REFERENCE]):
        counts = {"params": Block.num_params(cfg, spec), "flops_per_token": Block.flops_per_token(cfg, spec, seq_len),
                  "activation_bytes_per_token": Block.activation_bytes_per_token(cfg, spec, seq_len, DTYPE.itemsize)}
        modules = {False: _block(cfg, spec), True: checkpoint_wrapper(_block(cfg, spec))}
        yield layer_key(spec), modules, _block_passes, counts
    model = count_model(cfg, seq_len, DTYPE.itemsize)
    counts = {"params": model.embedding_params + model.head_params + model.final_norm_params,
              "flops_per_token": model.forward_flops_per_token - sum(c.flops_per_token for c in model.layers),
              "activation_bytes_per_token": None}
    yield HEAD, {False: _head(cfg)}, _head_passes, counts


def _block(cfg: ModelConfig, spec: LayerSpec) -> torch.nn.Module:
    block = Block(cfg, spec)
    block.init_weights(cfg.init_std, cfg.init_std)
    return block


def _head(cfg: ModelConfig) -> torch.nn.Module:
    """Embedding, final norm and output head of `cfg`: the model with its layers taken out."""
    model = Transformer(dataclasses.replace(cfg, n_layers=1, pattern=["attention"], ffn="mlp"))
    model.layers = torch.nn.ModuleList()
    return model


def _block_passes(module, cfg: ModelConfig, batch: int, seq_len: int):
    """(forward, backward) of a block on a micro-batch: hidden states in, a gradient for them back."""
    x = torch.randn(batch, seq_len, cfg.dim, dtype=DTYPE, requires_grad=True)
    grad = torch.randn_like(x)
    return (lambda: module(x)), (lambda out: out.backward(grad))


def _head_passes(module, cfg: ModelConfig, batch: int, seq_len: int):
    """(forward, backward) of the head on a micro-batch: tokens in, the mean cross-entropy back."""
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))

    def forward():
        return F.cross_entropy(module(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())

    return forward, (lambda loss: loss.backward())


def _forward_backward(forward, backward):
    def step() -> tuple[float, float]:
        began = time.perf_counter()
        out = forward()
        middle = time.perf_counter()
        backward(out)
        return middle - began, time.perf_counter() - middle

    return step


def _timed(op):
    def step() -> float:
        began = time.perf_counter()
        op()
        return time.perf_counter() - began

    return step


def _measure(steps: dict, settings: ProfileSettings, group=None) -> dict[object, list]:
    """Samples of every step (a function returning its timing), taken in turn round after round
    after one warm-up round, so that a burst of load from elsewhere spreads over all the points
    instead of skewing one. The ranks of `group` start every sample together and agree on the
    number of rounds: enough to fill ``settings.seconds``, within [repeats, max_repeats]."""
    began = time.perf_counter()
    for step in steps.values():
        dist.barrier(group=group)
        step()
    warm_up = torch.tensor([time.perf_counter() - began])
    dist.all_reduce(warm_up, op=dist.ReduceOp.MAX, group=group)
    rounds = min(settings.max_repeats, max(settings.repeats, int(settings.seconds / warm_up.item())))
    samples: dict[object, list] = {item: [] for item in steps}
    for _ in range(rounds):
        for item, step in steps.items():
            dist.barrier(group=group)
            samples[item].append(step())
    return samples


def _activation_bytes_per_token(module, passes, cfg: ModelConfig, seq_len: int) -> float:
    """Bytes of the distinct non-parameter storages autograd saves in a forward, per token: the
    difference between micro-batches of 2 and 1 sequences (per-call constants drop out).
    Checkpointing saves the layer's input only (the recomputation saves the rest during the
    backward). Every save counts, so this exceeds the count a little where a layer drops a graph
    (the linear-attention kernels' final state: tests/test_linear_attention.py)."""
    def saved(batch: int) -> int:
        forward, _ = passes(module, cfg, batch, seq_len)
        forward()  # builds lazy buffers (RoPE tables) before they are told apart from activations
        own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        sizes: dict[int, int] = {}
        held = []  # a storage freed during the forward (a dropped graph's) must not lend its address to another

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                sizes[storage.data_ptr()] = storage.nbytes()
                held.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
        return sum(sizes.values())

    return (saved(2) - saved(1)) / seq_len


def _weights(params: int) -> torch.nn.ParameterList:
    """About `params` parameters with gradients for an optimizer to step: 16 matrices."""
    rows = max(1, params // (16 * 1024))
    weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(rows, 1024)) for _ in range(16))
    for weight in weights:
        weight.grad = torch.randn_like(weight)
    return weights


def deepspeed_cpu_adam_prebuilt() -> bool:
    """Whether DeepSpeed was installed with its CPU Adam op built (DS_BUILD_CPU_ADAM=1), so that it
    loads at once; otherwise the op is compiled on first use, minutes too long for a profile. Looked
    up as a file, without importing DeepSpeed (which takes seconds)."""
    spec = importlib.util.find_spec("deepspeed")
    return spec is not None and spec.origin is not None and any(
        (Path(spec.origin).parent / "ops" / "adam").glob("cpu_adam_op*.so"))


def _deepspeed_cpu_adam(weights) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam over `weights` with training's AdamW settings (what its optimizer offload runs)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    config = TrainConfig()
    return DeepSpeedCPUAdam(weights, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                            weight_decay=config.weight_decay, adamw_mode=True)


def _copies(nbytes: int) -> dict[tuple, object]:
    """Timed steps copying a float32 tensor of `nbytes` into another: ("copy", False) from unpinned
    memory, and ("copy", True) from pinned memory where this machine can pin it."""
    source = torch.ones(nbytes // DTYPE.itemsize, dtype=DTYPE)
    target = torch.empty_like(source)
    steps = {("copy", False): _timed(lambda: target.copy_(source))}
    try:
        pinned = source.pin_memory()
    except RuntimeError:  # pinning asks an accelerator's driver (CUDA's): none here
        return steps
    steps[("copy", True)] = _timed(lambda: target.copy_(pinned))
    return steps


def host_alone(machine: Machine, optimizer_seconds_per_param: float, repeats: int = 10) -> HostProfile:
    """The host figures of a profile measured before they were part of it: copies timed now in this
    process alone (with the ranks' thread count, but not under their contention), and torch's AdamW
    rate taken from the profile's optimizer step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(machine.threads_per_rank)
    seconds = {}
    try:
        for item, step in _copies(COPY_BYTES).items():
            step()  # warm-up
            seconds[item] = statistics.median(step() for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    return _host_profile(seconds, optimizer_seconds_per_param, TORCH_ADAM,
                         "measured on loading this profile, which predates host figures: copies timed in one "
                         "process, not under the ranks' contention, and torch's AdamW, the optimizer step above; "
                         "stratagem profile --force measures them on the ranks")


def _host_profile(seconds: dict, adam_seconds_per_param: float, adam: str, note: str) -> HostProfile:
    """The host figures from the copies' seconds (by `_copies`' items) and the host's AdamW rate."""
    pinned = seconds.get(("copy", True))
    return HostProfile(separate_device=False, copy_bandwidth=COPY_BYTES / seconds[("copy", False)],
                       pinned_copy_bandwidth=None if pinned is None else COPY_BYTES / pinned,
                       adam_seconds_per_param=adam_seconds_per_param, adam=adam, note=note)


def _consecutive_groups(size: int):
    """This rank's group among the world's split into groups of `size` consecutive ranks."""
    world = dist.get_world_size()
    group, _ = dist.new_subgroups_by_enumeration([list(range(start, start + size)) for start in range(0, world, size)])
    return group


def _collective(kind: str, nbytes: int, group):
    """``(op, nbytes)``: one `kind` collective on float32 tensors of about `nbytes` (rounded to a multiple
    of the group size) in `group`, and its exact size as `ClusterSpec.collective_seconds` counts it."""
    members = dist.get_process_group_ranks(group)
    n = len(members)
    count = max(n, nbytes // DTYPE.itemsize // n * n)
    full, part = torch.ones(count, dtype=DTYPE), torch.ones(count // n, dtype=DTYPE)
    if kind == "all_reduce":
        return (lambda: dist.all_reduce(full, group=group)), full.nbytes
    if kind == "all_gather":  # all_gather_single and reduce_scatter_single: this torch's names for
        return (lambda: dist.all_gather_single(full, part, group=group)), full.nbytes  # *_into_tensor, *_tensor
    if kind == "reduce_scatter":
        return (lambda: dist.reduce_scatter_single(part, full, group=group)), full.nbytes
    received = torch.empty_like(full)
    if kind == "all_to_all":
        return (lambda: dist.all_to_all_single(received, full, group=group)), full.nbytes
    me = members.index(dist.get_rank())  # send_recv: every rank to the next of its group, from the previous

    def send_recv():
        ops = [dist.P2POp(dist.isend, full, members[(me + 1) % n], group),
               dist.P2POp(dist.irecv, received, members[(me - 1) % n], group)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    return send_recv, full.nbytes
