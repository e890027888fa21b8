"""Building blocks of the DDPM UNet: timestep embedding, residual block, self-attention, resampling.

References:
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", appendix B and the
  official TensorFlow code (`diffusion_tf/models/unet.py`): block layout, initialization.
- Vaswani et al. 2017, "Attention Is All You Need", section 3.5 (sinusoidal embedding) and
  eq. 1 (scaled dot-product attention).
- Wu & He 2018, "Group Normalization"; Elfwing et al. 2018 / Ramachandran et al. 2017 (SiLU).

Symbols and shapes:
- `B` batch, `C` channels, `H, W` height and width, `N = H * W` positions.
- `t`: timesteps, (B,) int64 (float accepted); `temb`: time embedding, (B, E), E = 4 * ch.
- `q, k, v`: queries, keys, values, each (B, C, H, W) before flattening to (B, 1, N, C).

Child-module names and their order are part of the public contract: the state_dict keys must
equal those of the reference implementation so that its released checkpoints load unchanged.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# The DDPM paper's sinusoidal embedding uses the Transformer's base wavelength.
MAX_PERIOD = 10_000.0
# Output-side layers start near zero so each residual branch starts near identity (DDPM code
# uses `init_scale=1e-10` for these layers rather than an exact zero).
ZERO_INIT_SCALE = 1e-10
DEFAULT_NUM_GROUPS = 32


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [sin(t w_k), cos(t w_k)], w_k = exp(-k ln(1e4) / (dim/2 - 1)).

    t: (B,) any real dtype -> (B, dim) float32. Odd `dim` gets one zero column at the end.
    """
    half = dim // 2
    if half < 2:
        raise ValueError(f"timestep embedding width must be at least 4, got {dim}")
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(MAX_PERIOD) / (half - 1) * k)  # (half,)
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


@torch.no_grad()
def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """TF `variance_scaling(scale, mode="fan_avg", distribution="uniform")`, in place.

    w ~ U(-a, a), a = sqrt(3 scale / fan_avg), fan_avg = (fan_in + fan_out) / 2; for a conv
    weight (O, I, kh, kw): fan_in = I kh kw, fan_out = O kh kw.
    """
    receptive = math.prod(weight.shape[2:]) if weight.ndim > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    limit = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    return weight.uniform_(-limit, limit)


def conv2d(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
           init_scale: float = 1.0) -> nn.Conv2d:
    """A Conv2d with DDPM initialization (variance scaling, zero bias)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def linear(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    """A Linear layer with DDPM initialization (variance scaling, zero bias)."""
    layer = nn.Linear(in_features, out_features)
    variance_scaling_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a bf16/fp16 input in its dtype under autocast.

    CUDA autocast runs group_norm in float32: it upcasts the (bf16) convolution output, writes
    a float32 result, the SiLU reads and writes float32, and the next convolution casts back to
    bf16, so every norm costs about three extra full-size passes over the activation (CPU
    autocast already keeps group_norm in bf16). The kernels accumulate the statistics in
    float32 for low-precision inputs, and every GroupNorm output here feeds a convolution that
    would round it to bf16 anyway, so running it in the input's dtype gives the same numbers up
    to bf16 rounding. Only gamma and beta are cast (tiny). Float32 inputs take nn.GroupNorm's
    path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and \
                torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype),
                                    self.bias.to(x.dtype), self.eps)
        return super().forward(x)


def group_norm(channels: int, eps: float, num_groups: int = DEFAULT_NUM_GROUPS) -> GroupNorm:
    if channels % num_groups != 0:
        raise ValueError(
            f"GroupNorm needs channels divisible by num_groups: {channels} % {num_groups} != 0"
        )
    return GroupNorm(num_groups, channels, eps=eps)


class TimestepBlock(nn.Module):
    """A layer whose forward takes the time embedding: forward(x, temb)."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepSequential(nn.Sequential, TimestepBlock):
    """nn.Sequential that hands `temb` to the children that take it (ResBlock, not attention).

    Kept as a Sequential so children are named `0`, `1`, ... as in the reference's state_dict.
    """

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, temb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """GN -> SiLU -> conv3x3 -> + Linear(SiLU(temb)) -> GN -> SiLU -> Dropout -> conv3x3, + skip.

    x: (B, in_ch, H, W), temb: (B, E) -> (B, out_ch, H, W). The skip path is a 1x1 conv when
    the channel count changes, else the identity.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0,
                 eps: float = 1e-5, num_groups: int = DEFAULT_NUM_GROUPS):
        super().__init__()
        self.norm1 = group_norm(in_ch, eps, num_groups)
        self.conv1 = conv2d(in_ch, out_ch, 3, padding=1)
        self.fc = linear(temb_dim, out_ch)
        self.norm2 = group_norm(out_ch, eps, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv2d(out_ch, out_ch, 3, padding=1, init_scale=ZERO_INIT_SCALE)
        self.skip = nn.Identity() if in_ch == out_ch else conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.fc(F.silu(temb))[:, :, None, None]  # (B, out_ch, 1, 1) broadcast
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.

    out = x + W_o softmax(q^T k / sqrt(C)) v, with q, k, v from ONE 1x1 conv of GN(x) (channel
    blocks in that order), computed by `F.scaled_dot_product_attention` (fused kernels on GPU).
    x: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, eps: float = 1e-5, num_groups: int = DEFAULT_NUM_GROUPS):
        super().__init__()
        self.norm = group_norm(channels, eps, num_groups)
        self.project_in = conv2d(channels, 3 * channels, 1)
        self.project_out = conv2d(channels, channels, 1, init_scale=ZERO_INIT_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.project_in(self.norm(x))  # (B, 3C, H, W)
        # (B, 3C, H, W) -> (B, N, 3C) -> 3 x (B, 1, N, C): one head of width C. `contiguous`
        # gives the fused kernels unit stride on C (a no-op for channels_last inputs).
        qkv = qkv.flatten(2).transpose(1, 2).contiguous()
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C); (B, 1, N, C)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.project_out(h)


class Downsample(nn.Sequential):
    """Pad 0 left/top and 1 right/bottom, then 3x3 stride-2 conv: (B, C, H, W) -> (B, C, H/2, W/2).

    This asymmetric pad is TensorFlow's "SAME" padding for even H, W, as in the DDPM code.
    """

    def __init__(self, channels: int):
        super().__init__(nn.ZeroPad2d((0, 1, 0, 1)), conv2d(channels, channels, 3, stride=2))


class Upsample(nn.Sequential):
    """Nearest-neighbour x2, then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"),
                         conv2d(channels, channels, 3, padding=1))
