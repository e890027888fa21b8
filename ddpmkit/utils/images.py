"""Image output: [-1, 1] tensors to uint8, atomic PNG files, sample grids, denoising animations.

Shapes: image batches `x` are (B, C, H, W) floats in [-1, 1]; uint8 arrays are (B, H, W, C)
(PIL's layout) with C = 1 (grayscale) or 3 (RGB). Scatter plots for 2-D toy data live in
`ddpmkit.utils.plots`.
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ddpmkit.choices import ANIMATION_FORMATS
from ddpmkit.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

# Hold the final frame of an animation this many times longer than the others.
FINAL_FRAME_HOLD = 10


def quantize(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, C, H, W) on the same device: round((x + 1) * 127.5),
    clamped; NaN becomes gray. uint8 input passes through.

    Rounds to nearest like torchvision's `save_image` (the reference's first release truncated,
    which biases every pixel down by half a level on average). Images made as u / 127.5 - 1
    from uint8 u come back as exactly u.
    """
    if x.dtype == torch.uint8:
        return x
    x = torch.nan_to_num(x.detach().float(), nan=0.0)
    return torch.floor((x + 1) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 numpy (B, H, W, C), PIL's layout (see `quantize`)."""
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    return quantize(x).permute(0, 2, 3, 1).cpu().numpy()


def _pil_image(array: np.ndarray) -> Image.Image:
    """uint8 (H, W, C) -> PIL image (mode L for one channel, RGB for three)."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 (H, W, 1|3), got {array.dtype} {array.shape}")
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], mode="L")
    return Image.fromarray(array, mode="RGB")


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, C) image. Deterministic: same pixels, same bytes."""
    buffer = io.BytesIO()
    _pil_image(array).save(buffer, format="PNG")
    return buffer.getvalue()


def temp_name_prefix(path: str) -> str:
    """Prefix of the temp files `write_file_atomic` makes for `path` (to clean up after a kill)."""
    return "." + os.path.basename(path) + "."


TEMP_SUFFIX = ".tmp"


def write_file_atomic(path: str, data: bytes) -> None:
    """Write `data` to a hidden temp file beside `path`, then rename it to `path`.

    A process killed at any moment leaves either no file or the whole file at `path` (plus at
    worst a hidden `.NAME.*.tmp` that `remove_stale_temp_files` deletes). No fsync: a sample
    folder holds tens of thousands of files that can be regenerated bit for bit; readers treat
    an empty file as missing.
    """
    atomic_write_bytes(path, data, durable=False)


def write_png(path: str, array: np.ndarray) -> None:
    """Encode uint8 (H, W, C) as PNG and write it atomically to `path`."""
    write_file_atomic(path, encode_png(array))


def read_image_uint8(path: str) -> np.ndarray:
    """A PNG/JPEG file as uint8 (H, W, C)."""
    with Image.open(path) as im:
        array = np.asarray(im)
    return array[:, :, None] if array.ndim == 2 else array


def grid_array(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 images (B, H, W, C) into one uint8 (H', W', C) grid, `nrow` images per row
    (default: about sqrt(B)), separated by `padding` black pixels."""
    from torchvision.utils import make_grid

    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty batch (B, H, W, C), got {images.shape}")
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(images)))))
    grid = make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=nrow, padding=padding)
    grid = grid.permute(1, 2, 0).numpy()  # (H', W', 3): make_grid repeats gray to RGB
    return np.ascontiguousarray(grid[:, :, :1] if images.shape[3] == 1 else grid)


def save_grid(path: str, images: np.ndarray, nrow: int | None = None) -> None:
    """Write a sample grid PNG of uint8 images (B, H, W, C)."""
    write_png(path, grid_array(images, nrow))


@dataclass(frozen=True)
class AnimationStyle:
    """How animation frames are shown and encoded: fast, in exact pixels (`SAMPLE_FRAMES`, the
    default), or slow, in small files (`PLOT_FRAMES`: scatter plots need few colours and no
    full resolution)."""

    frame_ms: int = 40
    last_frame_ms: int | None = None  # None: FINAL_FRAME_HOLD frames, so the end can be seen
    max_width: int | None = None     # frames wider than this are scaled down (LANCZOS)
    gif_colors: int | None = None    # GIF: an adaptive palette of this many colours per frame
    webp_quality: int | None = None  # WebP: lossy at this quality (None: lossless)


SAMPLE_FRAMES = AnimationStyle()
PLOT_FRAMES = AnimationStyle(frame_ms=400, last_frame_ms=1500, max_width=480, gif_colors=64,
                             webp_quality=70)


def _frame_image(frame, max_width: int | None) -> Image.Image:
    """A uint8 (H, W, C) array, a PIL image or an image path -> an RGB/L image of at most
    `max_width` pixels across."""
    if isinstance(frame, np.ndarray):
        return _pil_image(frame)
    image = (Image.open(frame) if isinstance(frame, str) else frame).convert("RGB")
    if max_width is not None and image.width > max_width:
        height = round(image.height * max_width / image.width)
        image = image.resize((max_width, height), Image.LANCZOS)
    return image


def save_animation(path: str, frames: Sequence, style: AnimationStyle = SAMPLE_FRAMES) -> None:
    """Write `frames` (uint8 (H, W, C) arrays, PIL images or image paths) as an animated GIF or
    WebP, chosen by `path`'s suffix, atomically, in `style`."""
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    if fmt not in ANIMATION_FORMATS:
        raise ValueError(f"animation file must end in .gif or .webp, got {path!r}")
    if not frames:
        raise ValueError("no frames to animate")
    images = [_frame_image(f, style.max_width) for f in frames]
    last = (style.frame_ms * FINAL_FRAME_HOLD if style.last_frame_ms is None else
            style.last_frame_ms)
    durations = [style.frame_ms] * (len(images) - 1) + [last]
    if fmt == "gif" and style.gif_colors:
        images = [im.quantize(colors=style.gif_colors, method=Image.Quantize.MEDIANCUT)
                  for im in images]
        options = {"optimize": True, "disposal": 1}
    elif fmt == "gif":
        options = {"optimize": False}
    else:
        from PIL import features

        if not features.check("webp"):
            raise ValueError("this PIL build cannot write WebP; use a .gif animation")
        options = ({"lossless": True} if style.webp_quality is None else
                   {"quality": style.webp_quality, "method": 4})
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt.upper(), save_all=True, append_images=images[1:],
                   duration=durations, loop=0, **options)
    write_file_atomic(path, buffer.getvalue())


def frame_steps(num_steps: int, max_frames: int) -> list[int]:
    """At most `max_frames` step indices out of 0..num_steps-1, evenly spread, always with the
    last one (the finished sample)."""
    if num_steps <= 0 or max_frames <= 0:
        return []
    if num_steps <= max_frames:
        return list(range(num_steps))
    picks = np.linspace(0, num_steps - 1, max_frames).round().astype(int)
    return sorted(set(picks.tolist()))


class FrameRecorder:
    """Sampler callback that keeps grid frames of the predicted x_0 (or the current x_t) of the
    first `count` samples at selected steps; pass it as `sample(..., callback=recorder)`.

    target: "x_0" (the network's prediction of the clean image at each step: converges from a
        blur to the sample) or "x_t" (the noisy state itself).
    """

    TARGETS = ("x_0", "x_t")

    def __init__(self, num_steps: int, count: int = 8, target: str = "x_0",
                 max_frames: int = 100, nrow: int | None = None):
        if target not in self.TARGETS:
            raise ValueError(f"unknown animation target {target!r}; choose x_0 or x_t")
        self.count = count
        self.target = target
        self.nrow = nrow or count
        self.keep = set(frame_steps(num_steps, max_frames))
        self.frames: list[np.ndarray] = []

    def __call__(self, info) -> None:
        if info.i not in self.keep:
            return
        x = info.pred_x_0 if self.target == "x_0" else info.x
        self.frames.append(grid_array(to_uint8(x[:self.count].clamp(-1, 1)), nrow=self.nrow))
