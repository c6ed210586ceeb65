"""Training batches streamed from prepared MDS datasets (`stratagem data prepare`) with mosaicml-streaming.

`StreamingBatches` serves the same interface as `data.loader.SequenceBatches` over one or more
prepared datasets mixed by weight, read through ``streaming.StreamingDataset`` and a torch
DataLoader. ``import streaming`` costs seconds, so it happens inside functions only: importing
this module (the config does, for `StreamSpec`) stays cheap.

Sample order, and what streaming guarantees
-------------------------------------------
For one epoch, streaming fixes a *global order* F of the epoch's samples that depends only on
the streams, their weights, the epoch size, the seed, the epoch number and ``num_canonical_nodes``
(resampling in ``StreamingDataset.resample_streams`` and the shuffle in ``batching/random.py``
never see the world). The ``orig`` partition (``partition/orig.py``) then deals F out: it drops
the first ``sample_in_epoch`` samples, strides the rest over nodes, then over each node's ranks,
so the j-th sample of rank (node n, local rank r) is ``F[start + j * W + slot]`` with
``slot = r * nodes + n`` (``= rank`` on one node) and W the world size; each rank's samples are
cut into DataLoader batches, dealt round-robin to its workers and read back round-robin, so a
rank's sequence does not depend on ``num_workers``. Hence **concatenating the ranks' batches does
not give F**; interleaving them does, and that is the mapping this module defines:

    Global micro-batch a of a step is the interleave of every rank's micro-batch a: its row k is
    row ``k // W`` of micro-batch a on the rank whose slot is ``k % W`` (`global_micro_batches`).

Step s consumes ``F[s*G, (s+1)*G)`` with G = micro_batch_size * accumulation * W, and global
micro-batch a of it is exactly what one rank with ``micro_batch_size * W`` samples per
micro-batch reads as its micro-batch a. So for a fixed seed and ``num_canonical_nodes`` the global
micro-batches are the same on 1, 2, 4, ... ranks with the same G (tests/test_streaming.py runs
this with real gloo processes).

Two things streaming does not give on its own are fixed here:

- Epoch boundaries. If the epoch size is not a multiple of W, streaming pads every rank with
  repeated samples, differently for each W, and an epoch that ends inside a step splits it. The
  epoch size is therefore the streams' total sample count rounded down to a multiple of
  lcm(G, num_canonical_nodes) (up, if the data holds less): an epoch is a whole number of steps,
  and epochs follow each other endlessly, each reshuffled and resampled with ``seed + epoch``.
- The position. ``StreamingDataLoader.state_dict`` counts the samples one rank yielded and reads
  the epoch from shared memory, which lags the iterator at epoch ends (so a plain DataLoader
  serves here, whose workers this module can also stop deterministically). This module keeps the
  position itself (epoch, global samples into it, step) and hands it to
  ``StreamingDataset.load_state_dict`` in streaming's own format before each epoch, so resuming
  (also on another world size, or with another ``num_workers``) continues at the next sample.

Layout requirements: ranks are numbered node by node (torchrun does), and ``num_canonical_nodes``
and the number of nodes divide one another (the ``orig`` partition needs it; the ``relaxed`` one
would change the order on resumption with another node count).

Other behaviours worth knowing
------------------------------
- A local stream is read in place: streaming decompresses each ``.mds.zstd`` shard next to it
  (keeping the compressed file) and checks the shard's sha1 against ``index.json`` when it does;
  a remote stream is downloaded into its ``path`` (the cache) and checked on download. A shard
  already decompressed is not checked again.
- Samples are read from shard files mapped into memory, one mapping per shard and reading
  process (`_MappedShard`; up to 64, the least recently read dropped first), not through
  streaming's reader, which opens and reads the file for every sample; that reader serves only
  while a shard's file is missing, and fetches it. Which samples come out, in which order, is
  still streaming's alone, and so is every hash check.
- ``cache_limit`` evicts shards by deleting their files from a stream's local folder, so it is
  refused when a stream has no remote: it would delete the prepared data itself. It is also
  refused below the room the readers' download windows need (`_cache_limit_problem`): with less,
  streaming can evict a shard a reader still waits for, and that reader waits forever.
- `tokens_per_stream()` and `state_dict()` count every rank's samples: one all_reduce, so every
  rank calls them (the training loop does, each step and at checkpoints); the state is then the
  same on all ranks.
- Streaming coordinates workers through POSIX shared memory; a job killed with its resource
  tracker (e.g. the whole process group) leaves it behind, and a leftover registration of a
  cache folder makes the next job with that folder fail. Before opening datasets, local rank 0
  unlinks streaming's segments that no live process maps, then all ranks meet at a barrier.
  (``streaming.base.util.clean_stale_shared_memory`` unlinks every streaming segment on the
  machine, those of running jobs too, so it is only the fallback where /proc is missing.)
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from stratagem.data.sources import DataError

if TYPE_CHECKING:
    from stratagem.data.prepare import Manifest

STATE_KIND = "mds"
HASH_ALGORITHM = "sha1"  # what `stratagem data prepare` records for every shard
SPLITS = ("train", "val")
_SHM_DIR = Path("/dev/shm")


@dataclass
class StreamSpec:
    """One prepared dataset (a `stratagem data prepare` output directory)."""

    path: str  # the prepared directory when local; the local cache folder when `remote` is set
    remote: str = ""  # a remote prepared directory (any URL streaming supports, or another folder)
    weight: float = 1.0  # mixing proportion, normalised over the streams
    name: str = ""  # for reports (tokens per stream); defaults to the dataset folder's name

    def __post_init__(self) -> None:
        if not self.name:
            self.name = PurePosixPath((self.remote or self.path).rstrip("/")).name


# ---- manifests ---------------------------------------------------------------------------------

def check_streams(streams: Sequence[StreamSpec], seq_len: int) -> dict:
    """Check every stream's manifest before any work; returns the tokenizer card they share.

    A remote stream's manifest is fetched into its cache folder first. DataError naming the file
    if a manifest is missing or invalid, was prepared with another seq_len, or if the streams
    were not all encoded with one tokenizer.
    """
    manifests = _load_manifests(streams, seq_len)
    return dict(manifests[0][1].tokenizer)


def _load_manifests(streams: Sequence[StreamSpec], seq_len: int) -> list[tuple[Path, Manifest]]:
    from stratagem.data.prepare import MANIFEST_FILE, load_manifest
    from stratagem.data.tokenizer import card_mismatch

    if not streams:
        raise DataError("no data streams given")
    loaded = []
    for spec in streams:
        if spec.remote:
            _fetch_manifest(spec, MANIFEST_FILE)
        path = Path(spec.path) / MANIFEST_FILE
        manifest = load_manifest(spec.path)
        if manifest.seq_len != seq_len:
            raise DataError(f"{path}: prepared with seq_len {manifest.seq_len}, but the run's data.seq_len is "
                            f"{seq_len}; prepare the data again with seq_len {seq_len} or change data.seq_len")
        if loaded:
            first_path, first = loaded[0]
            problem = card_mismatch(manifest.tokenizer, first.tokenizer)
            if problem:
                raise DataError(f"{path}: not encoded with the tokenizer of {first_path} ({problem}); "
                                f"streams mixed in one run must share one tokenizer")
        loaded.append((path, manifest))
    return loaded


def _fetch_manifest(spec: StreamSpec, filename: str) -> None:
    """Copy the remote manifest into the cache; refuse a cache that holds another dataset."""
    from streaming.base.storage import CloudDownloader

    remote, local = os.path.join(spec.remote, filename), Path(spec.path) / filename
    fetched = local.with_name(f"{filename}.{os.getpid()}.tmp")
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        CloudDownloader.direct_download(remote, str(fetched))
    except Exception as e:  # each storage client raises its own kinds of errors
        fetched.unlink(missing_ok=True)
        raise DataError(f"{remote}: cannot fetch the manifest of a remote stream ({_first_line(e)})") from None
    if local.is_file() and local.read_bytes() != fetched.read_bytes():
        fetched.unlink()
        raise DataError(f"{local}: differs from {remote}: the cache folder {spec.path} holds another dataset's "
                        f"shards; empty it or choose another cache folder")
    os.replace(fetched, local)


# ---- ranks -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankLayout:
    """Where this process sits among the ranks, as streaming sees it (from RANK, LOCAL_WORLD_SIZE...)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def slot(self) -> int:
        """This rank's position in every stretch of `world_size` samples of the global order."""
        return self.local_rank * self.nodes + self.rank // self.local_world_size


