"""Choose a run's training and evaluation batches from its `[data]` section.

Both kinds serve the same interface (`next_step()`, `state_dict()`, `load_state_dict()`,
`tokens_per_stream()`, `close()`), so the training loop does not know which corpus it reads.
"""

from __future__ import annotations

import torch

from stratagem.data.config import DataConfig
from stratagem.data.loader import SequenceBatches, eval_batches
from stratagem.data.synthetic import SyntheticCorpus


def data_vocab_size(data: DataConfig) -> int:
    """The vocabulary the data uses; checks prepared streams (manifests, seq_len, tokenizer) before any work."""
    if data.kind == "synthetic":
        return data.synthetic.vocab_size
    from stratagem.data.streaming import check_streams

    return int(check_streams(data.mds.streams, data.seq_len)["vocab_size"])


def build_train_batches(data: DataConfig, micro_batch_size: int, accumulation: int, seed: int):
    if data.kind == "synthetic":
        return SequenceBatches(SyntheticCorpus(data.synthetic, data.seq_len), micro_batch_size, accumulation)
    from stratagem.data.streaming import StreamingBatches

    mds = data.mds
    return StreamingBatches(mds.streams, data.seq_len, micro_batch_size, accumulation, split="train", seed=seed,
                            num_workers=mds.num_workers, cache_limit=mds.cache_limit or None,
                            num_canonical_nodes=mds.num_canonical_nodes, shuffle=mds.shuffle,
                            validate_hash=mds.validate_hash)


def build_eval_batches(data: DataConfig, micro_batch_size: int, count: int) -> list[torch.Tensor]:
    """A fixed held-out set: the same micro-batches at every evaluation."""
    if data.kind == "synthetic":
        return eval_batches(SyntheticCorpus(data.synthetic, data.seq_len), micro_batch_size, count)
    from stratagem.data.streaming import eval_batches as stream_eval_batches

    return stream_eval_batches(data.mds.streams, data.seq_len, micro_batch_size, count)
