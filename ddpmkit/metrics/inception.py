"""The FID Inception-v3 feature extractor: the TensorFlow graph of 2015-12-05 rebuilt in PyTorch.

References:
- Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision" (Inception-v3).
- Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium" (FID; its TF code runs the graph `inception-2015-12-05.tgz`).
- Salimans et al. 2016, "Improved Techniques for Training GANs" (Inception Score; its TF code
  multiplies the pool features by the `softmax/logits/MatMul` weight, without the bias).

This is not torchvision's Inception-v3: the TF graph has 1008 classes, BatchNorm eps 1e-3, average
pools in the mixed blocks that do not count padding, and a *max* pool in the last block's pool
branch. The weights file `pt_inception-2015-12-05-6726825d.pth` (the TF weights ported to
PyTorch, also used by pytorch-fid and torch-fidelity) loads into `FIDInceptionV3` by name.

Preprocessing, as in the TF graph: uint8 RGB -> float32 -> bilinear resize to 299 x 299 the way
TF1's `resize_bilinear(align_corners=False)` does it -> (x - 128) / 128.

Symbols / shapes: `B` batch, `H, W` input size (any), images uint8 (B, 3, H, W) (or (B, 1, H, W)
grey, replicated to RGB); `pool` (B, 2048) float32 features for FID / precision-recall / KID;
`logits_unbiased` (B, 1008) float32 = pool @ fc.weight^T (no bias) for the Inception Score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpmkit.errors import UserError
from ddpmkit.metrics.weights import WeightsFile, resolve_inception_weights
from ddpmkit.runtime.devices import inductor_freezing

INPUT_SIZE = 299  # the graph's input resolution
NUM_CLASSES = 1008  # outputs of the 2015-12-05 graph's final layer
POOL_DIM = 2048
TF32_SUFFIX = "+tf32"  # appended to the identity of an extractor that uses TF32
BN_EPS = 1e-3  # TF's BatchNorm epsilon in this graph (torch's default is 1e-5)
PIXEL_OFFSET = 128.0  # the graph maps uint8 pixels p to (p - 128) / 128
PIXEL_SCALE = 128.0
# Name recorded in reference statistics, with the weights' hash, so that statistics made by a
# different extractor (or different weights) are recognised as stale.
EXTRACTOR_NAME = "fid-inception-v3-2015-12-05/tf1-bilinear-299"

# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------

def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False, half_pixel_centers=False)`; x: (B, C, H, W) float.

    Written by hand because `torch.nn.functional.interpolate(mode="bilinear")` samples at
    half-pixel centres, src = (dst + 0.5) * in / out - 0.5, while the TF1 op used by the FID graph
    samples at src = dst * in / out (no half-pixel offset), clamping the upper neighbour to the
    last row/column. The two disagree by up to a pixel shift, which changes FID noticeably.

    The arithmetic follows TF's kernel step by step (float32 scale in / out, floor, then
    `a + (b - a) * frac` along x, then along y) so the result is bit-exact on CPU. Interpolating
    every input row along x first and then gathering rows gives the same per-pixel operations
    as TF's four-corner form, with less work.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]

    def sample_points(in_size: int, out_size: int):
        # scale = in / out rounded to float32, as TF computes it
        scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size,
                                                                           dtype=torch.float32)
        src = torch.arange(out_size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = src.long()  # floor: src >= 0
        hi = (lo + 1).clamp_max(in_size - 1)
        frac = (src - lo.to(torch.float32)).to(x.dtype)
        return lo, hi, frac

    lo_x, hi_x, dx = sample_points(in_w, out_w)
    lo_y, hi_y, dy = sample_points(in_h, out_h)
    left = x.index_select(3, lo_x)
    right = x.index_select(3, hi_x)
    rows = left + (right - left) * dx  # (B, C, H_in, W_out)
    top = rows.index_select(2, lo_y)
    bottom = rows.index_select(2, hi_y)
    return top + (bottom - top) * dy.view(-1, 1)  # (B, C, H_out, W_out)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3 or 1, H, W) -> float32 (B, 3, 299, 299) in [-1, 1), as the TF graph does."""
    if images.dtype != torch.uint8:
        raise ValueError(f"Inception input must be uint8 images, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Inception input must be (B, 3, H, W) or (B, 1, H, W), got "
                         f"{tuple(images.shape)}")
    if images.shape[1] == 1:  # grey -> RGB with R = G = B, as PIL's convert("RGB") does
        images = images.expand(-1, 3, -1, -1)
    x = resize_bilinear_tf1(images.to(torch.float32), (INPUT_SIZE, INPUT_SIZE))
    return (x - PIXEL_OFFSET) / PIXEL_SCALE  # exact: 1 / 128 is a power of two


# --------------------------------------------------------------------------------------------
# Network (attribute names match the state-dict keys of the ported TF weights)
# --------------------------------------------------------------------------------------------