def rank_layout() -> RankLayout:
    """This process's layout, from torch.distributed when initialised; exports it for streaming.

    Streaming reads RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from the environment (also
    in DataLoader workers); missing ones are set from the process group (one node, unless
    LOCAL_WORLD_SIZE says otherwise) and contradicting ones are refused.
    """
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank, size = 0, 1
    for key, value in (("RANK", rank), ("WORLD_SIZE", size)):
        if key in env and int(env[key]) != value:
            raise DataError(f"{key}={env[key]} in the environment, but this process is rank {rank} of {size} "
                            f"(torch.distributed {'is' if size > 1 else 'is not'} initialised)")
    local_size = int(env.get("LOCAL_WORLD_SIZE", size))
    local_rank = int(env.get("LOCAL_RANK", rank % local_size))
    if local_size <= 0 or size % local_size or local_rank != rank % local_size:
        raise DataError(f"rank {rank} of {size} has LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_size}: "
                        f"ranks must be numbered node by node with the same number of ranks per node")
    layout = RankLayout(rank, size, local_rank, local_size)
    if size > 1:
        env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank),
                   LOCAL_WORLD_SIZE=str(local_size))
    return layout


def global_micro_batches(per_rank: Sequence[Sequence[torch.Tensor]],
                         local_world_size: int | None = None) -> list[torch.Tensor]:
    """Assemble one step's global micro-batches from every rank's micro-batches (in rank order).

    Row k of global micro-batch a is row k // W of micro-batch a on the rank whose slot is k % W
    (see the module docstring); ``local_world_size`` defaults to all ranks on one node.
    """
    world = len(per_rank)
    slots = [RankLayout(r, world, r % (local_world_size or world), local_world_size or world).slot
             for r in range(world)]
    by_slot = [per_rank[slots.index(s)] for s in range(world)]
    return [torch.stack([rank_batches[a] for rank_batches in by_slot], dim=1).flatten(0, 1)
            for a in range(len(per_rank[0]))]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_reduce_sum(values: list[int]) -> list[int]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return total.tolist()


