"""Scatter plots and animations."""

import pytest
import torch
from PIL import Image

from ddpmkit.utils.images import PLOT_FRAMES, save_animation
from ddpmkit.utils.plots import save_scatter


def test_scatter_png(tmp_path):
    path = tmp_path / "s.png"
    save_scatter(str(path), torch.randn(100, 2), torch.randn(50, 2), title="t")
    img = Image.open(path)
    assert img.format == "PNG" and img.width > img.height > 100


@pytest.mark.parametrize("ext", ["gif", "webp"])
def test_animation(tmp_path, ext):
    from PIL import features

    if ext == "webp" and not features.check("webp"):
        pytest.skip("PIL built without WebP")
    frames = [Image.new("RGB", (600, 300), (i * 80, 0, 0)) for i in range(3)]
    path = tmp_path / f"a.{ext}"
    save_animation(str(path), frames, PLOT_FRAMES)
    img = Image.open(path)
    assert img.n_frames == 3
    assert img.width == 480  # scaled down


def test_animation_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError):
        save_animation(str(tmp_path / "a.mp4"), [Image.new("RGB", (4, 4))], PLOT_FRAMES)