class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU: the graph's `conv` op."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TF's SAME-padded average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """Mixed_5b/5c/5d (35 x 35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_ch: int, pool_ch: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_ch, 64, 1)
        self.branch5x5_1 = ConvBN(in_ch, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_ch, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_ch, pool_ch, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class ReductionB(nn.Module):
    """Mixed_6a: 35 x 35 -> 17 x 17 (stride-2 3x3 | 1x1-3x3-3x3/2 | maxpool/2)."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_ch, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class MixedC(nn.Module):
    """Mixed_6b..6e (17 x 17): factorised 7x7 convolutions (1x7 and 7x1) and an avgpool branch."""

    def __init__(self, in_ch: int, mid_ch: int):
        super().__init__()
        c = mid_ch
        self.branch1x1 = ConvBN(in_ch, 192, 1)
        self.branch7x7_1 = ConvBN(in_ch, c, 1)
        self.branch7x7_2 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_ch, c, 1)
        self.branch7x7dbl_2 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class ReductionD(nn.Module):
    """Mixed_7a: 17 x 17 -> 8 x 8 (1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2)."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_ch, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_ch, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class MixedE(nn.Module):
    """Mixed_7b/7c (8 x 8): split 1x3 / 3x1 branches; `pool` is "avg" (7b) or "max" (7c).

    The TF graph's last block pools with a max pool where the paper (and torchvision) average;
    the FID numbers everyone reports come from that graph, so it is kept.
    """

    def __init__(self, in_ch: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(in_ch, 320, 1)
        self.branch3x3_1 = ConvBN(in_ch, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_ch, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.pool == "avg":
            pooled = _avg_pool_tf(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)


class InceptionOutput(NamedTuple):
    pool: torch.Tensor  # (B, 2048) float32
    logits_unbiased: torch.Tensor  # (B, 1008) float32, fc without bias (Inception Score input)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the TF graph of 2015-12-05; call it on uint8 images (B, 3, H, W).

    Built with PyTorch's default (random) initialisation: load real weights with
    `load_fid_inception`. `identity` names the extractor, its weights and, when `tf32` is on,
    its arithmetic, for cached statistics.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_ch=32)
        self.Mixed_5c = MixedA(256, pool_ch=64)
        self.Mixed_5d = MixedA(288, pool_ch=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, mid_ch=128)
        self.Mixed_6c = MixedC(768, mid_ch=160)
        self.Mixed_6d = MixedC(768, mid_ch=160)
        self.Mixed_6e = MixedC(768, mid_ch=192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, pool="avg")
        self.Mixed_7c = MixedE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)
        self.identity = f"{EXTRACTOR_NAME}/random-init"
        # Strict float32 by default, as the reference implementations compute; `set_tf32`.
        self.tf32 = False
        self.compiled = False  # `compile_frozen`
        # NCHW: bit-identical features to the reference implementations on the CPU, and faster
        # than NHWC in fp32 on an H100 too. `set_memory_format` switches weights and activations.
        self.memory_format = torch.contiguous_format

    @property
    def identity(self) -> str:
        return self._identity + (TF32_SUFFIX if self.tf32 else "")

    @identity.setter
    def identity(self, value: str) -> None:
        self._identity = value

    def set_tf32(self, enabled: bool) -> FIDInceptionV3:
        """Let `extract_features` use TF32 tensor cores (and cuDNN autotuning) on CUDA.

        Faster on Ampere and newer GPUs, but TF32 keeps 10 mantissa bits, so the features
        differ from the float32 reference by far more than float32 rounding. Statistics made
        this way carry a different `identity` and are never mixed with strict ones. CUDA only.
        """
        if enabled and next(self.parameters()).device.type != "cuda":
            raise UserError("TF32 exists only on CUDA GPUs (Ampere and newer); drop --tf32 "
                            "or run Inception on a GPU")
        self.tf32 = bool(enabled)
        return self

    def compile_frozen(self) -> FIDInceptionV3:
        """torch.compile this network in place, its weights frozen in when `extract_features`
        runs it: BatchNorm folds into the convolutions and, on CPUs, convolution weights are
        prepacked for oneDNN (2.4x on a 2-core CPU). Features move by float32 rounding only
        (about 3e-7 relative), not the bit-identical features of the eager network on a CPU,
        so the identity is unchanged. Call it after loading the weights and moving to the
        device; the first batch (and each new batch size) compiles, which takes a minute.
        """
        self.compile()
        self.compiled = True
        return self

    def set_memory_format(self, memory_format: torch.memory_format) -> FIDInceptionV3:
        """Store weights and run activations in `memory_format` (contiguous or channels_last)."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input (B, 3, 299, 299) -> pool features (B, 2048)."""
        x = x.contiguous(memory_format=self.memory_format)
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (B, 768, 17, 17) ... (B, 2048, 8, 8)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, 2048)

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        """uint8 images (B, 3 or 1, H, W) -> InceptionOutput(pool, logits_unbiased)."""
        pool = self.features(preprocess(images))
        return InceptionOutput(pool=pool, logits_unbiased=pool.mm(self.fc.weight.t()))


