"""What the training loop needs besides the trainer: the LR schedule, the data source's epoch
and resume position, and the module under DDP / torch.compile wrappers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from ddpmkit.choices import LR_DECAYS


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "none",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base LR before update `step` (0-based).

    Linear warmup min((step + 1) / warmup_steps, 1) (the reference's form), then `decay` from 1
    down to `min_lr_ratio` at `total_steps`: `cosine` (half a cosine wave) or `linear`.
    """
    factor = min((step + 1) / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    if decay == "none" or total_steps <= warmup_steps:
        return factor
    progress = min(max((step - warmup_steps) / (total_steps - warmup_steps), 0.0), 1.0)
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown lr decay {decay!r}; choose from {', '.join(LR_DECAYS)}")
    return factor * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)


def set_epoch(data: Any, epoch: int) -> None:
    """Tell the data source (or its sampler) which epoch starts: its shuffle depends on it."""
    for obj in (data, getattr(data, "sampler", None),
                getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def iter_from(data: Iterable, start: int) -> Iterator:
    """Batches of the current epoch from index `start` (skipping cheaply where supported)."""
    if start == 0:
        return iter(data)
    if hasattr(data, "iter_from"):
        return data.iter_from(start)
    return itertools.islice(iter(data), start, None)