# ---- shared memory left by killed jobs ---------------------------------------------------------

_fallback_cleaned = False
_own_prefixes: set[str] = set()  # shared-memory prefixes of the datasets this process opened


def clean_stale_shared_memory(layout: RankLayout) -> None:
    """Unlink streaming's shared memory that no live process maps (local rank 0), then a barrier."""
    global _fallback_cleaned
    if not (Path("/proc/self/maps").is_file() and _SHM_DIR.is_dir()):
        if not _fallback_cleaned:  # streaming's own: every segment, once, before any dataset
            from streaming.base.util import clean_stale_shared_memory as clean_all

            clean_all()
            _fallback_cleaned = True
        return
    if layout.local_rank == 0:
        for name in _unmapped_streaming_segments():
            try:
                (_SHM_DIR / name).unlink()
            except OSError:  # gone already, or another user's
                pass
    _barrier()


def _unmapped_streaming_segments() -> list[str]:
    """Streaming's segments (``NNNNNN_<kind>``) of prefixes that no process maps any part of.

    Opening a dataset maps every segment it scans while choosing its prefix, and keeps them mapped
    until exit; so in this process only the prefixes of its own datasets count as live.
    """
    from streaming.base.constant import SHM_TO_CLEAN

    pattern = re.compile(r"(\d{6})_(?:%s)" % "|".join(SHM_TO_CLEAN))
    segments = {name: match.group(1) for name in os.listdir(_SHM_DIR) if (match := pattern.fullmatch(name))}
    live, me = set(_own_prefixes), Path("/proc") / str(os.getpid())
    for process in Path("/proc").glob("[0-9]*"):
        if process != me:
            try:
                live.update(re.findall(r"/dev/shm/(\d{6})_", (process / "maps").read_text()))
            except OSError:  # the process ended, or is not ours to read
                continue
    return [name for name, prefix in segments.items() if prefix not in live]


# ---- the dataset -------------------------------------------------------------------------------

_MAPPED_SHARDS = 64  # shard files one reading process keeps mapped (each mapping holds a file descriptor)
_UINT32 = struct.Struct("=I")  # how an MDS shard stores its sample count, offsets and column sizes


