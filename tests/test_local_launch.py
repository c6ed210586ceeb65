"""`launcher.local.run_local`: N real ranks under torch's elastic launcher, and how a failure surfaces."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from stratagem.launcher.local import RankFailed, run_local


def sum_of_ranks(offset: int) -> tuple[int, int, float]:
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    return dist.get_rank(), dist.get_world_size(), total.item() + offset


def one_rank_fails_while_the_others_wait() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank one's own error")
    dist.barrier()  # never completes: rank 1 is gone
    time.sleep(60)


def test_ranks_join_one_process_group_and_return_in_rank_order():
    before = dict(os.environ)
    assert run_local(2, sum_of_ranks, 10) == [(0, 2, 11.0), (1, 2, 11.0)]
    assert dict(os.environ) == before  # nothing leaks into the caller (later streaming would see it)


def test_the_failing_rank_and_its_error_are_reported_and_the_others_stopped():
    began = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_local(2, one_rank_fails_while_the_others_wait)
    assert str(info.value) == "rank 1 of 2 failed: ValueError: rank one's own error"
    assert "one_rank_fails_while_the_others_wait" in info.value.detail  # the rank's traceback
    assert time.monotonic() - began < 50  # rank 0 was stopped, not waited for
