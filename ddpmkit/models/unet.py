"""The DDPM UNet (Ho et al. 2020), built from a config's `model` section.

References:
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", appendix B: a PixelCNN++-
  style UNet (Salimans et al. 2017) with wide-ResNet blocks, GroupNorm, self-attention at the
  16x16 level, sinusoidal timestep embedding; the official TF code for the exact layout.
- Shi et al. 2016, "Real-Time Single Image and Video Super-Resolution Using an Efficient
  Sub-Pixel Convolutional Neural Network" (pixel shuffle), for the optional `block_size`.

Symbols and shapes: `B` batch, `C` image channels, `H, W` image size, `L` levels
(len(ch_multipliers)), `ch` base channels (`hid_channels`), `b` pixel-shuffle block size.
`model(x, t)`: x (B, C, H, W), t (B,) int64 in [0, T) (float accepted) -> (B, out_channels, H, W).
A class-conditional UNet (`num_classes` K) also takes `model(x, t, y)`, y (B,) int64 in [0, K]
(K: "no class"; y None means K for every sample): a learned class embedding is added to the
time embedding (see `ddpmkit.models.conditioning`). Without classes the network has no extra
weights: the same keys and outputs as before conditioning existed.

Layout (level i has ch * ch_multipliers[i] channels; attention after each residual block of the
levels with apply_attn[i]):
    in_conv -> for each level: num_res_blocks blocks [+ Downsample unless last] -> middle
    (res, attn, res) -> for each level, deepest first: num_res_blocks + 1 blocks, each fed the
    concatenation with the matching down-path activation [+ Upsample unless level 0] -> out_conv.
The state_dict keys and shapes equal the reference implementation's, so its checkpoints load
with a plain `load_state_dict` once `module.` / `_model.` prefixes are stripped.

Pixel shuffle (`block_size` b > 1): `forward` applies `pixel_unshuffle` (B, C, H, W) ->
(B, C b^2, H/b, W/b), runs the network on that, and `pixel_shuffle`s the (B, out_channels b^2,
H/b, W/b) output back. The layers simply have C b^2 input and out_channels b^2 output channels;
no wrapper module, so the key names are the same as for b = 1 (the reference wrapped the model
and prefixed every key with `_model.`; strip it to load such a checkpoint here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ddpmkit.errors import UserError
from ddpmkit.models.conditioning import check_num_classes, class_embedding, class_ids
from ddpmkit.models.layers import (
    DEFAULT_NUM_GROUPS,
    ZERO_INIT_SCALE,
    AttnBlock,
    Downsample,
    ResBlock,
    TimestepBlock,
    TimestepSequential,
    Upsample,
    conv2d,
    group_norm,
    linear,
    timestep_embedding,
)


class UNet(nn.Module):
    """DDPM UNet. See the module docstring for the layout and the pixel-shuffle option.

    Args:
        in_channels: image channels C.
        hid_channels: base channel count `ch` (128 for the DDPM CIFAR-10 model).
        out_channels: output channels (C, or 2C for a learned variance; the caller decides).
        ch_multipliers: channels of level i = ch * ch_multipliers[i]; L = len(ch_multipliers).
        num_res_blocks: residual blocks per level on the down path (one more on the up path).
        apply_attn: per level, whether to add self-attention after each residual block; a bool
            applies to every level.
        drop_rate: dropout inside residual blocks.
        group_norm_eps: GroupNorm epsilon (the reference's released checkpoints used 1e-5).
        block_size: pixel-shuffle factor b (1 = off).
        time_embedding_dim: width of the time embedding (default 4 * ch).
        num_groups: GroupNorm groups (32 in DDPM; smaller values allow tiny test models).
        num_classes: K for a class-conditional network (None or 0: unconditional).
    """

    def __init__(
        self,
        in_channels: int,
        hid_channels: int,
        out_channels: int,
        ch_multipliers: Sequence[int],
        num_res_blocks: int,
        apply_attn: bool | Sequence[bool],
        drop_rate: float = 0.0,
        group_norm_eps: float = 1e-5,
        block_size: int = 1,
        time_embedding_dim: int | None = None,
        num_groups: int = DEFAULT_NUM_GROUPS,
        num_classes: int | None = None,
    ):
        super().__init__()
        levels = len(ch_multipliers)
        if isinstance(apply_attn, bool):
            apply_attn = [apply_attn] * levels
        _check_args(in_channels, hid_channels, out_channels, ch_multipliers, num_res_blocks,
                    apply_attn, drop_rate, group_norm_eps, block_size)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hid_channels = hid_channels
        self.block_size = block_size
        self.levels = levels
        # Inputs must survive L-1 halvings after the space-to-depth step.
        self.size_divisor = block_size * 2 ** (levels - 1)
        temb_dim = time_embedding_dim or 4 * hid_channels
        eps, groups = group_norm_eps, num_groups

        def block(in_ch: int, out_ch: int, attn: bool) -> nn.Module:
            res = ResBlock(in_ch, out_ch, temb_dim, drop_rate, eps, groups)
            return TimestepSequential(res, AttnBlock(out_ch, eps, groups)) if attn else res

        self.embed = nn.Sequential(
            linear(hid_channels, temb_dim), nn.SiLU(), linear(temb_dim, temb_dim))
        self.in_conv = conv2d(in_channels * block_size ** 2, hid_channels, 3, padding=1)

        # Down path; `skip_chs` records the channels of every activation the up path will reuse.
        skip_chs: list[int] = [hid_channels]
        ch = hid_channels
        down: dict[str, nn.ModuleList] = {}
        for i, mult in enumerate(ch_multipliers):
            layers = []
            for _ in range(num_res_blocks):
                layers.append(block(ch, hid_channels * mult, apply_attn[i]))
                ch = hid_channels * mult
                skip_chs.append(ch)
            if i != levels - 1:
                layers.append(Downsample(ch))
                skip_chs.append(ch)
            down[f"level_{i}"] = nn.ModuleList(layers)
        self.downsamples = nn.ModuleDict(down)

        self.middle = TimestepSequential(
            ResBlock(ch, ch, temb_dim, drop_rate, eps, groups),
            AttnBlock(ch, eps, groups),
            ResBlock(ch, ch, temb_dim, drop_rate, eps, groups),
        )

        up: dict[str, nn.ModuleList] = {}
        for i in reversed(range(levels)):
            layers = []
            for _ in range(num_res_blocks + 1):
                layers.append(block(ch + skip_chs.pop(), hid_channels * ch_multipliers[i],
                                    apply_attn[i]))
                ch = hid_channels * ch_multipliers[i]
            if i != 0:
                layers.append(Upsample(ch))
            up[f"level_{i}"] = nn.ModuleList(layers)
        assert not skip_chs, "every down-path activation is consumed exactly once"
        # Registered level_0 first, like the reference; forward walks them deepest first.
        self.upsamples = nn.ModuleDict({f"level_{i}": up[f"level_{i}"] for i in range(levels)})

        self.out_conv = nn.Sequential(
            group_norm(ch, eps, groups),
            nn.SiLU(),
            conv2d(ch, out_channels * block_size ** 2, 3, padding=1, init_scale=ZERO_INIT_SCALE),
        )
        # Created last, so an unconditional network draws its initial weights exactly as before.
        self.num_classes = check_num_classes(num_classes)
        if self.num_classes is not None:
            self.class_embed = class_embedding(self.num_classes, temb_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) or scalar, y: (B,) class labels or None -> (B, out_channels,
        H, W)."""
        B, _, H, W = x.shape
        if H % self.size_divisor or W % self.size_divisor:
            raise ValueError(
                f"image size {H}x{W} must be divisible by {self.size_divisor} "
                f"(block_size {self.block_size} x 2^(levels-1))"
            )
        if t.ndim == 0:
            t = t.expand(B)
        if self.block_size > 1:
            x = F.pixel_unshuffle(x, self.block_size)  # (B, C b^2, H/b, W/b)
        emb = timestep_embedding(t, self.hid_channels).to(self.in_conv.weight.dtype)
        temb = self.embed(emb)  # (B, E)
        ids = class_ids(y, B, self.num_classes, x.device)
        if ids is not None:
            temb = temb + self.class_embed(ids)  # (B, E)

        h = self.in_conv(x)
        hs = [h]
        for level in self.downsamples.values():
            for layer in level:
                h = layer(h, temb) if isinstance(layer, TimestepBlock) else layer(h)
                hs.append(h)
        h = self.middle(h, temb)
        for level in reversed(list(self.upsamples.values())):
            for layer in level:
                if isinstance(layer, TimestepBlock):
                    h = layer(torch.cat([h, hs.pop()], dim=1), temb)
                else:  # Upsample
                    h = layer(h)
        h = self.out_conv(h)
        if self.block_size > 1:
            h = F.pixel_shuffle(h, self.block_size)  # (B, out_channels, H, W)
        return h


def _check_args(in_channels, hid_channels, out_channels, ch_multipliers, num_res_blocks,
                apply_attn, drop_rate, group_norm_eps, block_size) -> None:
    for name, value in (("in_channels", in_channels), ("hid_channels", hid_channels),
                        ("out_channels", out_channels), ("num_res_blocks", num_res_blocks),
                        ("block_size", block_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(ch_multipliers) == 0 or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ch_multipliers):
        raise ValueError(
            f"ch_multipliers must be a non-empty list of positive integers, got {ch_multipliers!r}")
    if len(apply_attn) != len(ch_multipliers) or not all(isinstance(a, bool) for a in apply_attn):
        raise ValueError(
            f"apply_attn must be a bool or a list of {len(ch_multipliers)} bools (one per level), "
            f"got {apply_attn!r}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if not group_norm_eps > 0.0:
        raise ValueError(f"group_norm_eps must be positive, got {group_norm_eps!r}")


# Keys of a config's `model` section: required ones, then optional ones with their defaults.
MODEL_REQUIRED_KEYS = ("in_channels", "hid_channels", "ch_multipliers", "num_res_blocks",
                       "apply_attn")
MODEL_DEFAULTS: Mapping[str, Any] = {
    "drop_rate": 0.0,
    "group_norm_eps": 1e-5,
    "block_size": 1,
    "time_embedding_dim": None,
    "num_groups": DEFAULT_NUM_GROUPS,
    "num_classes": None,
}


def size_divisor(model_cfg: Mapping[str, Any]) -> int:
    """What H and W must be multiples of for a config's `model` section: block_size x
    2^(levels-1) (the halvings of the down path after the space-to-depth step)."""
    block = int(model_cfg.get("block_size") or MODEL_DEFAULTS["block_size"])
    return block * 2 ** (len(model_cfg["ch_multipliers"]) - 1)


def check_image_size(model_cfg: Mapping[str, Any], height: int, width: int) -> None:
    """A one-line UserError naming the nearest valid sizes when this network cannot take
    height x width images."""
    d = size_divisor(model_cfg)
    if height % d == 0 and width % d == 0:
        return

    def nearest(n: int) -> list[int]:  # n itself if valid, else the multiples around it
        if n % d == 0:
            return [n]
        return [s for s in (n // d * d, -(-n // d) * d) if s >= d]

    options = [(h, w) for h in nearest(height) for w in nearest(width)]
    listed = " or ".join(f"{h},{w}" for h, w in options)
    raise UserError(f"image size {height}x{width} does not fit this UNet: height and width must "
                    f"be multiples of {d} (block_size x 2^(levels-1)); nearest valid "
                    f"--image-size: {listed}")


def build_model(model_cfg: Mapping[str, Any], out_channels: int) -> UNet:
    """Build the UNet from a config's `model` section; `out_channels` comes from the diffusion
    (`diffusion.model_out_channels(C)`), the one place that knows about learned variances.

    Bad or missing keys raise UserError naming the key and the allowed ones.
    """
    allowed = set(MODEL_REQUIRED_KEYS) | set(MODEL_DEFAULTS)
    unknown = sorted(set(model_cfg) - allowed)
    if unknown:
        raise UserError(
            f"unknown key(s) {unknown} in the config's \"model\" section; "
            f"allowed: {sorted(allowed)}")
    missing = [k for k in MODEL_REQUIRED_KEYS if k not in model_cfg]
    if missing:
        raise UserError(f"the config's \"model\" section lacks required key(s) {missing}")
    kwargs = {**MODEL_DEFAULTS, **model_cfg}
    kwargs["ch_multipliers"] = list(kwargs["ch_multipliers"])
    if not isinstance(kwargs["apply_attn"], bool):
        kwargs["apply_attn"] = list(kwargs["apply_attn"])
    try:
        return UNet(out_channels=out_channels, **kwargs)
    except ValueError as exc:
        raise UserError(f"invalid \"model\" config: {exc}") from exc


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