class _MappedShard:
    """A decompressed MDS shard file mapped into memory: a sample's tokens by slicing, not by reading.

    Streaming's reader (``MDSReader.get_sample_data``) opens the file, seeks and reads twice for
    every sample; that was most of the loader's cost. The MDS layout read here: a uint32 sample
    count, count + 1 uint32 byte offsets of the samples, then per sample the uint32 sizes of its
    variable-size columns followed by every column's encoded value (in ``column_names`` order).
    Only the tokens column is decoded, by streaming's own decoder for its encoding.

    Streaming never rewrites a shard file in place (a download or decompression writes a new file
    and renames it over; eviction deletes it), so a mapping stays readable and holds the data it
    was made from; `is_current` tells whether the path still names that file.
    """

    def __init__(self, reader) -> None:
        """Map the decompressed file of the shard that `reader` (an ``MDSReader``) reads."""
        from streaming.base.format.mds.encodings import mds_decode

        self.path = os.path.join(reader.dirname, reader.split, reader.raw_data.basename)
        with open(self.path, "rb") as file:
            self.identity = _file_identity(os.fstat(file.fileno()))
            self.buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self.samples = reader.samples
        self._check_layout()
        position = reader.column_names.index("tokens")
        self.decode = partial(mds_decode, reader.column_encodings[position])
        sizes = reader.column_sizes
        variable = [i for i, size in enumerate(sizes) if not size]
        self.sizes = struct.Struct(f"={len(variable)}I")  # heads every sample: its variable columns' sizes
        self.fixed_before = sum(size for size in sizes[:position] if size)
        self.variable_before = sum(1 for i in variable if i < position)
        self.fixed_size = sizes[position]

    def _check_layout(self) -> None:
        """The file holds the shard's sample count, and its last sample ends where the file does."""
        size, count = len(self.buffer), self.samples
        if (size < 4 * (count + 2) or _UINT32.unpack_from(self.buffer)[0] != count
                or _UINT32.unpack_from(self.buffer, 4 + 4 * count)[0] != size):
            raise ValueError(f"{size} bytes do not hold the {count} samples index.json describes")

    def is_current(self) -> bool:
        try:
            return _file_identity(os.stat(self.path)) == self.identity
        except FileNotFoundError:
            return False

    def tokens(self, index: int) -> np.ndarray:
        if not 0 <= index < self.samples:
            raise IndexError(f"sample {index} of a shard of {self.samples}")
        begin, = _UINT32.unpack_from(self.buffer, 4 + 4 * index)
        sizes = self.sizes.unpack_from(self.buffer, begin)
        start = begin + self.sizes.size + self.fixed_before + sum(sizes[:self.variable_before])
        size = self.fixed_size or sizes[self.variable_before]
        return self.decode(self.buffer[start:start + size])


def _file_identity(status: os.stat_result) -> tuple[int, int]:
    """Which file a path names. While mapped, a deleted file's inode is not freed, so not reused."""
    return status.st_dev, status.st_ino


class _MappedShards:
    """The shard files one process keeps mapped, by shard id; the least recently read is dropped first.

    With ``verify`` (the dataset has a cache_limit, so streaming may evict a shard and fetch it again)
    a mapping is checked against its path at every read, and `drop_stale` drops those of files
    deleted or replaced since, whose disk space they would keep in use; it runs whenever this
    process maps or fetches a shard. Without a cache_limit streaming deletes no shard file.
    Pickles empty: mappings do not cross processes.
    """

    def __init__(self, verify: bool) -> None:
        self.verify = verify
        self._maps: OrderedDict[int, _MappedShard] = OrderedDict()

    def __reduce__(self):
        return type(self), (self.verify,)

    def __contains__(self, shard_id: int) -> bool:
        return shard_id in self._maps

    def get(self, shard_id: int, reader) -> _MappedShard | None:
        """The mapping of the shard's file, made now if needed; None if the file is not there."""
        mapped = self._maps.get(shard_id)
        if mapped is not None and (not self.verify or mapped.is_current()):
            self._maps.move_to_end(shard_id)
            return mapped
        self.drop_stale()
        try:
            mapped = self._maps[shard_id] = _MappedShard(reader)
        except FileNotFoundError:
            return None
        if len(self._maps) > _MAPPED_SHARDS:
            self._maps.popitem(last=False)
        return mapped

    def drop_stale(self) -> None:
        if self.verify:
            for shard_id in [key for key, mapped in self._maps.items() if not mapped.is_current()]:
                del self._maps[shard_id]


_dataset_class = None


