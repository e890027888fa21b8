"""Pictures of toy runs: true-vs-generated scatter plots.

Plots use matplotlib's non-interactive Agg canvas (no display needed). Their animations are
`utils.images.save_animation(..., style=PLOT_FRAMES)` of the plot files already on disk, so a
resumed run still animates its whole history.
"""

from __future__ import annotations

import io

import numpy as np

from ddpmkit.utils.io import atomic_write_bytes

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
