"""A checkpoint written by DeepSpeed's own ``engine.save_checkpoint(dir)`` as a stratagem checkpoint,
so that a stratagem run resumes from it (`<run>/checkpoints/step-N`) or branches off it
(``run.init_from``).

Why DeepSpeed reads its format. DeepSpeed's checkpoint (``DIR/latest`` naming the tag folder
``DIR/global_stepN/``: the model states and every rank's ``*zero_pp_rank_*_optim_states.pt``) holds
flat fp32 partitions of the weights and of Adam's moments, laid out by ZeRO stage, world size and
bucket padding. DeepSpeed's own tools undo that: ``zero_to_fp32`` gives the full weights (with the
buffers and tied weights), and the universal-checkpoint conversion (``ds_to_universal``) gives
every parameter's full fp32 value, ``exp_avg`` and ``exp_avg_sq``, for ZeRO 1, 2 and 3. Written
here is only what they leave: the names (the module's, without a ``module.`` prefix or activation
checkpointing's wrapper), the step counts (``global_steps`` of the model states; Adam's step in
its per-parameter ``step.pt`` under ZeRO 1 and 2, in the optimizer's global state under ZeRO-3),
and stratagem's form of the rest.

What DeepSpeed's checkpoint does not hold is taken from the stratagem config the user names,
which must be the one the DeepSpeed run trained (its model, optimizer, schedule and data):

- the scheduler: this config's schedule at step N, and the optimizer's settings (the learning
  rate of step N+1), as a run of it that had taken N steps holds them;
- the data-loader position: the one a stratagem run of this config has after N steps, found by
  building its loader and reading N steps of data (generating them for the synthetic corpus). It
  is right when the DeepSpeed run read this config's data in stratagem's order (a run under
  stratagem's deepspeed engine did); otherwise the resumed run reads as if it had;
- the RNG: the state after building the model from ``run.seed``, as every stratagem run has at
  its first step (training draws no random numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from stratagem.data.pipeline import build_train_batches
from stratagem.errors import CheckpointError
from stratagem.launcher.config import Config
from stratagem.model import Transformer
from stratagem.parallel.deepspeed_engine import ADAM_STATES, plain_name
from stratagem.train.checkpoint import Checkpointer, TrainState
from stratagem.train.loop import branch_schedule
from stratagem.train.optim import build_optimizer
from stratagem.train.schedule import lr_multiplier

_TAG = re.compile(r"^global_step(\d+)$")


def convert_deepspeed_checkpoint(ds_dir: Path, out: Path, config: Config, tag: str | None = None) -> Path:
    """Write DeepSpeed checkpoint `tag` of `ds_dir` (default: the one `latest` names) as the stratagem
    checkpoint directory `out` (``.../step-N``, N its step) for `config`; returns `out`."""
    ds_dir, out = Path(ds_dir), Path(out)
    tag = checkpoint_tag(ds_dir, tag)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; the converted checkpoint goes to a new directory")
    step = global_steps(ds_dir / tag)
    if out.name != f"step-{step}":
        raise CheckpointError(f"{out}: name it step-{step}: the DeepSpeed checkpoint {ds_dir / tag} is at step {step}")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _quietly():
        ds_weights = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag)
    ds_names = {_stratagem_name(name): name for name in ds_weights}
    weights = {name: ds_weights[ds_name] for name, ds_name in ds_names.items()}
    torch.manual_seed(config.run.seed)  # as a run builds it: the RNG state saved is a fresh run's
    model = Transformer(config.model)
    check_fits(weights, model.state_dict(), ds_dir / tag)
    model.load_state_dict(weights)
    optimizer = build_optimizer(model, config.train)
    with tempfile.TemporaryDirectory(prefix="universal-") as scratch:
        zero = universal_checkpoint(ds_dir / tag, Path(scratch))
        load_adam_states(optimizer, model, zero, ds_names)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(config.train, s))
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    branch_schedule(optimizer, scheduler, settings, config.train, step)
    state = TrainState(step=step, loader=loader_position(config, step), scheduler=scheduler.state_dict())
    return Checkpointer(out.parent).save(step, model, optimizer, state, config.to_dict())


def checkpoint_tag(ds_dir: Path, tag: str | None) -> str:
    """The tag folder to read: `tag`, else the one DeepSpeed's `latest` file names, else the newest
    ``global_stepN``; one line if `ds_dir` is not a DeepSpeed checkpoint or has no such tag."""
    tags = sorted((path.name for path in ds_dir.glob("global_step*") if path.is_dir() and _TAG.match(path.name)),
                  key=lambda name: int(name.removeprefix("global_step")))
    latest = ds_dir / "latest"
    if tag is None and latest.is_file():
        tag = latest.read_text().strip()
    elif tag is None and tags:
        tag = tags[-1]
    elif tag is None:
        raise CheckpointError(f"{ds_dir}: not a DeepSpeed checkpoint (no 'latest' file, no global_step* folder)")
    if not (ds_dir / tag).is_dir():
        raise CheckpointError(f"{ds_dir}: holds no checkpoint {tag!r} (its tags: {', '.join(tags) or 'none'})")
    if not any((ds_dir / tag).glob("*model_states.pt")):
        raise CheckpointError(f"{ds_dir / tag}: not a DeepSpeed checkpoint (no *model_states.pt)")
    return tag


def global_steps(tag_dir: Path) -> int:
    """DeepSpeed's count of optimizer steps (accumulation boundaries), kept in every model states file."""
    first = sorted(tag_dir.glob("*model_states.pt"))[0]
    return int(torch.load(first, map_location="cpu", weights_only=False)["global_steps"])


