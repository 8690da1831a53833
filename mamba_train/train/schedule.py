"""Learning-rate schedules as pure functions of the step: nothing to checkpoint, and a
resumed run gets exactly the rate the uninterrupted run would have had."""

from __future__ import annotations

import math

from mamba_train.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """The rate of step `step` (0-based) of `total_steps`: linear warmup from 0 over
    `warmup_steps`, then cosine from `lr` down to `min_lr` at `total_steps`, constant, or
    warmup-stable-decay (OptimConfig.schedule says which)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "wsd":
        # the decay never reaches into the warmup: a short run decays over what follows it
        decay_steps = max(1, min(round(optim.decay_fraction * total_steps), total_steps - optim.warmup_steps))
        progress = (step - (total_steps - decay_steps)) / decay_steps
        if progress < 0:
            return optim.lr
        return optim.min_lr + (optim.lr - optim.min_lr) * (1.0 - math.sqrt(min(1.0, progress)))
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))
