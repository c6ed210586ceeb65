"""A process killed at any point of a checkpoint write never leaves a checkpoint that a resume picks:
the run resumes from the previous complete one (or the new one, once committed) and ends with
the losses of an uninterrupted run. Also: which checkpoints pruning keeps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stratagem.train.checkpoint import Checkpointer
from stratagem.train.loop import train
from stratagem.train.metrics import read_metrics
from tests.test_train import small_config

# Runs `train` on small_config(tmp, "--train.checkpoint_every=2") with os._exit(9) at one point of
# the save of step 4 (the second checkpoint): the process dies as a SIGKILL would leave it.
KILLED_RUN = """
import os, sys
from pathlib import Path
import torch.distributed.checkpoint as dcp
from stratagem.train import checkpoint
from stratagem.train.loop import train
sys.path.insert(0, {root!r})
from tests.test_train import small_config

point, tmp = sys.argv[1], Path(sys.argv[2])
saving = [0]

def die(where):
    if where == point and saving[0] == 2:
        os._exit(9)

original_save, original_rename, original_prune = dcp.save, Path.rename, checkpoint.Checkpointer._prune

def save(payload, checkpoint_id, **kwargs):
    saving[0] += 1
    die("before the shards")
    original_save(payload, checkpoint_id=checkpoint_id, **kwargs)
    die("after the shards")

def rename(self, target):
    die("before the rename")
    return original_rename(self, target)

def prune(self):
    die("after the rename")
    original_prune(self)

checkpoint.dcp.save, Path.rename, checkpoint.Checkpointer._prune = save, rename, prune
train(small_config(tmp, "--train.checkpoint_every=2"))
"""
POINTS = {"before the shards": 2, "after the shards": 2, "before the rename": 2, "after the rename": 4}


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    train(small_config(root, "--train.checkpoint_every=2"))
    return losses(root / "run")


@pytest.mark.parametrize("point", POINTS)
def test_a_checkpoint_cut_short_is_never_resumed_from(tmp_path, uninterrupted, point):
    root = str(Path(__file__).resolve().parents[1])
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(root=root), point, str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr
    checkpoints = Checkpointer(tmp_path / "run" / "checkpoints")
    assert checkpoints.latest().name == f"step-{POINTS[point]}"  # the committed one, never a partial one
    train(small_config(tmp_path, "--train.checkpoint_every=2"), resume=True)
    got = losses(tmp_path / "run")
    assert [s for s, _ in got] == [s for s, _ in uninterrupted]
    for (step, loss), (_, want) in zip(got, uninterrupted):
        assert loss == pytest.approx(want, rel=1e-6), f"step {step}"


def test_pruning_keeps_the_newest_and_every_mth(tmp_path):
    train(small_config(tmp_path, "--train.steps=12", "--train.checkpoint_every=2", "--train.keep_checkpoints=2",
                       "--train.keep_every=4"))
    assert sorted(int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [4, 8, 10, 12]