def _sample_dataset_class():
    """A StreamingDataset yielding (tokens, stream index) that reports unreadable shards as DataError.

    Built on first use so that importing this module does not import streaming; the module's
    ``__getattr__`` hands it to pickle (DataLoader workers under the spawn start method).
    """
    global _dataset_class
    if _dataset_class is not None:
        return _dataset_class
    from streaming import StreamingDataset

    class _SampleDataset(StreamingDataset):
        sample_tokens = 0  # seq_len + 1, set by the creator

        def __init__(self, **options) -> None:
            super().__init__(**options)
            self.mapped_shards = _MappedShards(verify=bool(self.cache_limit))

        def get_item(self, sample_id: int, retry: int = 7):
            shard_id, index = self.spanner[sample_id]
            try:
                tokens = self._tokens(sample_id, shard_id, index, retry)
            except DataError:
                raise
            except (OSError, ValueError, RuntimeError) as e:
                raise DataError(_shard_problem(self, shard_id, e)) from None
            if tokens.shape != (self.sample_tokens,):
                raise DataError(f"{_shard_file(self, shard_id)}: a sample holds {tokens.shape[0]} tokens, "
                                f"expected seq_len + 1 = {self.sample_tokens} as the manifest says")
            return tokens, int(self.stream_per_shard[shard_id])

        def _tokens(self, sample_id: int, shard_id: int, index: int, retry: int) -> np.ndarray:
            """The sample's tokens from its mapped shard file, or streaming's reader while the file is
            missing: it fetches the shard (waiting for it, re-downloading an evicted one) first."""
            mapped = self.mapped_shards.get(shard_id, self.shards[shard_id])
            if mapped is None:
                tokens = super().get_item(sample_id, retry)["tokens"]
                self.mapped_shards.drop_stale()  # fetching the shard may have evicted others
                return tokens
            if self.cache_limit:  # as streaming's get_item does: eviction takes the least recently used shard
                self._shard_access_times[shard_id] = time.time_ns()
            return mapped.tokens(index)

        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            # Streaming's download thread calls this for every sample, taking a file lock each time;
            # that thread's system calls took the interpreter from the reading thread over and over.
            # A shard this process has mapped is decompressed already, and without a cache_limit
            # nothing deletes it (nor reads the access times that this would update): done.
            if not self.cache_limit and shard_id in self.mapped_shards:
                return
            # Streaming leaves a shard whose preparation failed in PREPARING, and a reader waiting
            # for it would wait forever: restore its state. Its download threads (blocking=False)
            # only log what they raise: they stop the epoch instead, and __iter__ raises.
            before = int(self._shard_states[shard_id])
            try:
                super().prepare_shard(shard_id, blocking)
            except Exception as e:
                self._shard_states[shard_id] = before
                self.shard_failure = _shard_problem(self, shard_id, e)
                if blocking:
                    raise DataError(self.shard_failure) from None
                self._event.set()

        def __iter__(self):
            try:
                yield from super().__iter__()
            finally:  # also when abandoned mid-epoch: stop streaming's download threads
                if hasattr(self, "_iterator"):
                    self._iterator.non_blocking_exit()
            failure = getattr(self, "shard_failure", None)
            if failure:
                raise DataError(failure)

    _SampleDataset.__module__, _SampleDataset.__qualname__ = __name__, "_SampleDataset"
    _dataset_class = _SampleDataset
    return _dataset_class


def __getattr__(name: str):
    if name == "_SampleDataset":
        return _sample_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _shard_file(dataset, shard_id: int) -> str:
    stream = dataset.streams[dataset.stream_per_shard[shard_id]]
    raw, zipped = dataset.shards[shard_id].file_pairs[0]
    basename = (zipped or raw).basename
    where = os.path.join(stream.local, stream.split, basename)
    if stream.remote:
        where += f" (from {os.path.join(stream.remote, stream.split, basename)})"
    return where


def _shard_problem(dataset, shard_id: int, error: Exception) -> str:
    if "Checksum failure" in str(error):
        reason = f"corrupt shard: its {HASH_ALGORITHM} differs from the one index.json records"
    else:
        reason = f"cannot read this shard ({type(error).__name__}: {_first_line(error)})"
    return f"{_shard_file(dataset, shard_id)}: {reason}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _one_line(error: DataError) -> str:
    """A DataError's message; a worker's error arrives wrapped in its traceback, last line first-class."""
    text = str(error).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split("DataError: ", 1)[1] if "DataError: " in last else last


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """A micro-batch's (int64 tokens, stream indices) as numpy arrays, which a DataLoader worker
    sends through its pipe as bytes: a torch tensor would cross through shared memory, with a
    socket handshake per tensor that waits for the worker's busy interpreter."""
    tokens = np.stack([tokens for tokens, _ in samples], dtype=np.int64)
    return tokens, np.array([stream for _, stream in samples], dtype=np.int64)


