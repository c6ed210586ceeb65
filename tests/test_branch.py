"""Branching a run from another run's checkpoint (`run.init_from`, `train.keep_steps`): a wsd decay
branched off a longer run's stable phase is the run it stands for, bit for bit, on one process."""

import re
import shutil

import pytest

from stratagem.errors import CheckpointError, ConfigError
from stratagem.launcher.config import load_config
from stratagem.model import Transformer
from stratagem.train.checkpoint import Checkpointer, TrainState
from stratagem.train.loop import train
from stratagem.train.metrics import read_metrics, without_measurements
from stratagem.train.optim import build_optimizer
from stratagem.train.schedule import lr_multiplier

STEPS, DECAY, LONG = 8, 2, 12  # the run S, its decay K, the long run L it is branched from at S - K
BRANCH_STEP = STEPS - DECAY

pytestmark = pytest.mark.usefixtures("one_thread")


def config_of(tmp_path, name, *overrides):
    return load_config(None, [
        "--model.flavor=tiny", "--data.seq_len=32", "--train.micro_batch_size=4", "--train.global_batch_tokens=256",
        "--train.schedule=wsd", "--train.warmup_steps=2", "--train.eval_every=4", "--train.eval_batches=2",
        "--train.checkpoint_every=0", f"--run.dir={tmp_path}", f"--run.name={name}", *overrides])


def long_run(tmp_path, *overrides):
    """L steps, wsd decaying over its last 20% (steps 10..12), a kept checkpoint at the branch point."""
    config = config_of(tmp_path, "long", f"--train.steps={LONG}", f"--train.keep_steps=[{BRANCH_STEP}]", *overrides)
    train(config)
    return tmp_path / "long" / "checkpoints" / f"step-{BRANCH_STEP}"


def branch_config(tmp_path, init_from, *overrides, name="branch"):
    return config_of(tmp_path, name, f"--train.steps={STEPS}", f"--train.decay_fraction={DECAY / STEPS}",
                     f"--run.init_from={init_from}", *overrides)


def weights(run_dir, config):
    model = Transformer(config.model)
    checkpoints = Checkpointer(run_dir / "checkpoints")
    template = TrainState(step=0, loader={"split": "", "next_sample": 0}, scheduler={})
    checkpoints.load(checkpoints.latest(), model, build_optimizer(model, config.train), template)
    return model.state_dict()


def test_a_decay_branch_equals_the_run_it_stands_for_bit_for_bit(tmp_path):
    straight = config_of(tmp_path, "straight", f"--train.steps={STEPS}", f"--train.decay_fraction={DECAY / STEPS}")
    train(straight)
    init_from = long_run(tmp_path)
    branch = branch_config(tmp_path, init_from)
    result = train(branch)

    expected = without_measurements(read_metrics(tmp_path / "straight"))
    got = without_measurements(read_metrics(tmp_path / "branch"))
    assert [r["step"] for r in got] == [7, 8]  # the branch records only its own steps
    assert got == expected[BRANCH_STEP:]  # losses, eval losses, lr, grad norms, phases: exactly equal
    assert [r["phase"] for r in got] == ["decay", "decay"] and got[-1]["eval_loss"] == result.eval_loss
    assert without_measurements(read_metrics(tmp_path / "long"))[:BRANCH_STEP] == expected[:BRANCH_STEP]
    straight_weights, branch_weights = weights(tmp_path / "straight", straight), weights(tmp_path / "branch", branch)
    assert all(straight_weights[k].equal(branch_weights[k]) for k in straight_weights)


def test_a_branch_resumes_from_its_own_checkpoint_and_keeps_its_own_settings(tmp_path):
    init_from = long_run(tmp_path)
    branch = branch_config(tmp_path, init_from, "--train.lr=1e-3")
    train(branch, stop_after=BRANCH_STEP + 1)
    assert train(branch, resume=True).step == STEPS  # its own step-7 wins over init_from's step-6
    records = read_metrics(tmp_path / "branch")
    assert [r["step"] for r in records] == [7, 8]
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * lr_multiplier(branch.train, s) for s in (6, 7)])


def test_kept_steps_survive_the_keep_policy(tmp_path):
    long_run(tmp_path, "--train.checkpoint_every=2", "--train.keep_checkpoints=1")
    kept = [step for step, _ in Checkpointer(tmp_path / "long" / "checkpoints").complete()]
    assert kept == [BRANCH_STEP, LONG]


def test_a_bad_branch_point_is_refused_before_anything_is_written(tmp_path):
    init_from = long_run(tmp_path)
    partial = tmp_path / "partial" / "step-6"
    shutil.copytree(init_from, partial)
    (partial / "meta.json").unlink()
    cases = [
        (tmp_path / "long" / "checkpoints" / "step-5", "no such checkpoint directory"),
        (tmp_path / "long" / "checkpoints", "not a checkpoint directory"),
        (partial, "incomplete checkpoint, meta.json is missing"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=re.escape(f"run.init_from = '{path}': {message}")):
            train(branch_config(tmp_path, path))
    with pytest.raises(CheckpointError, match=r"another model shape \(model.dim = 64, this config has 128\)"):
        train(branch_config(tmp_path, init_from, "--model.dim=128", "--model.ffn_hidden=384"))
    with pytest.raises(CheckpointError, match="is at step 6, not before this run's last step"):
        train(branch_config(tmp_path, init_from, "--train.steps=6", "--train.decay_fraction=0.5"))
    for override, message in (("--train.global_batch_tokens=512", "train.global_batch_tokens = 256, this config "
                                                                   "has 512"),
                              ("--data.seq_len=64", "data.seq_len = 32, this config has 64"),
                              ("--run.seed=3", "run.seed = 0, this config has 3")):
        with pytest.raises(CheckpointError, match=re.escape(f"read its data otherwise ({message}); a branch")):
            train(branch_config(tmp_path, init_from, override))
    assert not (tmp_path / "branch").exists()


def test_keep_steps_are_checked_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"train.keep_steps = \[4, 8\]: step 8 is not in 1..7"):
        config_of(tmp_path, "run", "--train.steps=8", "--train.keep_steps=[4,8]")
    with pytest.raises(ConfigError, match="train.keep_steps = 'x': expected a list of integers"):
        config_of(tmp_path, "run", "--train.keep_steps=x")
