"""Choose a run's training and evaluation batches from its `[data]` section.

Both kinds serve the same interface (`next_step()`, `state_dict()`, `load_state_dict()`,
`tokens_per_stream()`, `close()`), so the training loop does not know which corpus it reads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from stratagem.data.config import DataConfig
from stratagem.data.loader import SequenceBatches, eval_batches
from stratagem.data.sources import DataError
from stratagem.data.synthetic import SyntheticCorpus


def data_vocab_size(data: DataConfig) -> int:
    """The vocabulary the data uses; checks prepared streams (manifests, seq_len, tokenizer) before any work."""
    if data.kind == "synthetic":
        return data.synthetic.vocab_size
    from stratagem.data.streaming import check_streams

    return int(check_streams(data.mds.streams, data.seq_len)["vocab_size"])


def build_train_batches(data: DataConfig, micro_batch_size: int, accumulation: int, seed: int,
                        global_batches: bool = False):
    """This rank's micro-batches of `micro_batch_size` sequences, or with `global_batches` (the plan
    runtime) every rank gets the step's whole micro-batches of `micro_batch_size` sequences: the
    synthetic corpus generates them anywhere; streamed ranks read 1 / world of each and gather."""
    if data.kind == "synthetic":
        return SequenceBatches(SyntheticCorpus(data.synthetic, data.seq_len), micro_batch_size, accumulation)
    from stratagem.data.streaming import StreamingBatches

    world = dist.get_world_size() if global_batches and dist.is_initialized() else 1
    if micro_batch_size % world:
        raise DataError(f"a micro-batch of {micro_batch_size} sequences does not split over {world} ranks "
                        f"reading the streams")
    mds = data.mds
    batches = StreamingBatches(mds.streams, data.seq_len, micro_batch_size // world, accumulation, split="train",
                               seed=seed, num_workers=mds.num_workers, cache_limit=mds.cache_limit or None,
                               num_canonical_nodes=mds.num_canonical_nodes, shuffle=mds.shuffle,
                               validate_hash=mds.validate_hash)
    return GatheredBatches(batches) if world > 1 else batches


class GatheredBatches:
    """Every rank's streamed micro-batches gathered into the global ones (`global_micro_batches`:
    the order one rank reading them all would see), on every rank."""

    def __init__(self, batches):
        self.batches = batches

    def next_step(self) -> list[torch.Tensor]:
        from stratagem.data.streaming import global_micro_batches

        mine = torch.stack(self.batches.next_step())  # [accumulation, micro / world, seq_len + 1]
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        return global_micro_batches([list(part) for part in every])

    def __getattr__(self, name):  # state_dict, load_state_dict, tokens_per_stream, close
        return getattr(self.batches, name)


def build_eval_batches(data: DataConfig, micro_batch_size: int, count: int) -> list[torch.Tensor]:
    """A fixed held-out set: the same micro-batches at every evaluation."""
    if data.kind == "synthetic":
        return eval_batches(SyntheticCorpus(data.synthetic, data.seq_len), micro_batch_size, count)
    from stratagem.data.streaming import eval_batches as stream_eval_batches

    return stream_eval_batches(data.mds.streams, data.seq_len, micro_batch_size, count)
