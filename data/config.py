"""The `[data]` section: which corpus a run trains on (the embedded synthetic one or prepared MDS streams)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stratagem.data.streaming import StreamSpec
from stratagem.data.synthetic import SyntheticConfig
from stratagem.errors import ConfigValueError

DATA_KINDS = ("synthetic", "mds")


@dataclass
class MDSConfig:
    """Prepared MDS datasets (`stratagem data prepare`) streamed with mosaicml-streaming."""

    streams: list[StreamSpec] = field(default_factory=list)  # [[data.mds.streams]] tables, mixed by weight
    num_workers: int = 2  # data-loader worker processes per rank
    cache_limit: str = ""  # e.g. "10gb": evict shards from the local cache of remote streams beyond it
    num_canonical_nodes: int = 1  # fixes the global sample order; keep it when the world size changes
    shuffle: bool = True
    validate_hash: bool = True  # check every shard's hash when it is read

    def validate(self) -> None:
        for i, stream in enumerate(self.streams):
            if not stream.path:
                raise ConfigValueError(f"streams[{i}].path", stream.path, "must name a prepared dataset folder")
            if stream.weight <= 0:
                raise ConfigValueError(f"streams[{i}].weight", stream.weight, "must be positive")
        names = [stream.name for stream in self.streams if stream.name]
        if len(set(names)) != len(names):
            raise ConfigValueError("streams", names, "stream names must be distinct")
        if self.num_workers < 0:
            raise ConfigValueError("num_workers", self.num_workers, "must not be negative")
        if self.num_canonical_nodes <= 0:
            raise ConfigValueError("num_canonical_nodes", self.num_canonical_nodes, "must be positive")


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | mds
    seq_len: int = 128  # tokens a model sees per sample (samples hold seq_len + 1 tokens)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    mds: MDSConfig = field(default_factory=MDSConfig)

    def validate(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigValueError("kind", self.kind, f"must be one of {', '.join(DATA_KINDS)}")
        if self.seq_len <= 0:
            raise ConfigValueError("seq_len", self.seq_len, "must be positive")
        if self.kind == "mds" and not self.mds.streams:
            raise ConfigValueError("mds.streams", [], "kind = 'mds' needs at least one [[data.mds.streams]] table")
