"""The DeepSpeed engine (`parallel.deepspeed_engine`): ZeRO plans train like one process, and runs
move between engines through stratagem's checkpoints.

Every run goes through `train.loop` (16 sequences of 32 tokens a step, 2 micro-batches, gradient
clipping active, evaluation and a checkpoint at step 3; 3 steps, or 6 where a run resumes) and is
compared with one process trained in the same micro-batches: every step's loss and evaluation,
and the final weights read back from the run's own checkpoint (relative 1e-4, float32). One launch per world size runs all
its cases, to share the start-up:

- ZeRO stages 1, 2 and 3, each with and without optimizer offload, on 2 and 4 ranks; stage 3
  with parameter offload too; the MoE model (global expert loads) and the hybrid model with
  activation checkpointing; a user's DeepSpeed JSON laid over the generated one;
- resumption across engines: 3 steps under ZeRO-3, 3 more under the native runtime (2 ranks, and
  one process); 3 native steps, 3 more under ZeRO-2 with optimizer offload; each equals the
  uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys

import pytest

from stratagem.errors import ConfigError
from stratagem.launcher.config import dump_toml
from stratagem.parallel.deepspeed_engine import deepspeed_config
from stratagem.parallel.plan import deepspeed_plan
from stratagem.parallel.runtime import check_train_plan, default_plan
from stratagem.train.loop import run_dir_of, train
from tests.distributed import run_ranks
from tests.test_parallel_train import assert_close, assert_weights_close, config_for, losses
from tests.test_train import trained_weights

FLAVORS = {"tiny": "--model.flavor=tiny", "moe": "--model.flavor=tiny-moe", "hybrid": "--model.flavor=tiny-hybrid"}
SAME_MICRO_BATCHES = "--train.micro_batch_size=8"  # one process in the plans' micro-batches (MoE statistics are per micro-batch)
ZERO_STEPS = 3  # the stage cases: 3 steps (evaluated and saved at step 3); resumption takes 6
USER_JSON = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 4096}, "gradient_clipping": 1.0}


def config(run_dir, name: str, flavor: str = "tiny", steps: int = 6):
    return config_for(run_dir, name, FLAVORS[flavor], SAME_MICRO_BATCHES, f"--train.steps={steps}")


def plan(cfg, world: int, stage: int, **engine):
    return deepspeed_plan(cfg.model, world, stage, micro_batch_size=8, num_micro_batches=2, **engine)


def zero_cases(world: int) -> dict:
    """name -> (flavor, stage, engine settings)."""
    cases = {f"zero{stage}{'-offload' if offload else ''}": ("tiny", stage, {"offload_optimizer": offload})
             for stage in (1, 2, 3) for offload in (False, True)}
    cases["zero3-offload-params"] = ("tiny", 3, {"offload_optimizer": True, "offload_params": True})
    if world == 4:  # a quarter of the optimizer's parameter subgroups on the host (DeepSpeed's CPU Adam), the rest on the device
        cases["zero3-offload-quarter"] = ("tiny", 3, {"offload_optimizer": True, "offload_ratio": 0.25})
    if world == 2:
        cases["zero2-moe"] = ("moe", 2, {})
        cases["zero3-hybrid-checkpointed"] = ("hybrid", 3, {"checkpoint": "full"})
    return cases


def ranks_train(rank: int, world: int, run_dir: str, user_json: str) -> None:
    for name, (flavor, stage, engine) in zero_cases(world).items():
        cfg = config(run_dir, f"{name}-{world}", flavor, steps=ZERO_STEPS)
        train(cfg, plan=plan(cfg, world, stage, **engine))
    if world != 2:
        return
    cfg = config(run_dir, "user-json")
    train(cfg, plan=plan(cfg, world, 3, config=user_json))
    for name, first, then in (("deepspeed-then-native", plan(cfg, world, 3), default_plan(cfg, world)),
                              ("native-then-deepspeed", default_plan(cfg, world),
                               plan(cfg, world, 2, offload_optimizer=True))):
        cfg = config(run_dir, name)
        train(cfg, plan=first, stop_after=3)
        if name == "deepspeed-then-native" and rank == 0:
            shutil.copytree(run_dir_of(cfg), f"{run_dir}/deepspeed-then-one-process")
        train(cfg, plan=then, resume=True)


@functools.cache
def launched(tmp_root, world: int):
    user_json = tmp_root / "user-deepspeed.json"
    user_json.write_text(json.dumps(USER_JSON))
    run_ranks(world, ranks_train, str(tmp_root), str(user_json), timeout=900)
    return tmp_root


@functools.cache
def reference(tmp_root, flavor: str, steps: int = 6):
    cfg = config(tmp_root, f"one-process-{flavor}-{steps}", flavor, steps)
    train(cfg)
    return losses(tmp_root / cfg.run.name), trained_weights(tmp_root / cfg.run.name, cfg)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("deepspeed")


def assert_like_one_process(root, run: str, flavor: str = "tiny", steps: int = 6) -> None:
    want_losses, want_weights = reference(root, flavor, steps)
    assert_close(losses(root / run), want_losses)
    assert_weights_close(trained_weights(root / run, config(root, run, flavor, steps)), want_weights)


@pytest.mark.parametrize("world,case", [(world, case) for world in (2, 4) for case in zero_cases(world)])
def test_zero_trains_like_one_process(root, world, case):
    launched(root, world)
    flavor, stage, _ = zero_cases(world)[case]
    assert_like_one_process(root, f"{case}-{world}", flavor, ZERO_STEPS)
    written = json.loads((root / f"{case}-{world}" / "deepspeed.json").read_text())
    assert written["zero_optimization"]["stage"] == stage and written["train_batch_size"] == 16


def test_a_users_deepspeed_json_is_laid_over_the_generated_one(root):
    launched(root, 2)
    assert_like_one_process(root, "user-json")
    written = json.loads((root / "user-json" / "deepspeed.json").read_text())
    zero = written["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 4096  # the user's bucket over the generated one
    assert written["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize("run", ["deepspeed-then-native", "native-then-deepspeed"])
def test_runs_move_between_engines(root, run):
    launched(root, 2)
    assert_like_one_process(root, run)


def test_one_process_resumes_a_deepspeed_checkpoint(root):
    launched(root, 2)
    moved = root / "deepspeed-then-one-process"  # a copy of the ZeRO-3 run's first 3 steps
    assert [step for step, *_ in losses(moved)] == [1, 2, 3]
    train(config(root, "deepspeed-then-one-process"), resume=True)
    assert_like_one_process(root, "deepspeed-then-one-process")


def test_the_cli_trains_under_a_deepspeed_plan(root, tmp_path):
    """`stratagem plan new --zero-stage` then `stratagem train --plan` on local ranks, as a user runs it."""
    plan_file = tmp_path / "zero2.json"
    cli = [sys.executable, "-m", "stratagem.launcher.cli"]
    made = subprocess.run([*cli, "plan", "new", "--model", "tiny", "--world", "2", "--zero-stage", "2",
                           "--micro-batch-size", "8", "--micro-batches", "2", "--out", str(plan_file)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    config_file = tmp_path / "config.toml"  # the reference's config
    config_file.write_text(dump_toml(config(root, "cli").to_dict()))
    done = subprocess.run([*cli, "train", str(config_file), "--plan", str(plan_file)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_like_one_process(root, "cli")
    assert json.loads((root / "cli" / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2


# --- bad input: one line each, before any process starts ----------------------------------------

@pytest.mark.parametrize("user,expected", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage = 2 contradicts the plan {source} "
                                          "(engine.zero_stage gives 3)"),
    ({"train_batch_size": 32}, "train_batch_size = 32 contradicts the plan {source} "
                               "(pipeline.micro_batch_size x num_micro_batches gives 16)"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps = 4 contradicts the plan {source} "
                                         "(pipeline.num_micro_batches gives 2)"),
    ({"optimizer": {"type": "AdamW"}}, 'optimizer = {"type": "AdamW"} is not supported by the deepspeed engine: '
                                       "the optimizer is stratagem's AdamW, set in [train]"),
])
def test_a_deepspeed_json_that_contradicts_the_plan_is_refused(tmp_path, user, expected):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = config(tmp_path, "bad")
    bad = plan(cfg, 2, 3, config=str(path))
    with pytest.raises(ConfigError) as info:
        check_train_plan(cfg, bad, 2)
    assert str(info.value) == f"{path}: " + expected.replace("{source}", bad.source)


@pytest.mark.parametrize("text,expected", [
    (None, "no such DeepSpeed config file"),
    ("{", "not a readable JSON document (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("[]", "expected a JSON object at the top level"),
])
def test_an_unreadable_deepspeed_json_is_refused(tmp_path, text, expected):
    path = tmp_path / "ds.json"
    if text is not None:
        path.write_text(text)
    cfg = config(tmp_path, "bad")
    bad = plan(cfg, 2, 3, config=str(path))
    with pytest.raises(ConfigError) as info:
        check_train_plan(cfg, bad, 2)
    assert str(info.value) == f"{bad.source}: engine.config = {str(path)!r}: {expected}"


def test_the_generated_json_follows_the_plan(tmp_path):
    cfg = config(tmp_path, "generated")
    generated = deepspeed_config(plan(cfg, 4, 3, offload_optimizer=True, offload_params=True), cfg.train)
    assert generated["train_micro_batch_size_per_gpu"] == 2 and generated["gradient_accumulation_steps"] == 2
    assert generated["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert generated["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert generated["gradient_clipping"] == cfg.train.grad_clip
    assert generated["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # DeepSpeed's default, for a large model
    small = deepspeed_config(plan(cfg, 4, 2), cfg.train, parameters=1000)["zero_optimization"]
    assert small["reduce_bucket_size"] == small["allgather_bucket_size"] == 1000