def _check_specs(streams: Sequence[StreamSpec]) -> None:
    names = [spec.name for spec in streams]
    paths = [os.path.realpath(spec.path) for spec in streams]
    for i, spec in enumerate(streams):
        if spec.weight <= 0:
            raise DataError(f"stream {spec.name!r}: weight {spec.weight} must be positive")
        if names.index(spec.name) != i:
            raise DataError(f"two streams are named {spec.name!r}; give them distinct names")
        if paths.index(paths[i]) != i:
            raise DataError(f"two streams use the folder {spec.path}; each needs its own (local cache) folder")


def _open_dataset(streams: Sequence[StreamSpec], split: str, seq_len: int, layout: RankLayout,
                  validate_hash: bool, weighted: bool, **options):
    """A _SampleDataset over the streams' `split`; streaming's complaints become DataError."""
    from streaming import Stream

    for spec in streams:
        index = Path(spec.path) / split / "index.json"
        if not spec.remote and not index.is_file():
            raise DataError(f"{index}: no such file; {spec.path} lacks its {split} split")
    clean_stale_shared_memory(layout)
    algorithm = HASH_ALGORITHM if validate_hash else None
    parts = [Stream(remote=spec.remote or None, local=spec.path, split=split,
                    proportion=spec.weight if weighted else None, validate_hash=algorithm) for spec in streams]
    try:
        dataset = _sample_dataset_class()(streams=parts, **options)
    except (OSError, ValueError, RuntimeError) as e:
        names = ", ".join(spec.name for spec in streams)
        if "Reused local directory" in str(e):
            raise DataError(f"streams {names}: a running job on this machine reads the same cache folder "
                            f"(streaming's shared memory for it is mapped by a live process)") from None
        raise DataError(f"streams {names} ({split}): {_first_line(e)}") from None
    dataset.sample_tokens = seq_len + 1
    _own_prefixes.add(f"{dataset._shm_prefix_int:06}")
    return dataset


def _cache_limit_problem(dataset, readers: int, micro_batch_size: int) -> str | None:
    """Why the cache_limit is so small that streaming can deadlock, if it is.

    Each reader (a DataLoader worker, or a rank without workers; all of a node share the cache)
    downloads up to ``predownload`` samples ahead of the one it yields, shuffled over as many
    shards. Streaming evicts the least recently used shard; if that is one a reader still waits
    for, it waits forever (it does not fetch it again). Room for twice the readers' windows keeps
    eviction behind every window.
    """
    window = dataset.predownload + micro_batch_size
    shards = min(dataset.num_shards, 2 * readers * window)
    largest = max(shard.get_max_size() for shard in dataset.shards)
    needed = sum(stream.get_index_size() for stream in dataset.streams) + shards * largest
    if dataset.cache_limit >= needed:
        return None
    return (f"cache_limit {dataset.cache_limit} bytes is too small: {readers} reader(s) each download up to "
            f"{window} samples ahead, from up to {shards} shards of up to {largest} bytes, so streaming can "
            f"deadlock below {needed} bytes; raise cache_limit, or lower num_workers or micro_batch_size")


# ---- training batches --------------------------------------------------------------------------

# Samples streaming's threads prepare ahead of the reader without a cache_limit (with one, streaming's
# default of 8 micro-batches: the window is what the cache must hold). They poll every 7 ms
# (streaming's TICK): a reader that drains the window within a tick sleeps a whole tick, and at
# tens of thousands of samples/s a tick is hundreds of samples.
_READY_AHEAD = 2048