def randomize_weights_(model: FIDInceptionV3, generator: torch.Generator) -> FIDInceptionV3:
    """Fill `model` with random weights whose activations stay O(1) through all 94 layers.

    For tests and benchmarks where the real weights file is not at hand (oracle comparisons and
    timings need the architecture, not the trained values). He-normal convolutions keep the
    signal's scale through the ReLUs; BatchNorm statistics and affine terms are drawn near the
    identity. PyTorch's default init would shrink activations to denormals by the last blocks.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    / module.in_features ** 0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


# --------------------------------------------------------------------------------------------
# Loading verified weights (finding / downloading / hashing them: ddpmkit.metrics.weights)
# --------------------------------------------------------------------------------------------

def load_inception_state_dict(model: FIDInceptionV3, path: str) -> None:
    """Load a weights file into `model`; a file that does not fit is a UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable / unsafe files
        raise UserError(f"cannot read Inception weights {path!r}: {exc}") from exc
    if not isinstance(state, dict):
        raise UserError(f"Inception weights {path!r} do not hold a state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(f"Inception weights {path!r} do not fit the network: {exc}") from exc
    # BatchNorm's step counter is not a weight; files saved before it existed lack it.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise UserError(f"Inception weights {path!r} do not fit the network: missing "
                        f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")


def extractor_identity(weights_sha256: str) -> str:
    """The name recorded with reference statistics: network, preprocessing and weights."""
    return f"{EXTRACTOR_NAME}/sha256={weights_sha256}"


def load_fid_inception(
    weights_path: str | None = None,
    device: str | torch.device = "cpu",
    *,
    spec: WeightsFile | None = None,
    cache_dir: str | None = None,
    download: bool = True,
    tf32: bool = False,
    compile: bool = False,
) -> FIDInceptionV3:
    """The FID Inception with verified weights, in eval mode, without gradients, on `device`
    (`tf32`: see `FIDInceptionV3.set_tf32`; `compile`: `FIDInceptionV3.compile_frozen`)."""
    path, sha256 = resolve_inception_weights(weights_path, spec=spec, cache_dir=cache_dir,
                                             download=download)
    model = FIDInceptionV3()
    load_inception_state_dict(model, path)
    model.identity = extractor_identity(sha256)
    model = prepare_model(model, device).set_tf32(tf32)
    return model.compile_frozen() if compile else model


def prepare_model(model: FIDInceptionV3, device: str | torch.device,
                  memory_format: torch.memory_format = torch.contiguous_format) -> FIDInceptionV3:
    """eval mode, no gradients, on `device`, in `memory_format` (contiguous by default: on an
    H100 channels_last ran at 1,747 images/s against 2,104 contiguous)."""
    device = torch.device(device)
    model = model.eval().requires_grad_(False).to(device)
    model.set_memory_format(memory_format)
    return model


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _fp32_matmul_precision(tf32: bool) -> Iterator[None]:
    """CUDA float32 matmuls and convolutions in TF32 or full precision inside the block."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:  # older torch
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def tf32_enabled() -> Iterator[None]:
    """TF32 matmuls and convolutions, and cuDNN autotuning, on CUDA inside the block (restored
    afterwards)."""
    saved_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with _fp32_matmul_precision(tf32=True):
            yield
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark


def tf32_disabled() -> contextlib.AbstractContextManager:
    """Full float32 matmuls and convolutions on CUDA inside the block (restored afterwards).

    TF32 keeps 10 mantissa bits; Inception features and the distance matrices would then differ
    from the float32 reference implementations by far more than their own rounding.
    """
    return _fp32_matmul_precision(tf32=False)


class InceptionFeatures(NamedTuple):
    """Features of N images: `pool` (N, 2048) and `logits_unbiased` (N, 1008), float32 numpy."""

    pool: np.ndarray
    logits_unbiased: np.ndarray

    @property
    def num_images(self) -> int:
        return int(self.pool.shape[0])


def extract_features(
    model: FIDInceptionV3,
    batches: Iterable[torch.Tensor],
    progress: bool = False,
    total: int | None = None,
) -> InceptionFeatures:
    """Run `model` over uint8 image batches (B, 3 or 1, H, W); features stay on the CPU.

    The model's device is used; TF32 is off throughout unless the model's `set_tf32` turned it
    on, and a model made with `compile_frozen` runs compiled. `total` (number of batches) only
    sizes the progress bar.
    """
    device = next(model.parameters()).device
    pools: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=total, desc="Inception features", unit="batch")
    arithmetic = tf32_enabled() if model.tf32 else tf32_disabled()
    with arithmetic, inductor_freezing(model.compiled), torch.inference_mode():
        for images in batches:
            out = model(images.to(device, non_blocking=True))
            pools.append(out.pool.float().cpu().numpy())
            logits.append(out.logits_unbiased.float().cpu().numpy())
    if not pools:
        raise ValueError("no images to extract features from")
    return InceptionFeatures(pool=np.concatenate(pools), logits_unbiased=np.concatenate(logits))
