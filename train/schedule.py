"""Learning-rate schedules as pure functions of the step: linear warmup, then cosine, WSD or constant.

`lr_multiplier(cfg, step)` is the factor applied to `cfg.lr` for the update at `step` (0-based).
Warmup: step s < warmup_steps uses (s + 1) / warmup_steps, so the first update is not wasted at
lr 0 and the last warmup step reaches the peak. After warmup:
- cosine: from 1 down to `min_lr_ratio` at the last step along half a cosine;
- wsd (warmup-stable-decay): 1 until the last `decay_fraction` of the steps, then linearly down to
  `min_lr_ratio` at the last step (the stable phase lets a run be branched into decays at any point);
- constant: 1.
"""

from __future__ import annotations

import math

from stratagem.train.config import TrainConfig


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    start = cfg.warmup_steps if cfg.schedule == "cosine" else _wsd_decay_start(cfg)
    if step < start:
        return 1.0
    progress = min((step - start) / max(cfg.steps - 1 - start, 1), 1.0)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - floor) * progress


def schedule_phase(cfg: TrainConfig, step: int) -> str:
    """`warmup`, `stable` or `decay`: recorded with every metrics line for the scaling-law module."""
    if step < cfg.warmup_steps:
        return "warmup"
    if cfg.schedule == "cosine":
        return "decay"
    if cfg.schedule == "wsd" and step >= _wsd_decay_start(cfg):
        return "decay"
    return "stable"


def _wsd_decay_start(cfg: TrainConfig) -> int:
    decay_steps = max(round(cfg.decay_fraction * cfg.steps), 1)
    return max(cfg.steps - decay_steps, cfg.warmup_steps)
