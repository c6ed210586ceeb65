"""Training under plans through `train.loop` on real gloo ranks: the same run as one process, and
checkpoints that move between plans and world sizes (DCP resharding).

Resharding: 3 steps under plan A (4 ranks, tp 2 x dp 2, fsdp), saved; resumed under plan B
(2 ranks, a 2-stage pipeline) and under one process; the next 3 steps equal those of an
uninterrupted plan-A run (losses and final weights, relative 1e-4 in float32).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys

import pytest

from stratagem.errors import ConfigError
from stratagem.launcher.config import load_config
from stratagem.parallel.plan import uniform_plan
from stratagem.parallel.runtime import check_train_plan
from stratagem.train.loop import train
from stratagem.train.metrics import read_metrics
from tests.distributed import run_ranks
from tests.test_train import trained_weights

# 16 sequences of 32 tokens a step; AdamW's eps raised so float32 rounding of ~0 gradients does
# not move weights by lr (as in tests/test_runtime.py)
OVERRIDES = ["--model.flavor=tiny", "--data.seq_len=32", "--train.micro_batch_size=4", "--train.global_batch_tokens=512",
             "--train.steps=6", "--train.warmup_steps=2", "--train.eval_every=3", "--train.eval_batches=4",
             "--train.checkpoint_every=3", "--train.keep_checkpoints=0", "--train.eps=1e-6"]


def config_for(run_dir, name: str, *overrides: str):
    return load_config(None, [*OVERRIDES, f"--run.dir={run_dir}", f"--run.name={name}", *overrides])


MOE = "--model.flavor=tiny-moe"


def plan_ep(config):
    """The MoE model's experts split 2 ways inside 4 fully sharded data-parallel ranks."""
    return uniform_plan(config.model, 4, dp="fsdp", ep=2, micro_batch_size=8, num_micro_batches=2)


def plan_a(config):
    return uniform_plan(config.model, 4, tp=2, dp="fsdp", micro_batch_size=8, num_micro_batches=2)


def plan_b(config):
    return uniform_plan(config.model, 2, pp=2, schedule="1f1b", micro_batch_size=8, num_micro_batches=2)


def under_plan_a(rank: int, world: int, run_dir: str) -> None:
    config = config_for(run_dir, "a")
    train(config, plan=plan_a(config))  # uninterrupted
    stopped = config_for(run_dir, "resharded")
    train(stopped, plan=plan_a(stopped), stop_after=3)
    for name, stop_after in (("moe-ep", None), ("moe-ep-one", 3)):
        moe = config_for(run_dir, name, MOE)
        train(moe, plan=plan_ep(moe), stop_after=stop_after)


def under_plan_b(rank: int, world: int, run_dir: str) -> None:
    config = config_for(run_dir, "resharded")
    train(config, plan=plan_b(config), resume=True)
    pipelined = config_for(run_dir, "pipelined")
    train(pipelined, plan=plan_b(pipelined), stop_after=3)


def losses(run_dir) -> list[tuple[int, float, float | None]]:
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in read_metrics(run_dir)]


def assert_close(actual: list, expected: list) -> None:
    assert [step for step, *_ in actual] == [step for step, *_ in expected]
    for (step, loss, evaluation), (_, want, want_eval) in zip(actual, expected):
        assert loss == pytest.approx(want, rel=1e-4), f"step {step}"
        assert (evaluation is None) == (want_eval is None), f"step {step}"
        if evaluation is not None:
            assert evaluation == pytest.approx(want_eval, rel=1e-4), f"step {step} eval"


def assert_weights_close(actual: dict, expected: dict, tolerance: float = 1e-4) -> None:
    for name, want in expected.items():
        error = ((actual[name] - want).norm() / want.norm()).item()
        assert error < tolerance, f"{name} differs by {error:.2e} (relative)"


