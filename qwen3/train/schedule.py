"""The schedule every optimizer group follows: a linear warmup then a cosine decay of the learning
rate, and (optionally) Muon's momentum warmed up, set before each optimizer step."""

from __future__ import annotations

import math

import torch

from qwen3.config import TrainConfig

# Muon's momentum under `muon_momentum_warmup`: from this value at step 1 up to Muon's own (0.95).
MUON_MOMENTUM_START = 0.85


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of every peak learning rate at optimizer step `step` (1-based).

    Linear warmup reaching 1 at step `warmup_steps`, then half a cosine from 1 down to
    `min_lr_ratio` at `max_steps`: f = r + (1 - r) * (1 + cos(pi * progress)) / 2.
    """
    if step <= warmup_steps:
        return step / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_schedule(optimizers: list[torch.optim.Optimizer], step: int, config: TrainConfig) -> None:
    """Set every group's learning rate for optimizer step `step` (1-based) and, with a momentum
    warmup, Muon's momentum: linear from MUON_MOMENTUM_START to its peak over the warmup's steps."""
    factor = lr_factor(step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    rise = min(1.0, (step - 1) / config.muon_momentum_warmup) if config.muon_momentum_warmup else 1.0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
            if "initial_momentum" in group:
                peak = group["initial_momentum"]
                group["momentum"] = MUON_MOMENTUM_START + (peak - MUON_MOMENTUM_START) * rise
