"""The streaming loader over prepared MDS datasets: determinism across world sizes and workers,
exact resume, mixing, remote caching, bad input, and leftovers of killed jobs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stratagem.data import streaming as mds
from stratagem.data.sources import DataError
from stratagem.data.streaming import StreamingBatches, StreamSpec, check_streams, eval_batches, global_micro_batches
from tests.distributed import RankError, run_ranks

SEQ, VOCAB, SEED = 16, 1000, 5
SPLIT_ID = {"train": 0, "val": 1}
# Two streams of 130 + 70 train samples; a global micro-batch of 8 and 2 micro-batches per step
# make G = 16, an epoch of 192 samples = 12 steps: 30 steps cross two epoch boundaries.
ACCUM, GLOBAL_MICRO, STEPS, SAVE_AT = 2, 8, 30, (5, 27)


# ---- prepared datasets, written here the way `stratagem data prepare` lays them out -------------

def sample_tokens(stream: int, split: str, index: int, seq_len: int = SEQ) -> np.ndarray:
    """Sample `index` of a split: tokens[0] = stream, tokens[1:3] = index, tokens[3] = split."""
    tokens = (np.arange(seq_len + 1) * 7 + index * 13 + stream * 101) % VOCAB
    tokens[:4] = [stream, index // 1000, index % 1000, SPLIT_ID[split]]
    return tokens.astype(np.int32)


def write_dataset(root: Path, stream: int, train: int, val: int, seq_len: int = SEQ,
                  model_sha256: str = "a" * 64, parts: int = 2, shard_samples: int = 20) -> Path:
    """A prepared directory: per split, `parts` MDS parts under part-NNNNN/ and a root index.json."""
    from streaming import MDSWriter

    columns = {"tokens": "ndarray:int32", "doc_starts": "ndarray:int32"}
    for split, count in (("train", train), ("val", val)):
        bounds = np.linspace(0, count, parts + 1).astype(int)
        shards = []
        for part in range(parts):
            name = f"part-{part:05d}"
            with MDSWriter(out=str(root / split / name), columns=columns, compression="zstd", hashes=["sha1"],
                           size_limit=shard_samples * (seq_len + 8) * 4) as writer:
                for i in range(bounds[part], bounds[part + 1]):
                    writer.write({"tokens": sample_tokens(stream, split, i, seq_len),
                                  "doc_starts": np.array([0, 5], np.int32)})
            for shard in json.loads((root / split / name / "index.json").read_text())["shards"]:
                for key in ("raw_data", "zip_data"):
                    shard[key]["basename"] = f"{name}/{shard[key]['basename']}"
                shards.append(shard)
        (root / split / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))
    manifest = {"format": "stratagem-mds", "version": 1, "seq_len": seq_len,
                "tokenizer": {"model_sha256": model_sha256, "vocab_size": VOCAB,
                              "special_ids": {"pad": 0, "unk": 1, "bos": 2, "eos": 3}},
                "val_fraction": 0.1, "documents": {"train": train, "val": val},
                "tokens": {"train": train * seq_len, "val": val * seq_len}, "samples": {"train": train, "val": val},
                "dropped_tokens": {"train": 0, "val": 0}, "sources": [],
                "columns": columns}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Datasets nobody reads in place (reading a local dataset decompresses its shards into it)."""
    root = tmp_path_factory.mktemp("pristine")
    write_dataset(root / "alpha", 0, train=130, val=24)
    write_dataset(root / "beta", 1, train=70, val=24)
    return root


