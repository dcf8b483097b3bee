"""Learning-rate schedule: linear warm-up, then cosine decay to min_lr. Pure."""

from __future__ import annotations

import math

from ..config.schema import TrainConfig


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of train.lr for the optimizer step with 0-based index `step`."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    floor = train.min_lr / train.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
