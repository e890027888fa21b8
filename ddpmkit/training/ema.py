"""Exponential moving average (EMA) of model weights.

shadow <- decay * shadow + (1 - decay) * param after every optimizer update (the DDPM paper
samples from EMA weights with decay 0.9999). Floating-point buffers (e.g. normalization
statistics) are copied, not averaged.

The state dict keeps the reference project's layout, `{"decay", "num_updates", "shadow":
{name: tensor}}`, so its checkpoints load here and ours load there.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """EMA of `model`'s parameters, held as a full copy of the model (`ema.model`) for sampling.

    Args:
        model: the trained model (unwrapped: not a DDP wrapper).
        decay: averaging factor in [0, 1).
        warmup: use min(decay, (1 + n) / (10 + n)) after n updates, so early weights are not
            stuck near the random initialization in short runs (off by default).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step toward `model`'s current weights."""
        decay = self.current_decay()
        shadow = [p for p in self.model.parameters()]
        params = list(model.parameters())  # no detach needed under no_grad (one call fewer each)
        if len(shadow) != len(params):
            raise ValueError("EMA model and model have different parameter lists")
        # lerp: shadow + (1 - decay) * (param - shadow), one fused kernel over all tensors.
        torch._foreach_lerp_(shadow, params, 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": self.shadow_state_dict(), "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        self.decay = float(state.get("decay", self.decay))
        self.num_updates = int(state.get("num_updates", 0))
        self.warmup = bool(state.get("warmup", self.warmup))
        self.model.load_state_dict(state["shadow"], strict=strict)

    def to(self, device: torch.device | None = None) -> EMA:
        self.model.to(device)
        return self
