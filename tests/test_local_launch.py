"""`launcher.local.run_local`: N real ranks under torch's elastic launcher, and how a failure surfaces."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from stratagem.launcher.local import RankFailed, run_local
from stratagem.train.metrics import read_metrics


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


# --- a rank killed mid-run (SIGKILL), and the relaunch ---------------------------------------------

TRAIN = ["--model.flavor=tiny", "--data.seq_len=32", "--train.micro_batch_size=4", "--train.global_batch_tokens=256",
         "--train.steps=300", "--train.warmup_steps=2", "--train.eval_every=0", "--train.checkpoint_every=20",
         "--train.keep_checkpoints=0", "--train.eps=1e-6"]


def cli_train(run_dir, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stratagem.launcher.cli", "train", "--nproc", "2", *TRAIN, f"--run.dir={run_dir}",
            f"--run.name={name}", *extra]


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    """The launcher's rank processes (multiprocessing's spawned children, not its resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
        except (OSError, NotADirectoryError):
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == launcher.pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def test_a_killed_rank_stops_the_job_naming_it_and_the_relaunch_resumes_exactly(tmp_path):
    straight = subprocess.run(cli_train(tmp_path, "straight"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    launcher = subprocess.Popen(cli_train(tmp_path, "killed"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 300
    while len(read_metrics(tmp_path / "killed")) < 50:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.1)
    ranks = worker_pids(launcher)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 2
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"stratagem: error: rank [01] of 2 failed: .*SIGKILL.*\b{ranks[-1]}\b.*", last), err

    again = subprocess.run(cli_train(tmp_path, "killed", "--resume"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    got = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "killed")]
    want = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight")]
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, loss), (_, expected) in zip(got, want):
        assert loss == pytest.approx(expected, rel=1e-5), f"step {step}"
