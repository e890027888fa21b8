"""The denoising network for 2-D toy data: an MLP of timestep-conditioned residual layers.

The layout follows the reference project's toy decoder (input projection, `num_temporal_layers`
pre-norm residual layers that each add a projection of the timestep embedding, output norm and
projection), with one defect fixed: the reference built its residual stack as `[layer] * n`, so
all n layers were one layer applied n times. Here every layer has its own weights.

Optional input Fourier features (Tancik et al. 2020, "Fourier Features Let Networks Learn High
Frequency Functions in Low Dimensional Domains") give the MLP a way to draw the sharp borders
between narrow mixture modes; they are off by default (reference behaviour).

Shapes: x_t (B, D) with D = `in_features`, t int64 (B,), output (B, `out_features`).
A class-conditional MLP (`num_classes` K) also takes labels y int64 (B,) in [0, K] (K: "no
class"; None: K for all) whose learned embedding is added to the timestep embedding (see
`ddpmkit.models.conditioning`); without classes it is exactly the unconditional network.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ddpmkit.models.conditioning import check_num_classes, class_embedding, class_ids

# The reference's nonlinearity: LeakyReLU with a small negative slope.
LEAKY_SLOPE = 0.02
# Sinusoidal embedding: frequencies exp(-k ln(MAX_PERIOD) / (half - 1)), as in DDPM.
MAX_PERIOD = 10_000.0


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; DDPM): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32)
        / max(half - 1, 1)
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TemporalLayer(nn.Module):
    """Pre-norm residual MLP block; the timestep embedding is added between the two linears."""

    def __init__(self, features: int, temb_features: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(features)
        self.fc1 = nn.Linear(features, features, bias=False)
        self.temb_proj = nn.Linear(temb_features, features)
        self.norm2 = nn.LayerNorm(features)
        self.fc2 = nn.Linear(features, features, bias=False)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, h: torch.Tensor, temb_proj: torch.Tensor) -> torch.Tensor:
        """h: (B, F); temb_proj: (B, F), this layer's projection of the timestep embedding."""
        out = self.fc1(self.act(self.norm1(h))) + temb_proj
        out = self.fc2(self.act(self.norm2(out)))
        return h + out


class ToyMLP(nn.Module):
    """denoise_fn(x_t, t) for toy data.

    Args:
        in_features: data dimensions D (2 for the toy datasets).
        mid_features: hidden width (reference flag `--mid-features`).
        num_temporal_layers: residual layers (reference flag `--num-temporal-layers`).
        out_features: network outputs; D, or 2D for a learned variance. Defaults to D.
        fourier_features: number of random Fourier frequencies of the input (0: off).
        fourier_scale: std of those frequencies, in cycles per data unit.
        fourier_seed: seed of the fixed (non-trained) Fourier frequencies.
        num_classes: K for a class-conditional network (None or 0: unconditional).
    """

    def __init__(self, in_features: int = 2, mid_features: int = 128,
                 num_temporal_layers: int = 3, out_features: int | None = None,
                 fourier_features: int = 0, fourier_scale: float = 1.0, fourier_seed: int = 0,
                 num_classes: int | None = None):
        super().__init__()
        if in_features <= 0 or mid_features <= 0 or num_temporal_layers < 0:
            raise ValueError("in_features and mid_features must be positive and "
                             "num_temporal_layers non-negative")
        if fourier_features < 0:
            raise ValueError(f"fourier_features must be >= 0, got {fourier_features}")
        out_features = in_features if out_features is None else out_features
        self.in_features = in_features
        self.mid_features = mid_features
        self.fourier_features = fourier_features

        embed_in = in_features
        if fourier_features:
            g = torch.Generator().manual_seed(fourier_seed)
            freqs = torch.randn(in_features, fourier_features, generator=g) * fourier_scale
            # A buffer, not a parameter: fixed frequencies, saved with the weights.
            self.register_buffer("fourier_freqs", 2 * math.pi * freqs)
            embed_in = in_features + 2 * fourier_features
        else:
            self.fourier_freqs = None
        self.in_fc = nn.Linear(embed_in, mid_features, bias=False)
        self.temb = nn.Sequential(
            nn.Linear(mid_features, mid_features),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        # One module per layer: no weight sharing (the reference's `[layer] * n` defect).
        self.layers = nn.ModuleList(
            [TemporalLayer(mid_features, mid_features) for _ in range(num_temporal_layers)]
        )
        self.out_norm = nn.LayerNorm(mid_features)
        self.out_fc = nn.Linear(mid_features, out_features)
        # Created last, so an unconditional network draws its initial weights exactly as before.
        self.num_classes = check_num_classes(num_classes)
        if self.num_classes is not None:
            self.class_embed = class_embedding(self.num_classes, mid_features)

    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.fourier_freqs is None:
            return x
        proj = x @ self.fourier_freqs.to(x.dtype)  # (B, F)
        return torch.cat([x, torch.sin(proj), torch.cos(proj)], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        # The timestep path runs once per distinct t (at most T rows; one row while sampling)
        # and is gathered back to the batch: a third of each layer's cost otherwise.
        t_unique, inverse = torch.unique(t, return_inverse=True)
        temb = self.temb(timestep_embedding(t_unique, self.mid_features).to(x_t.dtype))  # (U, F)
        ids = class_ids(y, x_t.shape[0], self.num_classes, x_t.device)
        cemb = None if ids is None else self.class_embed.weight.to(x_t.dtype)  # (K + 1, F)
        h = self.in_fc(self.embed_input(x_t))
        for layer in self.layers:
            # index_select, not `[inverse]`: on CPUs the backward of advanced indexing (a
            # sorting index_put) took 0.4 ms per layer at batch 1000, index_select's 0.04 ms.
            proj = torch.index_select(layer.temb_proj(temb), 0, inverse)  # (B, F)
            if cemb is not None:
                # temb_proj(temb + c_y) = temb_proj(temb) + W c_y: the class part, too, is
                # projected once per class (K + 1 rows) and gathered.
                class_proj = cemb @ layer.temb_proj.weight.T  # (K + 1, F)
                proj = proj + torch.index_select(class_proj, 0, ids)
            h = layer(h, proj)
        return self.out_fc(self.out_norm(h))