class StreamingBatches:
    """Each optimizer step's micro-batches for this rank, streamed from prepared MDS datasets.

    Every micro-batch is a LongTensor [micro_batch_size, seq_len + 1]; ``micro_batch_size`` is
    per rank, so a step reads G = micro_batch_size * accumulation * world_size samples. How the
    ranks' micro-batches form the global ones, and why that is the same on any world size, is in
    the module docstring. Building it is collective when torch.distributed is initialised.
    """

    def __init__(self, streams: list[StreamSpec], seq_len: int, micro_batch_size: int, accumulation: int,
                 split: str = "train", seed: int = 0, num_workers: int = 2, cache_limit: str | None = None,
                 num_canonical_nodes: int = 1, shuffle: bool = True, validate_hash: bool = True):
        for label, value in (("micro_batch_size", micro_batch_size), ("accumulation", accumulation),
                             ("num_canonical_nodes", num_canonical_nodes)):
            if value <= 0:
                raise DataError(f"{label} = {value} must be positive")
        if split not in SPLITS or num_workers < 0 or seed < 0:
            raise DataError(f"split {split!r} (one of {SPLITS}), num_workers {num_workers} and seed {seed} "
                            f"(both >= 0): one is out of range")
        _check_specs(streams)
        manifests = _load_manifests(streams, seq_len)
        counts = {path: manifest.samples.get(split, 0) for path, manifest in manifests}
        empty = [str(path) for path, count in counts.items() if count <= 0]
        if empty:
            raise DataError(f"{empty[0]}: its {split} split holds no samples")
        if cache_limit and any(not spec.remote for spec in streams):
            local = next(spec for spec in streams if not spec.remote)
            raise DataError(f"cache_limit {cache_limit!r} would let streaming evict (delete) shards of the local "
                            f"stream {local.name!r} from {local.path}; set cache_limit only when every stream "
                            f"is remote")
        self.layout = layout = rank_layout()
        nodes = layout.nodes
        if num_canonical_nodes % nodes and nodes % num_canonical_nodes:
            raise DataError(f"num_canonical_nodes = {num_canonical_nodes} and the {nodes} nodes of this job must "
                            f"divide one another")

        self.streams, self.seq_len, self.split = list(streams), seq_len, split
        self.micro_batch_size, self.accumulation = micro_batch_size, accumulation
        self.seed, self.num_canonical_nodes, self.shuffle = seed, num_canonical_nodes, shuffle
        self.global_batch = micro_batch_size * accumulation * layout.world_size
        unit = math.lcm(self.global_batch, num_canonical_nodes)
        total = sum(counts.values())
        self.epoch_size = max(unit, total - total % unit)

        self._dataset = _open_dataset(
            streams, split, seq_len, layout, validate_hash, weighted=True, epoch_size=self.epoch_size,
            batch_size=micro_batch_size, shuffle=shuffle, shuffle_seed=seed, num_canonical_nodes=num_canonical_nodes,
            partition_algo="orig", cache_limit=cache_limit or None,
            predownload=None if cache_limit else max(8 * micro_batch_size, _READY_AHEAD))
        problem = cache_limit and _cache_limit_problem(self._dataset, layout.local_world_size * max(1, num_workers),
                                                       micro_batch_size)
        if problem:
            self._dataset.__del__()  # unregister its cache folders now: the error's traceback keeps it alive
            raise DataError(problem)
        self._loader = torch.utils.data.DataLoader(self._dataset, batch_size=micro_batch_size,
                                                   num_workers=num_workers, collate_fn=_collate)
        self._epoch = self._sample_in_epoch = self._step = 0
        self._local_samples = [0] * len(streams)  # served by this rank since start or load
        self._base_tokens = [0] * len(streams)  # global tokens per stream at the loaded checkpoint
        self._micro_batches: Iterator | None = None

    # -- iteration --

    def next_step(self) -> list[torch.Tensor]:
        """This rank's `accumulation` micro-batches of the next optimizer step."""
        if self._micro_batches is None:
            self._micro_batches = self._epochs()
        batches = []
        for _ in range(self.accumulation):
            try:
                tokens, streams = next(self._micro_batches)
            except DataError as e:
                raise DataError(_one_line(e)) from None
            for stream, n in enumerate(np.bincount(streams, minlength=len(self.streams))):
                self._local_samples[stream] += int(n)
            self._sample_in_epoch += self.micro_batch_size * self.layout.world_size
            if self._sample_in_epoch == self.epoch_size:
                self._epoch, self._sample_in_epoch = self._epoch + 1, 0
            batches.append(torch.from_numpy(tokens))
        self._step += 1
        return batches

    def _epochs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Micro-batches across epochs, each epoch started where the position says."""
        while True:
            epoch = self._epoch
            self._dataset.load_state_dict(self._streaming_state())
            expected = (self.epoch_size - self._sample_in_epoch) // (self.micro_batch_size * self.layout.world_size)
            batches = iter(self._loader)
            try:
                for served in range(expected):
                    batch = next(batches, None)
                    if batch is None:
                        raise RuntimeError(f"streaming ended epoch {epoch} after {served} of {expected} micro-batches")
                    yield batch
                if next(batches, None) is not None:
                    raise RuntimeError(f"streaming served more than the {expected} micro-batches of epoch {epoch}")
            finally:
                # Stop the workers now (StreamingDataLoader.__del__ calls the same): after an error
                # its traceback keeps the iterator alive, and a garbage collection that finds it
                # later, e.g. while the next epoch's workers start, can hang in the join.
                getattr(batches, "_shutdown_workers", lambda: None)()

    def _streaming_state(self) -> dict:
        """The position in `StreamingDataset.state_dict` format (sample_in_epoch counts all ranks)."""
        return {"epoch": self._epoch, "sample_in_epoch": self._sample_in_epoch,
                "num_canonical_nodes": self.num_canonical_nodes, "shuffle_seed": self.seed}

    # -- position --

    def tokens_per_stream(self) -> dict[str, int]:
        """Tokens (seq_len per sample) served so far by ALL ranks, per stream name.

        Collective when torch.distributed is initialised: every rank must call it, as the
        training loop does each step.
        """
        local = [n * self.seq_len for n in self._local_samples]
        served = _all_reduce_sum(local)
        return {spec.name: base + n for spec, base, n in zip(self.streams, self._base_tokens, served)}

    def state_dict(self) -> dict:
        """The position after the last step, the same on every rank (collective, see tokens_per_stream)."""
        return {"kind": STATE_KIND, "split": self.split, "step": self._step, **self._streaming_state(),
                **self._order(), "tokens_per_stream": self.tokens_per_stream()}

    def _order(self) -> dict:
        """What fixes the sample order: a checkpoint only continues under the same values."""
        return {"global_batch": self.global_batch, "epoch_size": self.epoch_size, "shuffle": self.shuffle,
                "streams": {spec.name: spec.weight for spec in self.streams}}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the next sample after `state`, on any world size with the same global batch."""
        expected = {"kind": STATE_KIND, "split": self.split, "num_canonical_nodes": self.num_canonical_nodes,
                    "shuffle_seed": self.seed, **self._order()}
        for key, value in expected.items():
            if state.get(key) != value:
                raise DataError(f"the checkpoint's data position was saved with {key} = {state.get(key)!r}, "
                                f"this run has {value!r}: it cannot continue the same sample order")
        self.close()
        self._epoch, self._sample_in_epoch, self._step = (int(state[key]) for key in
                                                          ("epoch", "sample_in_epoch", "step"))
        tokens = state["tokens_per_stream"]
        self._base_tokens = [int(tokens[spec.name]) for spec in self.streams]
        self._local_samples = [0] * len(self.streams)

    def close(self) -> None:
        """Stop the DataLoader workers and streaming's threads; next_step starts them again."""
        if self._micro_batches is not None:
            self._micro_batches.close()
            self._micro_batches = None


