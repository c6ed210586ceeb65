"""Batches of token sequences for training and evaluation, with a position that checkpoints record."""

from __future__ import annotations

import torch


class SequenceBatches:
    """Serves each optimizer step's global batch as `accumulation` micro-batches of sequences.

    Step s reads samples [s * G, (s + 1) * G) of the split, G = micro_batch_size * accumulation,
    so the order of samples does not depend on how the global batch is cut into micro-batches.
    The position (next sample index) is saved in checkpoints and restored on resume.
    """

    def __init__(self, corpus, micro_batch_size: int, accumulation: int, split: str = "train"):
        self.corpus, self.split = corpus, split
        self.micro_batch_size, self.accumulation = micro_batch_size, accumulation
        self.next_sample = 0

    def next_step(self) -> list[torch.Tensor]:
        """The micro-batches of one optimizer step, each [micro_batch_size, seq_len + 1]."""
        batches = []
        for _ in range(self.accumulation):
            stop = self.next_sample + self.micro_batch_size
            batches.append(self.corpus.sample(range(self.next_sample, stop), self.split))
            self.next_sample = stop
        return batches

    def tokens_per_stream(self) -> dict[str, int]:
        """Tokens served so far (inputs: seq_len per sample), by stream: this corpus is one stream."""
        return {"synthetic": self.next_sample * self.corpus.seq_len}

    def close(self) -> None:
        """Nothing to release: samples are generated in this process."""

    def state_dict(self) -> dict:
        return {"split": self.split, "next_sample": self.next_sample}

    def load_state_dict(self, state: dict) -> None:
        self.next_sample = int(state["next_sample"])


def eval_batches(corpus, micro_batch_size: int, count: int, split: str = "eval") -> list[torch.Tensor]:
    """A fixed held-out set: the first `count` micro-batches of the evaluation split."""
    return [corpus.sample(range(i * micro_batch_size, (i + 1) * micro_batch_size), split)
            for i in range(count)]
