"""`stratagem convert deepspeed` (`parallel.deepspeed_checkpoint`): a checkpoint DeepSpeed wrote with
its own ``engine.save_checkpoint`` continues as a stratagem run.

One launch on 2 gloo ranks trains tests/test_deepspeed.py's 6-step run under ZeRO-2 and under
ZeRO-3; at steps 3 and 6 the engine writes DeepSpeed's native checkpoint beside stratagem's own
(`NativeCheckpoints`). Step 3 of each DeepSpeed checkpoint, converted with the command line, holds
what stratagem's own step-3 checkpoint of the same run holds: the same weights and Adam moments
bit for bit, Adam's step, the schedule and the data position. One process resumed from it in
place (ZeRO-2) or branched off it with run.init_from (ZeRO-3) runs steps 4 to 6 like the
uninterrupted run (losses and evaluations, final weights; relative 1e-4). Bad input is refused
with one line.
"""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch

from stratagem.launcher.cli import main
from stratagem.launcher.config import dump_toml
from stratagem.model import Transformer
from stratagem.parallel.deepspeed_engine import ADAM_STATES, DeepSpeedRun
from stratagem.train import loop
from stratagem.train.checkpoint import Checkpointer, TrainState
from stratagem.train.optim import build_optimizer
from tests.distributed import run_ranks
from tests.test_deepspeed import SAME_MICRO_BATCHES, config, plan
from tests.test_parallel_train import assert_close, assert_weights_close, config_for, losses
from tests.test_train import trained_weights

STAGES = (2, 3)


class NativeCheckpoints(DeepSpeedRun):
    """The deepspeed engine, also writing DeepSpeed's own checkpoint (into `folder`) whenever the loop
    writes stratagem's."""

    folder = ""

    def checkpoint_state(self, optimizer):
        self._ds.save_checkpoint(self.folder)
        return super().checkpoint_state(optimizer)


def ranks_train(rank: int, world: int, root: str) -> None:
    for stage in STAGES:
        cfg = config(root, f"zero{stage}")
        NativeCheckpoints.folder = f"{root}/deepspeed-zero{stage}"
        with mock.patch.object(loop, "DeepSpeedRun", NativeCheckpoints):
            loop.train(cfg, plan=plan(cfg, world, stage))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed-checkpoint")
    run_ranks(2, ranks_train, str(root), timeout=300)
    return root


def convert(root, stage: int, out, *extra: str) -> int:
    """`stratagem convert deepspeed` of the ZeRO-`stage` run's DeepSpeed checkpoint, under its own config."""
    return main(["convert", "deepspeed", str(root / f"deepspeed-zero{stage}"), str(out),
                 "--config", str(root / f"zero{stage}" / "config.toml"), *extra])


# where step 3 of each DeepSpeed checkpoint is converted to: the ZeRO-2 one into the checkpoints of
# the run that resumes it, the ZeRO-3 one anywhere (a run branches off it)
CONVERTED = {2: "resumed-zero2/checkpoints/step-3", 3: "converted-zero3/step-3"}


@functools.cache
def converted(root, stage: int):
    out = root / CONVERTED[stage]
    assert convert(root, stage, out, "--tag", "global_step3") == 0
    return out


def saved(path, cfg) -> tuple[dict, dict, TrainState, torch.optim.Optimizer]:
    """A checkpoint's weights, Adam states by parameter name, train state and optimizer."""
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    template = TrainState(step=0, loader={"split": "", "next_sample": 0}, scheduler=scheduler.state_dict())
    state = Checkpointer(path.parent).load(path, model, optimizer, template)
    adam = {name: optimizer.state[param] for name, param in model.named_parameters()}
    return model.state_dict(), adam, state, optimizer


@pytest.mark.parametrize("stage", STAGES)
def test_a_converted_checkpoint_holds_what_stratagem_saved_at_that_step(root, stage):
    cfg = config(root, f"zero{stage}")
    weights, adam, state, optimizer = saved(converted(root, stage), cfg)
    want_weights, want_adam, want_state, want_optimizer = saved(root / f"zero{stage}" / "checkpoints" / "step-3", cfg)
    for name, want in want_weights.items():  # the same float32 numbers, gathered by DeepSpeed's tools or its engine
        assert torch.equal(weights[name], want), name
    for name, want in want_adam.items():
        assert adam[name]["step"] == want["step"] == 3, name
        for key in ADAM_STATES:
            assert torch.equal(adam[name][key], want[key]), f"{name} {key}"
    assert (state.step, state.loader) == (want_state.step, want_state.loader) == (3, {"split": "train",
                                                                                     "next_sample": 48})
    for key in ("last_epoch", "base_lrs", "_last_lr"):
        assert state.scheduler[key] == want_state.scheduler[key], key
    assert [group["lr"] for group in optimizer.param_groups] == [group["lr"] for group in want_optimizer.param_groups]


def test_one_process_resumes_a_converted_zero2_checkpoint_in_place(root):
    converted(root, 2)
    loop.train(config(root, "resumed-zero2"), resume=True)
    assert_like_the_uninterrupted_run(root, "resumed-zero2", "zero2")


def test_one_process_branches_off_a_converted_zero3_checkpoint(root):
    branched = config_for(root, "branched-zero3", SAME_MICRO_BATCHES, f"--run.init_from={converted(root, 3)}")
    loop.train(branched)
    assert_like_the_uninterrupted_run(root, "branched-zero3", "zero3")


def assert_like_the_uninterrupted_run(root, run: str, deepspeed_run: str) -> None:
    assert_close(losses(root / run), losses(root / deepspeed_run)[3:])
    assert_weights_close(trained_weights(root / run, config(root, run)),
                         trained_weights(root / deepspeed_run, config(root, deepspeed_run)))


# --- bad input: one line each -------------------------------------------------------------------

def test_a_folder_that_is_not_a_deepspeed_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "config.toml").write_text(dump_toml(config(tmp_path, "any").to_dict()))
    assert main(["convert", "deepspeed", str(tmp_path), str(tmp_path / "step-3"),
                 "--config", str(tmp_path / "config.toml")]) == 2
    assert capsys.readouterr().err == (f"stratagem: error: {tmp_path}: not a DeepSpeed checkpoint (no 'latest' "
                                       f"file, no global_step* folder)\n")


@pytest.mark.parametrize("case", ["misfit", "exists", "no-tag", "misnamed"])
def test_bad_input_is_refused_with_one_line(root, case, capsys):
    ds_dir, out = root / "deepspeed-zero2", root / "refused" / case / "step-3"
    args, expected = {
        "misfit": (["--tag", "global_step3", "--model.n_kv_heads=4"],
                   f"{ds_dir / 'global_step3'}: does not fit the config's model: layers.0.mixer.wk.weight has shape "
                   f"(32, 64) in the DeepSpeed checkpoint, shape (64, 64) in the model"),
        "exists": (["--tag", "global_step3"],
                   f"{out}: already exists; the converted checkpoint goes to a new directory"),
        "no-tag": (["--tag", "global_step9"],
                   f"{ds_dir}: holds no checkpoint 'global_step9' (its tags: global_step3, global_step6)"),
        "misnamed": ([],  # `latest` names global_step6
                     f"{out}: name it step-6: the DeepSpeed checkpoint {ds_dir / 'global_step6'} is at step 6"),
    }[case]
    if case == "exists":
        out.mkdir(parents=True)
    capsys.readouterr()
    assert convert(root, 2, out, *args) == 2
    assert capsys.readouterr().err == f"stratagem: error: {expected}\n"
    assert out.exists() == (case == "exists")
