"""The `[train]` section: optimisation, schedule, batch, evaluation, checkpoint and logging settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from stratagem.errors import ConfigValueError

SCHEDULES = ("cosine", "wsd", "constant")
AUTOCAST = ("none", "bf16")


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_tokens: int = 4096  # tokens per optimizer step; micro-batches are accumulated to reach it
    micro_batch_size: int = 8  # sequences per forward/backward
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd | constant (each after linear warmup)
    warmup_steps: int = 30
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to the minimum
    weight_decay: float = 0.1  # decoupled (AdamW); never applied to norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    autocast: str = "none"  # none | bf16 (torch.autocast on the device)
    eval_every: int = 50  # steps between evaluations on the held-out split; 0 disables
    eval_batches: int = 4  # micro-batches per evaluation
    checkpoint_every: int = 100  # steps between checkpoints; the last step is always saved
    keep_checkpoints: int = 2  # newest checkpoints kept; 0 keeps all
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
    # also write a checkpoint at these steps and never delete it: where a scaling ladder's decays branch off
    keep_steps: list[int] = field(default_factory=list)
    log_every: int = 10  # steps between log lines when output is not a terminal
    peak_flops: float = 1.0e11  # per-device peak FLOP/s that model FLOPs utilisation is measured against
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def validate(self) -> None:
        positive = ("steps", "global_batch_tokens", "micro_batch_size", "eval_batches", "log_every")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigValueError(key, getattr(self, key), "must be positive")
        non_negative = ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "checkpoint_every",
                        "keep_checkpoints", "keep_every", "threads")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ConfigValueError(key, getattr(self, key), "must not be negative")
        if self.lr <= 0:
            raise ConfigValueError("lr", self.lr, "must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigValueError("min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")
        if self.schedule not in SCHEDULES:
            raise ConfigValueError("schedule", self.schedule, f"must be one of {', '.join(SCHEDULES)}")
        if self.warmup_steps > self.steps:
            raise ConfigValueError("warmup_steps", self.warmup_steps, f"exceeds steps = {self.steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigValueError("decay_fraction", self.decay_fraction, "must lie in (0, 1]")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigValueError(key, getattr(self, key), "must lie in [0, 1)")
        if self.eps <= 0:
            raise ConfigValueError("eps", self.eps, "must be positive")
        if self.autocast not in AUTOCAST:
            raise ConfigValueError("autocast", self.autocast, f"must be one of {', '.join(AUTOCAST)}")
        if self.peak_flops <= 0:
            raise ConfigValueError("peak_flops", self.peak_flops, "must be positive")
        for step in self.keep_steps:
            if not 0 < step < self.steps:
                raise ConfigValueError("keep_steps", self.keep_steps, f"step {step} is not in 1..{self.steps - 1} "
                                       f"(steps = {self.steps} is always kept)")

    def accumulation_steps(self, seq_len: int) -> int:
        """Micro-batches per optimizer step; `global_batch_tokens` must be a whole number of them."""
        tokens_per_micro = self.micro_batch_size * seq_len
        if self.global_batch_tokens % tokens_per_micro:
            raise ConfigValueError(
                "global_batch_tokens", self.global_batch_tokens,
                f"is not a multiple of micro_batch_size * data.seq_len = {tokens_per_micro}")
        return self.global_batch_tokens // tokens_per_micro