@pytest.fixture(scope="module")
def mix(pristine, tmp_path_factory) -> list[str]:
    """Local copies of the two streams, shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("mix")
    return [str(shutil.copytree(pristine / name, root / name)) for name in ("alpha", "beta")]


def specs(paths: list[str], weights=(0.7, 0.3)) -> list[StreamSpec]:
    return [StreamSpec(path, weight=weight) for path, weight in zip(paths, weights)]


def ids(batch: torch.Tensor) -> list[tuple[int, int]]:
    """(stream, index) of every row."""
    return [(int(row[0]), int(row[1]) * 1000 + int(row[2])) for row in batch]


def run(paths: list[str], micro: int, workers: int, state: dict | None = None, steps: int = STEPS,
        save_at=SAVE_AT) -> dict:
    """Steps from the start or from `state`: each step's micro-batches as [micro, 3] id tensors."""
    loader = StreamingBatches(specs(paths), SEQ, micro, ACCUM, seed=SEED, num_workers=workers)
    first = 0
    if state is not None:
        loader.load_state_dict(state)
        first = state["step"]
    out = {"steps": [], "states": {}}
    for step in range(first + 1, steps + 1):
        out["steps"].append([batch[:, :3].clone() for batch in loader.next_step()])
        if step in save_at:
            out["states"][step] = loader.state_dict()
    out["tokens"] = loader.tokens_per_stream()
    loader.close()
    return out


def one_line_error(call, *args, **kwargs) -> str:
    """The message of the DataError that call(...) raises, which must be one line."""
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def as_lists(steps: list[list[torch.Tensor]]) -> list[list[list[int]]]:
    return [[batch.tolist() for batch in step] for step in steps]


# ---- determinism across world sizes (real gloo ranks) -----------------------------------------

