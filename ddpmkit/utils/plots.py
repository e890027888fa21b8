"""Pictures of toy runs: true-vs-generated scatter plots and GIF/WebP animations of them.

Plots use matplotlib's non-interactive Agg canvas (no display needed); animations are built
with PIL from images already on disk, so a resumed run still animates its whole history.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ddpmkit.utils.io import atomic_write, atomic_write_bytes

ANIMATION_FORMATS = ("gif", "webp")
# At most this many points per panel: more only slows drawing and saturates the picture.
MAX_PLOT_POINTS = 20_000
PLOT_DPI = 100


def _subsample(points, limit: int) -> np.ndarray:
    x = np.asarray(points.detach().cpu() if hasattr(points, "detach") else points,
                   dtype=np.float64)
    return x[:limit]


def scatter_figure_png(true_points, gen_points, title: str = "",
                       value_range: tuple[tuple[float, float], tuple[float, float]] | None = None,
                       max_points: int = MAX_PLOT_POINTS, size_in: float = 4.0) -> bytes:
    """PNG bytes of two panels, true points (left) and generated points (right), same axes.

    `true_points`, `gen_points`: (N, 2). The first `max_points` of each are drawn.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    true_xy = _subsample(true_points, max_points)
    gen_xy = _subsample(gen_points, max_points)
    if value_range is None:
        lo, hi = true_xy.min(axis=0), true_xy.max(axis=0)
        pad = 0.1 * (hi - lo)
        value_range = ((lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1]))
    fig = Figure(figsize=(2 * size_in, size_in + 0.4), dpi=PLOT_DPI)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, xy, label, color in ((axes[0], true_xy, "true", "tab:gray"),
                                 (axes[1], gen_xy, "generated", "tab:blue")):
        finite = np.isfinite(xy).all(axis=1)
        ax.scatter(xy[finite, 0], xy[finite, 1], s=0.5, alpha=0.5, color=color,
                   rasterized=True, linewidths=0)
        ax.set_xlim(*value_range[0])
        ax.set_ylim(*value_range[1])
        ax.set_aspect("equal")
        ax.set_title(f"{label} ({len(xy):,} points)", fontsize=9)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_scatter(path: str, true_points, gen_points, title: str = "", **kwargs) -> None:
    """Write the true-vs-generated scatter plot to `path` (PNG), atomically."""
    atomic_write_bytes(path, scatter_figure_png(true_points, gen_points, title, **kwargs))


def save_animation(path: str, frames: Sequence[Image.Image | str], duration_ms: int = 400,
                   max_width: int = 480, last_frame_ms: int = 1500) -> None:
    """An animation of `frames` (PIL images or image paths), format from the extension.

    Frames are scaled down to `max_width` pixels; the last frame is held `last_frame_ms`.
    GIF frames share an adaptive palette per frame (scatter plots need only a few colours).
    """
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in ANIMATION_FORMATS:
        raise ValueError(f"animation format must be one of {', '.join(ANIMATION_FORMATS)}, "
                         f"got {path!r}")
    if not frames:
        raise ValueError("no frames to animate")
    images = []
    for frame in frames:
        img = Image.open(frame) if isinstance(frame, str) else frame
        img = img.convert("RGB")
        if img.width > max_width:
            height = round(img.height * max_width / img.width)
            img = img.resize((max_width, height), Image.LANCZOS)
        images.append(img)
    durations = [duration_ms] * (len(images) - 1) + [last_frame_ms]
    if ext == "gif":
        images = [img.quantize(colors=64, method=Image.Quantize.MEDIANCUT) for img in images]
        save_kwargs = {"format": "GIF", "optimize": True, "disposal": 1}
    else:
        from PIL import features

        if not features.check("webp"):
            raise ValueError("this PIL build cannot write WebP; use a .gif animation")
        save_kwargs = {"format": "WEBP", "quality": 70, "method": 4}

    def write(f):
        images[0].save(f, save_all=True, append_images=images[1:], duration=durations, loop=0,
                       **save_kwargs)

    atomic_write(path, write)