# ---- evaluation --------------------------------------------------------------------------------

def eval_batches(streams: list[StreamSpec], seq_len: int, micro_batch_size: int, count: int,
                 validate_hash: bool = True) -> list[torch.Tensor]:
    """A fixed held-out set: `count` micro-batches from the streams' `val` splits, the same on every rank.

    Stream i contributes its first n_i val samples, n_i being its weight's share of
    count * micro_batch_size (largest remainders); the streams are interleaved evenly. Collective
    when torch.distributed is initialised.
    """
    _check_specs(streams)
    manifests = _load_manifests(streams, seq_len)
    total = count * micro_batch_size
    weights = np.array([spec.weight for spec in streams], dtype=np.float64)
    shares = total * weights / weights.sum()
    quota = np.floor(shares).astype(np.int64)
    for i in np.argsort(-(shares - quota), kind="stable")[:total - int(quota.sum())]:
        quota[i] += 1
    for (path, manifest), n in zip(manifests, quota):
        if n > manifest.samples.get("val", 0):
            raise DataError(f"{path}: the val split holds {manifest.samples.get('val', 0)} samples, but the "
                            f"evaluation set needs {n} from this stream; evaluate on fewer batches")
    dataset = _open_dataset(streams, "val", seq_len, rank_layout(), validate_hash, weighted=False,
                            batch_size=micro_batch_size)
    order = sorted(((j + 0.5) / n, i, j) for i, n in enumerate(quota.tolist()) for j in range(n))
    try:
        rows = [dataset.get_item(int(dataset.sample_offset_per_stream[i]) + j)[0] for _, i, j in order]
    except DataError as e:
        raise DataError(_one_line(e)) from None
    tokens = torch.from_numpy(np.stack(rows)).long()
    return list(tokens.split(micro_batch_size))