def elastic_rank(rank: int, world_size: int, paths: list[str], workers: int, resume: dict) -> dict:
    """One launch: the uninterrupted run, then a resumption from each given state."""
    out = run(paths, GLOBAL_MICRO // world_size, workers)
    out["resumed"] = {step: run(paths, GLOBAL_MICRO // world_size, workers, state)["steps"]
                      for step, state in resume.items()}
    return out


def global_steps(per_rank: list[list[list[torch.Tensor]]]) -> list[list[list[int]]]:
    """Each step's global micro-batches from every rank's micro-batches."""
    return [[batch.tolist() for batch in global_micro_batches([steps[i] for steps in per_rank])]
            for i in range(len(per_rank[0]))]


@pytest.mark.slow
def test_global_batches_are_identical_on_1_2_and_4_ranks_and_resume_across_world_sizes(mix):
    two = run_ranks(2, elastic_rank, mix, 2, {})
    states = two[0]["states"]
    assert all(result["states"] == states and result["tokens"] == two[0]["tokens"] for result in two)
    assert states[SAVE_AT[1]]["epoch"] == 2  # the second save point lies beyond two epoch ends
    four = run_ranks(4, elastic_rank, mix, 0, states)
    one = elastic_rank(0, 1, mix, 2, states)

    reference = as_lists(one["steps"])
    assert global_steps([r["steps"] for r in two]) == reference
    assert global_steps([r["steps"] for r in four]) == reference
    for step in SAVE_AT:  # saved on 2 ranks, resumed on 1 and on 4
        assert as_lists(one["resumed"][step]) == reference[step:]
        assert global_steps([r["resumed"][step] for r in four]) == reference[step:]

    streams = [row[0] for step in reference for batch in step for row in batch]
    assert one["tokens"] == two[0]["tokens"] == four[0]["tokens"] == {
        "alpha": streams.count(0) * SEQ, "beta": streams.count(1) * SEQ}
    # concatenating the ranks' micro-batches gives the same samples, in another order
    concatenated = [[sum((r["steps"][i][a].tolist() for r in two), []) for a in range(ACCUM)] for i in range(STEPS)]
    assert [sorted(map(sorted, step)) for step in concatenated] == [sorted(map(sorted, step)) for step in reference]
    assert concatenated != reference


def test_global_micro_batches_interleave_ranks():
    per_rank = [[torch.tensor([[0], [2]])], [torch.tensor([[1], [3]])]]
    assert global_micro_batches(per_rank)[0].flatten().tolist() == [0, 1, 2, 3]
    # two nodes of two ranks: streaming strides over nodes first, so slots are 0, 2, 1, 3
    per_rank = [[torch.tensor([[s]])] for s in (0, 2, 1, 3)]
    assert global_micro_batches(per_rank, local_world_size=2)[0].flatten().tolist() == [0, 1, 2, 3]


# ---- one process: workers, resumption, mixing -------------------------------------------------

def test_workers_do_not_change_batches_and_resume_continues_exactly(mix):
    runs = {workers: run(mix, GLOBAL_MICRO, workers) for workers in (0, 2)}
    reference = as_lists(runs[0]["steps"])
    assert as_lists(runs[2]["steps"]) == reference
    assert runs[0]["states"] == runs[2]["states"] and runs[0]["tokens"] == runs[2]["tokens"]
    assert [runs[0]["states"][s]["epoch"] for s in SAVE_AT] == [0, 2]
    for saved_with in (0, 2):  # mid-epoch and after two epochs, resumed with either worker count
        for step in SAVE_AT:
            resumed = run(mix, GLOBAL_MICRO, 2 - saved_with, runs[saved_with]["states"][step])
            assert as_lists(resumed["steps"]) == reference[step:]
            assert resumed["tokens"] == runs[0]["tokens"]


def test_mixing_weights_are_met_and_samples_decode_exactly(tmp_path):
    sizes = {"alpha": 400, "beta": 150, "gamma": 250}
    paths = [str(write_dataset(tmp_path / name, i, train=n, val=4)) for i, (name, n) in enumerate(sizes.items())]
    weights = (0.5, 0.3, 0.2)
    loader = StreamingBatches(specs(paths, weights), SEQ, 100, 1, seed=SEED, num_workers=2)
    rows = torch.cat([batch for _ in range(100) for batch in loader.next_step()])
    tokens = loader.tokens_per_stream()
    loader.close()
    assert len(rows) == 10_000
    streams = rows[:, 0].numpy()
    for stream, weight in enumerate(weights):
        assert abs((streams == stream).mean() - weight) < 0.02
    assert tokens == {name: int((streams == i).sum()) * SEQ for i, name in enumerate(sizes)}
    for row in rows[::97]:
        stream, index = int(row[0]), int(row[1]) * 1000 + int(row[2])
        assert np.array_equal(row.numpy(), sample_tokens(stream, "train", index))


def test_eval_batches_are_fixed_weighted_val_samples(mix):
    batches = eval_batches(specs(mix), SEQ, micro_batch_size=4, count=3)
    assert [tuple(b.shape) for b in batches] == [(4, SEQ + 1)] * 3
    rows = torch.cat(batches)
    assert (rows[:, 3] == SPLIT_ID["val"]).all()
    chosen = ids(rows)  # weights .7/.3 of 12 samples: 8.4/3.6 -> 8 and 4, each stream's first ones
    assert sorted(chosen) == [(0, i) for i in range(8)] + [(1, i) for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(batches, eval_batches(specs(mix), SEQ, 4, 3)))
    with pytest.raises(DataError, match="val split holds 24 samples"):
        eval_batches(specs(mix), SEQ, micro_batch_size=10, count=10)


# ---- remote datasets through a local cache ----------------------------------------------------

def test_remote_streams_read_through_the_cache_like_local_copies(pristine, mix, tmp_path):
    remote = [StreamSpec(str(tmp_path / f"cache-{name}"), remote=str(pristine / name), weight=w)
              for name, w in (("alpha", 0.7), ("beta", 0.3))]
    assert [spec.name for spec in remote] == ["alpha", "beta"]
    local = run(mix, GLOBAL_MICRO, 0, steps=14, save_at=())
    loader = StreamingBatches(remote, SEQ, GLOBAL_MICRO, ACCUM, seed=SEED, num_workers=2)
    cached = [[batch[:, :3] for batch in loader.next_step()] for _ in range(14)]
    loader.close()
    assert as_lists(cached) == as_lists(local["steps"])
    assert (tmp_path / "cache-alpha" / "manifest.json").is_file()
    assert list((tmp_path / "cache-alpha" / "train" / "part-00001").glob("shard.*.mds"))
    assert all(torch.equal(a, b) for a, b in zip(eval_batches(remote, SEQ, 4, 3), eval_batches(specs(mix), SEQ, 4, 3)))

    # A cache smaller than the data: shards are evicted and fetched again, the samples stay the
    # same. Streaming's own minimum (indexes + 4 of the largest shards) can deadlock: refused.
    seq = 256
    big = write_dataset(tmp_path / "big", 2, train=800, val=4, seq_len=seq, shard_samples=25)
    index = big / "train" / "index.json"
    shards = json.loads(index.read_text())["shards"]
    largest = max(shard["raw_data"]["bytes"] + shard["zip_data"]["bytes"] for shard in shards)
    minimum = index.stat().st_size + 4 * largest
    small = [StreamSpec(str(tmp_path / "small"), remote=str(big))]
    refusal = one_line_error(StreamingBatches, small, seq, 1, 1, num_workers=0, cache_limit=f"{minimum + 1}b")
    limit = int(re.search(r"deadlock below (\d+) bytes", refusal).group(1))
    assert sum(shard["raw_data"]["bytes"] for shard in shards) > 1.2 * limit
    copy = [StreamSpec(str(shutil.copytree(big, tmp_path / "copy")))]
    sequences = []
    for streams, cache_limit in ((small, f"{limit}b"), (copy, None)):  # a whole epoch and more
        loader = StreamingBatches(streams, seq, 1, 1, seed=SEED, num_workers=0, cache_limit=cache_limit)
        sequences.append([loader.next_step()[0][:, :3] for _ in range(805)])
        loader.close()
    assert as_lists(sequences[0]) == as_lists(sequences[1])
    # streaming's prefetch can leave one shard beyond the limit while eviction catches up: in about
    # 1 run of 4 here the cache ended exactly one shard (25.5 kB) over a 522 kB limit, never more
    cached_files = {str(p.relative_to(tmp_path / "small")): p.stat().st_size
                    for p in (tmp_path / "small" / "train").rglob("*") if p.is_file()}
    assert sum(cached_files.values()) <= limit + largest, cached_files

    assert "cache limit" in one_line_error(StreamingBatches, small, seq, 1, 1, cache_limit="1kb").lower()
    with pytest.raises(DataError, match="would let streaming evict"):
        StreamingBatches(specs(mix), SEQ, 8, 1, cache_limit="10mb")


# ---- the mapped-shard reader against streaming's own ------------------------------------------

def base_tokens(dataset, sample_id: int) -> np.ndarray:
    """A sample's tokens as streaming's own reader gives them (a file read per sample)."""
    from streaming import StreamingDataset

    return StreamingDataset.get_item(dataset, sample_id)["tokens"]


def deleted_mappings(folder: Path) -> list[str]:
    """This process's mappings of files under `folder` that were deleted since."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if str(folder) in line and line.endswith("(deleted)")]


@pytest.mark.parametrize("columns", [{"a": "int64", "b": "str", "tokens": "ndarray:int16", "z": "str"},
                                     {"b": "str", "tokens": "ndarray:int32:17", "z": "int8"}],
                         ids=["variable-tokens", "fixed-tokens"])
def test_a_mapped_shard_decodes_tokens_like_mds_reader_whatever_the_columns(tmp_path, columns):
    from streaming import MDSWriter
    from streaming.base.format.mds.reader import MDSReader

    rng = np.random.default_rng(0)
    dtype = np.int16 if columns["tokens"] == "ndarray:int16" else np.int32
    with MDSWriter(out=str(tmp_path), columns=columns, size_limit=4000) as writer:
        for i in range(60):
            length = 17 if dtype is np.int32 else int(rng.integers(1, 40))
            writer.write({"a": i, "b": "x" * int(rng.integers(0, 9)), "z": "yz"[:i % 3] if columns["z"] == "str" else i,
                          "tokens": rng.integers(-500, 500, length).astype(dtype)})
    shards = json.loads((tmp_path / "index.json").read_text())["shards"]
    assert len(shards) > 1
    for shard in shards:
        reader = MDSReader.from_json(str(tmp_path), None, shard)
        mapped = mds._MappedShard(reader)
        for i in range(reader.samples):
            assert np.array_equal(mapped.tokens(i), reader[i]["tokens"])
        assert mapped.tokens(0).dtype == dtype
        with pytest.raises(IndexError):
            mapped.tokens(reader.samples)


def test_the_loader_reads_every_sample_as_streamings_reader_does(pristine, tmp_path):
    data = shutil.copytree(pristine / "alpha", tmp_path / "alpha")  # zstd shards: mapped once decompressed
    dataset = mds._open_dataset([StreamSpec(str(data))], "train", SEQ, mds.rank_layout(), True,
                                weighted=False, batch_size=4)
    for _ in range(2):  # decompressing (through streaming's reader), then from the mappings
        for i in range(dataset.num_samples):
            tokens, stream = dataset.get_item(i)
            assert stream == 0 and np.array_equal(tokens, base_tokens(dataset, i))
            assert np.array_equal(tokens, sample_tokens(0, "train", i))
    assert all(shard in dataset.mapped_shards for shard in range(dataset.num_shards))


def test_shards_evicted_and_fetched_again_are_mapped_afresh(tmp_path):
    seq = 64
    remote = write_dataset(tmp_path / "remote", 3, train=200, val=4, seq_len=seq, shard_samples=25)
    shards = json.loads((remote / "train" / "index.json").read_text())["shards"]
    largest = max(shard["raw_data"]["bytes"] + shard["zip_data"]["bytes"] for shard in shards)
    cache = tmp_path / "cache"
    limit = (remote / "train" / "index.json").stat().st_size + 4 * largest + 1
    dataset = mds._open_dataset([StreamSpec(str(cache), remote=str(remote))], "train", seq, mds.rank_layout(),
                                True, weighted=False, batch_size=1, cache_limit=f"{limit}b")
    assert len(shards) > 4  # the cache holds at most four: reading them all in turn evicts
    for _ in range(3):  # reads, fetches again after eviction, then reads the fresh mapping
        for i in range(0, dataset.num_samples, 7):
            tokens, _ = dataset.get_item(i)
            assert np.array_equal(tokens, sample_tokens(3, "train", i, seq))
            assert np.array_equal(tokens, base_tokens(dataset, i))
            assert not deleted_mappings(cache)
    for _ in range(2):  # fetched (if evicted), then mapped
        dataset.get_item(0)
    assert 0 in dataset.mapped_shards
    dataset.evict_shard(0)
    assert deleted_mappings(cache)  # still mapped, until the next read notices
    assert np.array_equal(dataset.get_item(1)[0], sample_tokens(3, "train", 1, seq))
    assert not deleted_mappings(cache)


# ---- bad input: one line naming the file ------------------------------------------------------

def test_bad_streams_are_refused_before_any_work(mix, tmp_path):
    missing = tmp_path / "nothing"
    assert str(missing / "manifest.json") in one_line_error(check_streams, [StreamSpec(str(missing))], SEQ)
    message = one_line_error(check_streams, specs(mix), 32)
    assert message.startswith(str(Path(mix[0]) / "manifest.json")) and "seq_len 16" in message
    other = write_dataset(tmp_path / "other", 2, train=20, val=4, model_sha256="b" * 64)
    message = one_line_error(check_streams, specs([mix[0], str(other)]), SEQ)
    assert message.startswith(str(other / "manifest.json")) and "tokenizer" in message
    assert check_streams(specs(mix), SEQ)["vocab_size"] == VOCAB
    remote = StreamSpec(str(tmp_path / "cache"), remote=str(missing))
    assert str(missing / "manifest.json") in one_line_error(check_streams, [remote], SEQ)

    loader = StreamingBatches(specs(mix), SEQ, 8, 1, seed=SEED, num_workers=0)
    state = loader.state_dict()
    other_seed = StreamingBatches(specs(mix), SEQ, 8, 1, seed=SEED + 1, num_workers=0)
    assert "shuffle_seed" in one_line_error(other_seed.load_state_dict, state)
    larger = StreamingBatches(specs(mix), SEQ, 16, 1, seed=SEED, num_workers=0)
    assert "global_batch" in one_line_error(larger.load_state_dict, state)


@pytest.mark.parametrize("remote, workers", [(False, 0), (True, 2)], ids=["local", "remote-workers"])
def test_a_corrupted_shard_is_reported_as_one_line_naming_it(pristine, tmp_path, remote, workers):
    data = shutil.copytree(pristine / "alpha", tmp_path / "alpha")
    shard = data / "train" / "part-00001" / "shard.00001.mds.zstd"
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    spec = StreamSpec(str(tmp_path / "cache"), remote=str(data)) if remote else StreamSpec(str(data))
    loader = StreamingBatches([spec], SEQ, 8, 1, seed=SEED, num_workers=workers)

    def read_an_epoch():
        for _ in range(loader.epoch_size // loader.global_batch):
            loader.next_step()

    message = one_line_error(read_an_epoch)
    loader.close()
    assert "corrupt shard" in message
    if remote:
        assert message.startswith(str(tmp_path / "cache" / "train" / "part-00001" / "shard.00001.mds.zstd"))
        assert f"(from {shard})" in message
    else:
        assert message.startswith(str(shard))


# ---- leftovers of a killed job ----------------------------------------------------------------

VICTIM = """
import sys
from stratagem.data.streaming import StreamingBatches, StreamSpec
remote, reading, opened = sys.argv[1:4]
loader = StreamingBatches([StreamSpec(reading, remote=remote)], 16, 4, 1, num_workers=2)
loader.next_step()
opened_loader = StreamingBatches([StreamSpec(opened, remote=remote)], 16, 4, 1, num_workers=2)  # not iterated
print("ready", flush=True)
sys.stdin.read()
"""


def test_shared_memory_of_a_killed_job_does_not_stop_the_next(pristine, tmp_path, monkeypatch):
    caches = [str(tmp_path / "reading"), str(tmp_path / "opened")]
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(pristine / "beta"), *caches],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert victim.stdout.readline() == b"ready\n"
    finally:  # the whole job: loader, DataLoader workers and the resource tracker that would clean up
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    assert mds._unmapped_streaming_segments()  # what the killed job left behind

    spec = [StreamSpec(caches[1], remote=str(pristine / "beta"))]
    monkeypatch.setattr(mds, "clean_stale_shared_memory", lambda layout: None)
    assert "same cache folder" in one_line_error(StreamingBatches, spec, SEQ, 4, 1, num_workers=0)
    monkeypatch.undo()
    for cache in caches:
        loader = StreamingBatches([StreamSpec(cache, remote=str(pristine / "beta"))], SEQ, 4, 1, num_workers=2)
        assert loader.next_step()[0].shape == (4, SEQ + 1)
        loader.close()


# ---- the harness ------------------------------------------------------------------------------

def failing_rank(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one gives up")
    torch.distributed.barrier()  # rank 0 would wait here forever


def test_run_ranks_reports_the_failing_rank_without_hanging():
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 failed.*ValueError: rank one gives up"):
        run_ranks(2, failing_rank, timeout=60)
