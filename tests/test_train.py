"""One-process training: schedules, gradient accumulation, resume equality, run-directory safety, logs."""

import json
import math
import shutil

import pytest
import torch

from stratagem.errors import CheckpointError
from stratagem.launcher.config import load_config
from stratagem.model import Transformer
from stratagem.train.checkpoint import Checkpointer, TrainState
from stratagem.train.config import TrainConfig
from stratagem.train.loop import train
from stratagem.train.metrics import read_metrics
from stratagem.train.optim import build_optimizer
from stratagem.train.schedule import lr_multiplier, schedule_phase


def small_config(tmp_path, *overrides, name="run"):
    return load_config(None, [
        "--model.flavor=tiny", "--data.seq_len=32", "--train.micro_batch_size=4",
        "--train.global_batch_tokens=256", "--train.steps=8", "--train.warmup_steps=2",
        "--train.eval_every=4", "--train.eval_batches=2", "--train.checkpoint_every=4",
        "--train.keep_checkpoints=0", f"--run.dir={tmp_path}", f"--run.name={name}", *overrides])


def trained_weights(run_dir, config):
    """The model weights of a run's newest checkpoint."""
    model = Transformer(config.model)
    checkpoints = Checkpointer(run_dir / "checkpoints")
    template = TrainState(step=0, loader={"split": "", "next_sample": 0}, scheduler={})
    checkpoints.load(checkpoints.latest(), model, build_optimizer(model, config.train), template)
    return model.state_dict()


def losses(run_dir):
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in read_metrics(run_dir)]


# --- schedules -------------------------------------------------------------------------------

def test_cosine_schedule_values():
    cfg = TrainConfig(steps=101, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(cfg, 0) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 9) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 10) == pytest.approx(1.0)
    # halfway through the decay (step 55 of 10..100) the cosine is at its midpoint
    assert lr_multiplier(cfg, 55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(cfg, 100) == pytest.approx(0.1)
    assert schedule_phase(cfg, 5) == "warmup" and schedule_phase(cfg, 50) == "decay"


def test_wsd_schedule_values():
    cfg = TrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(cfg, 4) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 10) == 1.0 and lr_multiplier(cfg, 79) == 1.0
    assert lr_multiplier(cfg, 80) == 1.0  # the decay starts at step 80 ...
    assert lr_multiplier(cfg, 89) == pytest.approx(1 - 9 / 19)  # ... and falls linearly ...
    assert lr_multiplier(cfg, 99) == pytest.approx(0.0)  # ... to the floor at the last step
    assert [schedule_phase(cfg, s) for s in (9, 10, 79, 80, 99)] == \
        ["warmup", "stable", "stable", "decay", "decay"]


def test_constant_schedule_after_warmup():
    cfg = TrainConfig(steps=50, warmup_steps=4, schedule="constant")
    assert [lr_multiplier(cfg, s) for s in (0, 3, 4, 49)] == [0.25, 1.0, 1.0, 1.0]


def test_lr_logged_follows_the_schedule(tmp_path):
    config = small_config(tmp_path, "--train.schedule=wsd", "--train.lr=0.01")
    train(config)
    logged = [r["lr"] for r in read_metrics(tmp_path / "run")]
    assert logged == pytest.approx([0.01 * lr_multiplier(config.train, s) for s in range(8)])


# --- gradient accumulation --------------------------------------------------------------------

def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """k micro-batches of b sequences give the same update as one batch of k*b sequences."""
    accumulated = small_config(tmp_path, "--train.steps=3", "--train.micro_batch_size=2", name="accum")
    big = small_config(tmp_path, "--train.steps=3", "--train.micro_batch_size=8", name="big")
    assert accumulated.train.accumulation_steps(32) == 4 and big.train.accumulation_steps(32) == 1
    train(accumulated)
    train(big)
    a, b = losses(tmp_path / "accum"), losses(tmp_path / "big")
    for (_, loss_a, _), (_, loss_b, _) in zip(a, b):
        assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-6)
    wa, wb = trained_weights(tmp_path / "accum", accumulated), trained_weights(tmp_path / "big", big)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


# --- resume -----------------------------------------------------------------------------------

