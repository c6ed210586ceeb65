"""Checkpoints: one `torch.distributed.checkpoint` (DCP) directory per step, committed atomically.

Layout: `<run>/checkpoints/step-N/` holds the DCP files (model, optimizer, scheduler, step,
data-loader position, RNG state) and `meta.json` (step, resolved config). A checkpoint is written
into `step-N.partial/` and renamed to `step-N/` only when complete, so a crash mid-save never
leaves a directory that looks complete; `*.partial` directories are ignored when resuming.
DCP stores tensors by fully-qualified name, so loading does not depend on the layout that saved.
The optimizer's state is flattened to per-parameter keys, its hyperparameters included
(``param_groups.<name>.lr``): a pipeline rank holds only its stage's parameters, and DCP keeps one
copy of a key that every rank writes, so an unflattened ``param_groups`` list would keep one
rank's parameter names and lose the others'. Format 1 (unflattened) is refused by version.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from stratagem.errors import CheckpointError

FORMAT_VERSION = 2
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs to continue exactly."""

    step: int
    loader: dict
    scheduler: dict


class Checkpointer:
    """The checkpoints of one run. `keep` newest ones are kept (0: all), and besides them every step
    that is a multiple of `keep_every` and every step in `keep_steps`. `load` reads any checkpoint
    directory, this run's or another's (a branch starting from it)."""

    def __init__(self, folder: Path, keep: int = 0, keep_every: int = 0, keep_steps: Iterable[int] = ()):
        self.folder = Path(folder)
        self.keep, self.keep_every, self.keep_steps = keep, keep_every, frozenset(keep_steps)

    def complete(self) -> list[tuple[int, Path]]:
        """Committed checkpoints, oldest first. A committed one missing its files is an error."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and path.is_dir():
                for required in (".metadata", "meta.json"):
                    if not (path / required).is_file():
                        raise CheckpointError(f"{path}: incomplete checkpoint, {required} is missing")
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    @staticmethod
    def read_meta(path: Path) -> dict:
        try:
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
            int(meta["step"]), dict(meta["config"]["model"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path / 'meta.json'}: unreadable checkpoint metadata ({err})") from None
        return meta

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
             config: dict) -> Path:
        """Write step `step` (collective in a process group: rank 0 prepares and commits the
        directory, every rank writes its shards in between)."""
        final = self.folder / f"step-{step}"
        partial = self.folder / f"step-{step}.partial"
        coordinator = not dist.is_initialized() or dist.get_rank() == 0
        if coordinator:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
        payload = {"model": model_sd, "optim": optim_sd, "step": state.step, "loader": state.loader,
                   "scheduler": state.scheduler, "rng": torch.get_rng_state()}
        with _single_process_quietly():
            dcp.save(payload, checkpoint_id=str(partial), no_dist=not dist.is_initialized())
        if coordinator:
            meta = {"format_version": FORMAT_VERSION, "step": step, "config": config}
            (partial / "meta.json").write_text(json.dumps(meta, indent=1))
            partial.rename(final)
            self._prune()
        _barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             template: TrainState) -> TrainState:
        """Load into `model` and `optimizer` in place and restore the RNG; returns the rest.

        DCP loads into the structure it is given, so `template` must carry the keys of the
        loader and scheduler states (their current `state_dict()`s).
        """
        meta = self.read_meta(path)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
        payload = {"model": model_sd, "optim": optim_sd, "step": template.step, "loader": template.loader,
                   "scheduler": template.scheduler, "rng": torch.get_rng_state()}
        try:
            with _single_process_quietly():
                dcp.load(payload, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: corrupt checkpoint, cannot load it ({reason})") from None
        if payload["step"] != meta["step"]:
            raise CheckpointError(f"{path}: corrupt checkpoint, meta.json says step {meta['step']} "
                                  f"but the saved state is at step {payload['step']}")
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"],
                       options=OPTIONS)
        torch.set_rng_state(payload["rng"])
        return TrainState(step=payload["step"], loader=payload["loader"], scheduler=payload["scheduler"])

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for step, path in self.complete()[:-self.keep]:
            if not (self.keep_every and step % self.keep_every == 0) and step not in self.keep_steps:
                shutil.rmtree(path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns on every call without a process group; one process is a supported, intended case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def check_resumable(path: Path, config: dict) -> None:
    """Refuse a checkpoint of a different model shape before anything is built or written."""
    mismatch = _model_mismatch(Checkpointer.read_meta(path)["config"]["model"], config["model"])
    if mismatch:
        raise CheckpointError(f"{path}: holds another run's checkpoint ({mismatch}); choose another run.name")


def check_branch_point(path: Path, config: dict) -> None:
    """Check `run.init_from` = `path` before anything is built or written: a complete checkpoint of
    this config's model shape, before this config's last step."""
    label = f"run.init_from = {str(path)!r}"
    if not path.is_dir():
        raise CheckpointError(f"{label}: no such checkpoint directory")
    if not _STEP_DIR.match(path.name):
        raise CheckpointError(f"{label}: not a checkpoint directory (<run>/checkpoints/step-N)")
    for required in (".metadata", "meta.json"):
        if not (path / required).is_file():
            raise CheckpointError(f"{label}: incomplete checkpoint, {required} is missing")
    meta = Checkpointer.read_meta(path)
    mismatch = _model_mismatch(meta["config"]["model"], config["model"])
    if mismatch:
        raise CheckpointError(f"{label}: a checkpoint of another model shape ({mismatch})")
    mismatch = _stream_mismatch(meta["config"], config)
    if mismatch:
        raise CheckpointError(f"{label}: saved by a run that read its data otherwise ({mismatch}); a branch "
                              f"continues the same data stream")
    steps = config["train"]["steps"]
    if meta["step"] >= steps:
        raise CheckpointError(f"{label}: is at step {meta['step']}, not before this run's last step "
                              f"(train.steps = {steps})")


def check_weights_file(path: Path, model: nn.Module) -> None:
    """Check `run.init_weights` = `path` against `model` (reading only the file's header) before any
    work: a safetensors file holding exactly the model's tensors, each of its shape."""
    from safetensors import SafetensorError, safe_open

    label = f"run.init_weights = {str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{label}: no such weights file")
    try:
        with safe_open(str(path), "pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{label}: not a safetensors file ({err})") from None
    wanted = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for key in sorted(wanted.keys() | shapes.keys()):
        if key not in shapes:
            raise CheckpointError(f"{label}: has no tensor {key}, which the model has")
        if key not in wanted:
            raise CheckpointError(f"{label}: has a tensor {key}, which the model does not have")
        if shapes[key] != wanted[key]:
            raise CheckpointError(f"{label}: {key} has shape {shapes[key]}, the model's is {wanted[key]}")


def _stream_mismatch(saved: dict, config: dict) -> str | None:
    """The first setting that fixes the data stream's position and tokens per step (the data
    section, the batch in tokens, the seed) on which a branch differs from its checkpoint's run."""
    pairs = [(f"data.{k}", saved["data"].get(k), v) for k, v in config["data"].items()]
    pairs += [("train.global_batch_tokens", saved["train"].get("global_batch_tokens"),
               config["train"]["global_batch_tokens"]), ("run.seed", saved["run"].get("seed"), config["run"]["seed"])]
    for key, theirs, ours in pairs:
        if theirs != ours:
            return f"{key} = {theirs!r}, this config has {ours!r}"
    return None


def _model_mismatch(saved: dict, model: dict) -> str | None:
    """The first model key (the flavor name aside) whose value differs, described; None if the shapes agree."""
    for key, value in model.items():
        if key != "flavor" and saved.get(key) != value:
            return f"model.{key} = {saved.get(key)!r}, this config has {value!r}"
    return None