@functools.cache
def resharded_runs(tmp_root) -> dict:
    run_ranks(4, under_plan_a, str(tmp_root), timeout=600)
    shutil.copytree(tmp_root / "resharded", tmp_root / "one")
    run_ranks(2, under_plan_b, str(tmp_root), timeout=600)
    one = config_for(tmp_root, "one")
    train(one, resume=True)
    train(config_for(tmp_root, "moe-ep-one", MOE), resume=True)
    train(config_for(tmp_root, "pipelined"), resume=True)
    return {name: tmp_root / name for name in ("a", "resharded", "one", "moe-ep", "moe-ep-one", "pipelined")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return resharded_runs(tmp_path_factory.mktemp("plans"))


def test_a_checkpoint_of_one_plan_resumes_under_another_plan_and_world_size(runs):
    uninterrupted = losses(runs["a"])
    assert len(uninterrupted) == 6
    assert_close(losses(runs["resharded"]), uninterrupted)  # steps 1-3 under plan A, 4-6 under plan B
    config = config_for(runs["a"].parent, "a")
    expected = trained_weights(runs["a"], config)
    assert_weights_close(trained_weights(runs["resharded"], config), expected)
    assert (runs["resharded"] / "plan.json").is_file()


def test_a_checkpoint_of_a_plan_resumes_on_one_process(runs):
    assert_close(losses(runs["one"]), losses(runs["a"]))
    config = config_for(runs["a"].parent, "a")
    assert_weights_close(trained_weights(runs["one"], config), trained_weights(runs["a"], config))


def test_a_pipelined_checkpoint_resumes_on_one_process(runs):
    """Each pipeline rank saves only its stage's parameters and their optimizer state: the
    checkpoint must still hold all of it, hyperparameters included (`train.checkpoint`)."""
    assert_close(losses(runs["pipelined"]), losses(runs["a"]))
    config = config_for(runs["a"].parent, "a")
    assert_weights_close(trained_weights(runs["pipelined"], config), trained_weights(runs["a"], config))


def test_an_expert_parallel_checkpoint_resumes_on_one_process(runs):
    """Experts split by expert parallelism are saved whole ([E, ...] DTensors), so one process
    continues an EP=2 x fsdp run. Routing is discontinuous (a near-tie between two experts'
    scores goes either way after a last-bit difference, and Adam turns a changed tiny gradient
    into a full-size step), so after 3 steps on other reduction orders the weights agree to
    about 2e-3, the router's least; an expert or optimizer state lost in the move differs by
    orders of magnitude more."""
    assert_close(losses(runs["moe-ep-one"]), losses(runs["moe-ep"]))
    config = config_for(runs["a"].parent, "moe-ep", MOE)
    assert_weights_close(trained_weights(runs["moe-ep-one"], config), trained_weights(runs["moe-ep"], config),
                         tolerance=5e-3)


def test_plan_a_trains_like_one_process(runs, tmp_path):
    one = train(config_for(tmp_path, "reference"))
    assert_close(losses(runs["a"]), losses(one.run_dir))


def test_the_cli_trains_data_parallel_on_local_ranks_like_one_process(tmp_path):
    args = [sys.executable, "-m", "stratagem.launcher.cli", "train", "--nproc", "2", *OVERRIDES,
            f"--run.dir={tmp_path}", "--run.name=cli"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final eval loss" in done.stdout
    one = train(load_config("demo", [*OVERRIDES, f"--run.dir={tmp_path}", "--run.name=reference"]))  # the CLI's default
    assert_close(losses(tmp_path / "cli"), losses(one.run_dir))
    assert sorted(p.name for p in (tmp_path / "cli" / "checkpoints").iterdir()) == ["step-3", "step-6"]


@pytest.mark.parametrize("change,expected", [
    (lambda plan: setattr(plan.pipeline, "num_micro_batches", 4),
     "uniform plan: pipeline.micro_batch_size x num_micro_batches = 32 sequences of data.seq_len 32 per step, "
     "but train.global_batch_tokens = 512"),
    (lambda plan: setattr(plan, "world_size", 2),
     "uniform plan: world_size = 2: the plan is for 2 ranks, the job has 4"),
])
def test_a_plan_that_does_not_fit_the_run_is_one_line_before_any_process_starts(tmp_path, change, expected):
    config = config_for(tmp_path, "bad")
    plan = plan_a(config)
    change(plan)
    with pytest.raises(ConfigError) as info:
        check_train_plan(config, plan, 4)
    assert str(info.value) == expected


def test_the_cli_rejects_a_bad_plan_before_starting_ranks(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"version": 7}')
    done = subprocess.run([sys.executable, "-m", "stratagem.launcher.cli", "train", "--plan", str(plan), *OVERRIDES,
                           f"--run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"stratagem: error: {plan}: version = 7")
    assert not (tmp_path / "run").exists()
