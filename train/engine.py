"""What the training loop drives: one process's model, or this rank's part of a model under a Plan.

Both kinds serve the same calls, so `train.loop` has one path:

- ``train_step(micro_batches) -> float``: forward and backward of one optimizer step on the
  step's global micro-batches, the step's mean loss (on every rank);
- ``clip_grad_norm_(max_norm) -> float``, ``evaluate(batches) -> float``;
- ``after_optimizer_step()`` (MoE bias updates), ``moe_metrics() -> dict``;
- ``state_module``: one module whose parameter names are the full model's, for the optimizer and
  distributed checkpoints (`StateView` gathers a rank's stage modules under those names);
- from `Engine`: ``start(optimizer)`` once before the first step (after a checkpoint was loaded),
  ``step(optimizer, max_norm) -> float`` (clip, then the optimizer's step; the norm before
  clipping) and ``checkpoint_state(optimizer) -> (module, optimizer)``, what a checkpoint saves.
  The DeepSpeed engine (`parallel.deepspeed_engine`) overrides all three.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from stratagem.model.moe import moe_metrics, set_aux_loss_scale, update_expert_biases
from stratagem.model.transformer import Transformer


def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


class Engine:
    """What every engine shares: the optimizer steps on `state_module`'s parameters themselves."""

    def start(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once, before the first step and after any checkpoint was loaded."""

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        norm = self.clip_grad_norm_(max_norm)
        optimizer.step()
        return norm

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        return self.state_module, optimizer


class OneProcess(Engine):
    """The whole model in this process: gradient accumulation over the step's micro-batches."""

    def __init__(self, model: Transformer, micro_batches: int, autocast=contextlib.nullcontext):
        self.model = self.state_module = model
        self.autocast = autocast  # a context for the forward passes (bf16 autocast, or none)
        set_aux_loss_scale(model, 1 / micro_batches)  # MoE auxiliary losses, scaled like the LM loss

    def train_step(self, micro_batches: list[torch.Tensor]) -> float:
        total = 0.0
        for tokens in micro_batches:
            with self.autocast():
                loss = loss_fn(self.model, tokens)
            (loss / len(micro_batches)).backward()
            total += loss.item()
        return total / len(micro_batches)

    def clip_grad_norm_(self, max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        self.model.eval()
        with self.autocast():
            losses = [loss_fn(self.model, batch).item() for batch in batches]
        self.model.train()
        return sum(losses) / len(losses)

    def after_optimizer_step(self) -> None:
        update_expert_biases(self.model)  # aux-loss-free MoE balancing, from this step's expert load

    def moe_metrics(self) -> dict[str, float]:
        return moe_metrics(self.model)


class StateView(nn.Module):
    """A rank's stage modules as one module named like the full model (``tok_embeddings``,
    ``layers.<index>``, ``norm``, ``output``), holding the same parameter objects: what the
    optimizer and distributed checkpoints see, so that a checkpoint's keys do not depend on the
    plan that wrote it."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict()
        for module in modules:
            for name, child in module.named_children():
                if name == "layers":
                    self.layers.update(child)
                elif child is not None and getattr(self, name, None) is None:
                    setattr(self, name, child)