def check_fits(weights: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor], label: Path) -> None:
    """One line naming the first tensor of the config's model that the checkpoint lacks or holds in
    another shape, or the first checkpoint tensor the model does not have."""
    for name, ours in model_state.items():
        theirs = weights.get(name)
        if theirs is None or theirs.shape != ours.shape:
            held = "no such tensor" if theirs is None else f"shape {tuple(theirs.shape)}"
            raise CheckpointError(f"{label}: does not fit the config's model: {name} has {held} in the DeepSpeed "
                                  f"checkpoint, shape {tuple(ours.shape)} in the model")
    for name, theirs in weights.items():
        if name not in model_state:
            raise CheckpointError(f"{label}: does not fit the config's model: {name} (shape {tuple(theirs.shape)}) "
                                  f"of the DeepSpeed checkpoint is not in the model")


def universal_checkpoint(tag_dir: Path, scratch: Path) -> Path:
    """DeepSpeed's universal checkpoint of `tag_dir` written under `scratch`; its ``zero`` folder
    (one folder per parameter: fp32.pt, exp_avg.pt, exp_avg_sq.pt). The universal-checkpoint
    version that ZeRO 1 and 2 require is injected: clients such as Megatron-DeepSpeed write it into
    their checkpoints, stratagem's deepspeed engine does not."""
    from deepspeed.checkpoint.ds_to_universal import main

    out = scratch / tag_dir.name
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with _quietly():
        main(args)
    return out / "zero"


def load_adam_states(optimizer: torch.optim.Optimizer, model: nn.Module, zero: Path, ds_names: dict[str, str]) -> None:
    """Adam's step and moments from the universal checkpoint's `zero` folder into `optimizer`'s
    state of every parameter of `model` (`ds_names`: stratagem name -> DeepSpeed's)."""
    step = torch.tensor(adam_steps(zero))
    for name, param in model.named_parameters():
        optimizer.state[param] = {"step": step.clone(), **{
            key: _universal_tensor(zero / ds_names[name] / f"{key}.pt").view_as(param) for key in ADAM_STATES}}


def adam_steps(zero: Path) -> float:
    """Adam's step count: every parameter's step.pt under ZeRO 1 and 2, the optimizer's global state under ZeRO-3."""
    steps = sorted(zero.glob("*/step.pt"))
    if steps:
        return float(torch.load(steps[0], map_location="cpu"))
    state = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    return float(next(iter(state["optimizer_state_dict"]["state"].values()))["step"])


def _universal_tensor(path: Path) -> torch.Tensor:
    """ZeRO 1 and 2 save {"param": tensor, ...}, ZeRO-3 the flat tensor itself."""
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    return loaded["param"] if isinstance(loaded, dict) else loaded


def loader_position(config: Config, step: int) -> dict:
    """The data-loader state of a one-process run of `config` after `step` steps (reads those steps' data)."""
    tc = config.train
    batches = build_train_batches(config.data, tc.micro_batch_size, tc.accumulation_steps(config.data.seq_len),
                                  config.run.seed)
    try:
        for _ in range(step):
            batches.next_step()
        return batches.state_dict()
    finally:
        batches.close()


def _stratagem_name(name: str) -> str:
    return plain_name(name.removeprefix("module."))


@contextlib.contextmanager
def _quietly():
    """DeepSpeed's tools print their progress to stdout and stderr."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
