"""A plan whose engine is DeepSpeed: the whole model under ZeRO (stage 1, 2 or 3, optionally with
optimizer and parameter offload) over all ranks, driven by the same training loop as the native
runtime and writing stratagem's own checkpoints, so a run moves between engines.

Why a shadow model. DeepSpeed owns the training state in its own form: flat fp32 partitions of the
parameters and of Adam's moments, spread over the ranks (and, under stage 3, the module's own
parameters emptied). Stratagem's checkpoints (`train.checkpoint`) are DCP files keyed by the full
model's parameter names. So the engine keeps a plain copy of the model and an AdamW over it with
the same parameter groups (the *shadow*): the loop builds its optimizer and LR scheduler over the
shadow, checkpoints load into it and save from it. DeepSpeed itself starts lazily, at the first
step, from the shadow's weights and moments; before a checkpoint is written, DeepSpeed's full
fp32 weights and moments are gathered into the shadow (`checkpoint_state`; collective). The
shadow costs a full float32 copy of the weights on every rank, and of Adam's moments from the
first save on (benchmarks/engines.py measures it): the price of checkpoints that move between
engines, which a model too large to hold whole on a rank cannot pay (it would need the shadow
sharded as DTensors, not done yet). DeepSpeed's partitioned state is what trains.

Gradients and losses. Each rank takes its contiguous share of every global micro-batch and
computes the mean token loss of its rows; DeepSpeed divides by the gradient-accumulation steps and
averages over the ranks, which is the one-process mean. MoE layers get global expert loads (the
all-to-all dispatcher over all ranks, one expert group per rank), so their auxiliary losses and
bias updates equal one process's.
Clipping is DeepSpeed's (``gradient_clipping``, over the global norm); the learning rate and the
optimizer's settings are the shadow optimizer's groups', copied in before every step.

The DeepSpeed JSON is generated from the plan and the config (`deepspeed_config`) and written to
the run directory; ``engine.config`` names a user's JSON laid over it, which may add settings but
not contradict the plan's batch or ZeRO stage (`check_deepspeed_config`, before any process starts).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh

from stratagem.errors import ConfigError
from stratagem.model.moe import MoE, moe_metrics, update_expert_biases
from stratagem.model.transformer import Transformer
from stratagem.parallel.expert_parallel import split_experts
from stratagem.parallel.plan import Plan
from stratagem.train.engine import Engine
from stratagem.train.optim import build_optimizer, param_groups

ADAM_STATES = ("exp_avg", "exp_avg_sq")


# DeepSpeed's default bucket (5e8 elements) is allocated whole, in float32 2 GB per bucket: a model
# smaller than that gets buckets of its own size.
DEFAULT_BUCKET = 500_000_000


def deepspeed_config(plan: Plan, train_config, parameters: int = DEFAULT_BUCKET) -> dict:
    """The DeepSpeed JSON for `plan` and a model of `parameters`, the user's ``engine.config``
    laid over the generated one."""
    engine, pipe = plan.engine, plan.pipeline
    bucket = min(DEFAULT_BUCKET, parameters)
    zero: dict = {"stage": engine.zero_stage, "reduce_bucket_size": bucket}
    zero.update({"stage3_prefetch_bucket_size": bucket} if engine.zero_stage == 3 else {"allgather_bucket_size": bucket})
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if engine.offload_ratio < 1:
            zero["offload_optimizer"]["ratio"] = engine.offload_ratio
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    generated = {
        "train_batch_size": pipe.micro_batch_size * pipe.num_micro_batches,
        "train_micro_batch_size_per_gpu": pipe.micro_batch_size // plan.world_size,
        "gradient_accumulation_steps": pipe.num_micro_batches,
        "gradient_clipping": train_config.grad_clip,
        "zero_optimization": zero,
        # stratagem's AdamW (torch's): no fused or CPU Adam to compile, the same update as the native engine
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _lay_over(generated, read_user_config(plan)) if engine.config else generated


def read_user_config(plan: Plan) -> dict:
    path = Path(plan.engine.config)
    label = f"{plan.source}: engine.config = {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{label}: no such DeepSpeed config file")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{label}: not a readable JSON document ({err})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{label}: expected a JSON object at the top level")
    return document


def _lay_over(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _lay_over(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# What the plan fixes and a user's DeepSpeed JSON may not change: key path -> (plan's name for it).
_FIXED = {("train_batch_size",): "pipeline.micro_batch_size x num_micro_batches",
          ("train_micro_batch_size_per_gpu",): "pipeline.micro_batch_size / world_size",
          ("gradient_accumulation_steps",): "pipeline.num_micro_batches",
          ("zero_optimization", "stage"): "engine.zero_stage",
          ("gradient_clipping",): "train.grad_clip"}


def check_deepspeed_config(plan: Plan, train_config) -> None:
    """One line if the user's DeepSpeed JSON contradicts the plan or the config (a different ZeRO
    stage or batch), or asks for what this engine does otherwise (its own optimizer, fp16)."""
    if not plan.engine.config:
        return
    user = read_user_config(plan)
    merged = deepspeed_config(plan, train_config)
    generated = deepspeed_config(dataclasses.replace(plan, engine=dataclasses.replace(plan.engine, config="")),
                                 train_config)
    label = f"{plan.engine.config}"
    for path, name in _FIXED.items():
        theirs, ours = _get(user, path), _get(generated, path)
        if theirs is not None and theirs != ours:
            raise ConfigError(f"{label}: {'.'.join(path)} = {json.dumps(theirs)} contradicts the plan "
                              f"{plan.source} ({name} gives {json.dumps(ours)})")
    for key, why in (("optimizer", "the optimizer is stratagem's AdamW, set in [train]"),
                     ("scheduler", "the learning-rate schedule is stratagem's, set in [train]"),
                     ("fp16", "training runs in float32 (train.autocast)")):
        if key in user and (key != "fp16" or _get(merged, ("fp16", "enabled"))):
            raise ConfigError(f"{label}: {key} = {json.dumps(user[key])} is not supported by the deepspeed engine: {why}")


def _get(document: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(document, dict) or key not in document:
            return None
        document = document[key]
    return document


class DeepSpeedRun(Engine):
    """The whole model under DeepSpeed ZeRO on this rank (see the module docstring)."""

    def __init__(self, model: Transformer, plan: Plan, train_config):
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.micro_batches = plan.pipeline.num_micro_batches
        self.config = deepspeed_config(plan, train_config, sum(p.numel() for p in model.parameters()))
        self.state_module = copy.deepcopy(model)  # the shadow: what optimizer and checkpoints see
        self._model, self._train_config, self._host_split = model, train_config, plan.engine.offload_ratio < 1
        self._ds = None  # the DeepSpeed engine, started at the first step
        self._global_expert_loads(model)
        for index, layout in enumerate(plan.layers):
            if layout.checkpoint == "full":
                model.layers[index] = checkpoint_wrapper(model.layers[index])

    def _global_expert_loads(self, model: nn.Module) -> None:
        """Every MoE layer dispatches through the all-to-all dispatcher with one expert group per
        rank: nothing is split, but the load statistics are summed over all ranks. Their auxiliary
        gradients join the loss's inside the backward, past DeepSpeed's division of the loss, so
        they are divided by the accumulation steps here, as one process divides them."""
        moes = [m for m in model.modules() if isinstance(m, MoE)]
        for moe in moes:
            moe.aux_loss_scale = 1 / self.micro_batches
        if moes and self.world > 1:
            mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (self.world, 1),
                                    mesh_dim_names=("dp", "ep"))
            for moe in moes:
                split_experts(moe, mesh["ep"], dist.group.WORLD)

    # -- starting DeepSpeed from the shadow ------------------------------------------------------

    def start(self, shadow_optimizer: torch.optim.Optimizer) -> None:
        """Start DeepSpeed from the shadow model and optimizer, after any checkpoint was loaded into them."""
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed
        from deepspeed.utils import logger, safe_set_full_optimizer_state

        logger.setLevel("WARNING")
        self._model.load_state_dict(self.state_module.state_dict())  # weights as loaded (a checkpoint) or built
        optimizer = self._optimizer(self._model)
        self._ds, *_ = deepspeed.initialize(model=self._model, optimizer=optimizer, config=self.config,
                                            dist_init_required=False)
        step = _adam_step(shadow_optimizer)
        if step:  # resumed: DeepSpeed's moments from the shadow's (DeepSpeed's own appear at its first step)
            self._create_adam_states(step)
            for name, param in self._named_parameters():
                shadow_state = shadow_optimizer.state[self._shadow_params[name]]
                for key in ADAM_STATES:
                    safe_set_full_optimizer_state(param, shadow_state[key], key)

    def _create_adam_states(self, step: float) -> None:
        """Adam's moments (zero) and step count on DeepSpeed's flat fp32 partitions, linked to the
        module's parameters, so that the full moments can be written into them."""
        zero = self._ds.optimizer
        for inner in _inner_optimizers(zero):
            for group in inner.param_groups:
                for flat in group["params"]:
                    inner.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                                         "exp_avg_sq": torch.zeros_like(flat)}
        _link_adam_states(zero)

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """stratagem's AdamW over `model`; DeepSpeed's CPU Adam (the same AdamW update, compiled on
        first use) when the update is split between host and device, which DeepSpeed requires."""
        if not self._host_split:
            return build_optimizer(model, self._train_config)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        tc = self._train_config
        return DeepSpeedCPUAdam(param_groups(model, tc), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                                adamw_mode=True)

    @property
    def _shadow_params(self) -> dict[str, nn.Parameter]:
        return dict(self.state_module.named_parameters())

    def _named_parameters(self):
        return [(plain_name(name), p) for name, p in self._ds.module.named_parameters() if p.requires_grad]

    # -- what the loop drives ---------------------------------------------------------------------

    def train_step(self, micro_batches: list[torch.Tensor]) -> float:
        total = 0.0
        for i, tokens in enumerate(micro_batches):
            loss = self._local_loss(self._ds, tokens)
            self._ds.backward(loss)
            if i < len(micro_batches) - 1:
                self._ds.step()  # not a boundary: DeepSpeed only counts the micro-step
            total += loss.detach().item()
        return self._mean_over_ranks(total / len(micro_batches))

    def _local_loss(self, module, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens.tensor_split(self.world)[self.rank]
        logits = module(rows[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())

    def _mean_over_ranks(self, value: float) -> float:
        total = torch.tensor(value, dtype=torch.float64)
        dist.all_reduce(total)
        return total.item() / self.world

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """DeepSpeed's step (the accumulation boundary) under the shadow optimizer's settings:
        clipping to the configured norm, the update, zeroed gradients; the norm before clipping."""
        for inner in _inner_optimizers(self._ds.optimizer):
            for group, own in zip(inner.param_groups, optimizer.param_groups, strict=True):
                group.update({k: v for k, v in own.items() if k != "params"})
        self._ds.step()
        norm = self._ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        self._ds.eval()
        total = sum(self._local_loss(self._ds, tokens).item() for tokens in batches) / len(batches)
        self._ds.train()
        return self._mean_over_ranks(total)

    def after_optimizer_step(self) -> None:
        update_expert_biases(self._ds.module)

    def moe_metrics(self) -> dict[str, float]:
        return moe_metrics(self._ds.module)

    def checkpoint_state(self, optimizer: torch.optim.Optimizer):
        """Gather DeepSpeed's full fp32 weights and Adam moments into the shadow (collective) and
        return (shadow model, shadow optimizer) for `train.checkpoint`."""
        if self._ds is None:
            return self.state_module, optimizer
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        shadow = self._shadow_params
        step = _adam_step_of(self._ds.optimizer)
        _link_adam_states(self._ds.optimizer)
        with torch.no_grad():
            for name, param in self._named_parameters():
                target = shadow[name]
                target.copy_(safe_get_full_fp32_param(param).view_as(target))
                optimizer.state[target] = {"step": torch.tensor(step),
                                           **{key: safe_get_full_optimizer_state(param, key).view_as(target).clone()
                                              for key in ADAM_STATES}}
            saved = self.state_module.state_dict()  # persistent buffers (MoE expert biases), not caches
            for name, buffer in self._ds.module.named_buffers():
                if plain_name(name) in saved:
                    saved[plain_name(name)].copy_(buffer)
        return self.state_module, optimizer


def plain_name(name: str) -> str:
    """A parameter's name in the single-device model (without activation checkpointing's wrapper)."""
    return name.replace("._checkpoint_wrapped_module", "")


def _link_adam_states(zero) -> None:
    """Stages 1 and 2 link each parameter to its slice of Adam's flat moments once, after their
    first step; with optimizer offload that happens after the first parameter group's update, so
    the other groups' parameters stay unlinked (DeepSpeed 0.19.8). Link (again) with every group's
    moments in place. Stage 3 reads the moments directly."""
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _inner_optimizers(zero) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind a ZeRO optimizer (stage 3 with a partial host update has two)."""
    found = [zero.optimizer]
    backup = getattr(zero, "backup_optimizer", None)
    if backup is not None:
        found.append(backup)
    return found


def _adam_step(optimizer: torch.optim.Optimizer) -> float:
    """The step count of a torch Adam's state (0 before its first step)."""
    for state in optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def _adam_step_of(zero) -> float:
    return max(_adam_step(inner) for inner in _inner_optimizers(zero))