def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    train(small_config(tmp_path, name="straight"))
    resumed = small_config(tmp_path, "--train.checkpoint_every=0", name="resumed")
    first = train(resumed, stop_after=4)
    assert first.checkpoint.name == "step-4" and [s for s, *_ in losses(tmp_path / "resumed")] == [1, 2, 3, 4]
    train(resumed, resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bit-identical floats


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    config = small_config(tmp_path)
    train(config)
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-8")  # as if the job died after step 8 was logged
    before = losses(run)
    result = train(config, resume=True)
    assert result.step == 8 and losses(run) == before  # steps 5..8 recomputed identically, once each


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    result = train(small_config(tmp_path, "--train.steps=2", "--train.checkpoint_every=0"), resume=True)
    assert result.step == 2 and (tmp_path / "run" / "checkpoints" / "step-2").is_dir()


def test_partial_checkpoint_is_ignored_on_resume(tmp_path):
    config = small_config(tmp_path, "--train.steps=4")
    train(config)
    (tmp_path / "run" / "checkpoints" / "step-6.partial").mkdir()
    result = train(small_config(tmp_path, "--train.steps=6"), resume=True)
    assert result.step == 6 and [s for s, *_ in losses(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


# --- bad run directories: refused before any work, nothing overwritten -----------------------

def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    train(small_config(tmp_path, "--train.steps=4"))
    before = snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"run: already holds a run \(checkpoint step-4\).*--resume"):
        train(small_config(tmp_path, "--train.steps=4"))
    assert snapshot(tmp_path / "run") == before


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    train(small_config(tmp_path, "--train.steps=4"))
    before = snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"step-4: holds another run's checkpoint \(model.dim = 64, "
                                              r"this config has 128\)"):
        train(small_config(tmp_path, "--model.dim=128"), resume=True)
    assert snapshot(tmp_path / "run") == before


def test_corrupt_checkpoint_is_reported_with_its_path(tmp_path):
    train(small_config(tmp_path, "--train.steps=4"))
    ckpt = tmp_path / "run" / "checkpoints" / "step-4"
    data_file = next(ckpt.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    before = snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match=rf"{ckpt}: corrupt checkpoint"):
        train(small_config(tmp_path), resume=True)
    assert snapshot(tmp_path / "run") == before


def test_incomplete_checkpoint_names_the_missing_file(tmp_path):
    train(small_config(tmp_path, "--train.steps=4"))
    ckpt = tmp_path / "run" / "checkpoints" / "step-4"
    (ckpt / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=rf"{ckpt}: incomplete checkpoint, .metadata is missing"):
        train(small_config(tmp_path), resume=True)


def test_unreadable_checkpoint_metadata(tmp_path):
    train(small_config(tmp_path, "--train.steps=4"))
    meta = tmp_path / "run" / "checkpoints" / "step-4" / "meta.json"
    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{meta}: unreadable checkpoint metadata"):
        train(small_config(tmp_path), resume=True)


# --- what a run writes ------------------------------------------------------------------------

def test_run_directory_contents(tmp_path):
    config = small_config(tmp_path, "--train.keep_checkpoints=1")
    train(config)
    run = tmp_path / "run"
    assert load_config(str(run / "config.toml")) == config
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["tokens"] for r in records] == [256 * s for s in range(1, 9)]
    for record in records:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "phase"} <= set(record)
        assert math.isfinite(record["loss"]) and record["tokens_per_s"] > 0 and record["mfu"] > 0
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-8"]  # keep_checkpoints=1
    counts = json.loads((run / "model_counts.json").read_text())
    assert counts["total_params"] == sum(p.numel() for p in Transformer(config.model).parameters())


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(small_config(tmp_path))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(scalars)
    logged = [e.value for e in events.Scalars("loss")]
    assert logged == pytest.approx([r["loss"] for r in read_metrics(tmp_path / "run")], rel=1e-6)


def test_bf16_autocast_trains(tmp_path):
    train(small_config(tmp_path, "--train.autocast=bf16"))
    records = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


def test_gradient_clipping_scales_the_update(tmp_path):
    """With Adam's eps far above the gradients the first update is lr * g / eps, proportional to the
    (clipped) gradient (lr = eps keeps it near g, far above float32 rounding of the weights), so
    clipping to c must shrink the update by c / grad_norm."""
    common = ("--train.steps=1", "--train.warmup_steps=0", "--train.schedule=constant", "--train.eps=1000",
              "--train.lr=1000", "--train.weight_decay=0")
    clipped_cfg = small_config(tmp_path, "--train.grad_clip=0.01", *common, name="clipped")
    train(clipped_cfg)
    train(small_config(tmp_path, "--train.grad_clip=0", *common, name="free"))
    (record,) = read_metrics(tmp_path / "free")
    assert record["grad_norm"] > 0.1  # so that a clip at 0.01 really clips

    torch.manual_seed(clipped_cfg.run.seed)
    initial = Transformer(clipped_cfg.model).state_dict()

    def update_norm(name):
        after = trained_weights(tmp_path / name, clipped_cfg)
        return torch.sqrt(sum(((after[k] - initial[k]) ** 2).sum() for k in initial)).item()

    ratio = update_norm("clipped") / update_norm("free")
    assert ratio == pytest.approx(0.01 / record["grad_norm"], rel=1e-3)
