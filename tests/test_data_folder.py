"""Image folders of any mode, size and aspect: conversion rules, resize modes, the checked and
cached index, and training / generating / exporting from such folders end to end."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, final_state, one_line_error, run_args
from PIL import Image

from ddpmkit.config.schema import check_value, parse_size, size_hw
from ddpmkit.data import folder as fd
from ddpmkit.data.images import build_dataset
from ddpmkit.errors import UserError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test its own index cache (never the user's)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_mixed_folder(root: Path) -> Path:
    """RGBA, palette, 16-bit, grayscale, CMYK and RGB files of odd sizes, a truncated and an
    empty file."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rgb = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "rgb.png")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (37, 23, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.png")
    Image.fromarray(rng.integers(0, 65536, (19, 41), dtype=np.uint16)).save(root / "deep.png")
    Image.fromarray(rgb[:, :, 0]).save(root / "gray.png")
    Image.fromarray(rgb[:20, :31]).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rgb).save(root / "photo.jpg")
    data = (root / "photo.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    return root


def write_gray_folder(root: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(n):
        gray = rng.integers(0, 256, (20 + i, 17), dtype=np.uint8)
        image = Image.fromarray(gray)
        # Gray content in several modes: L, RGB with R = G = B, 16-bit.
        if i % 3 == 1:
            image = image.convert("RGB")
        elif i % 3 == 2:
            image = Image.fromarray(gray.astype(np.uint16) * 257)
        image.save(root / f"{i}.png")
    return root


# ---- conversion rules ------------------------------------------------------------------------


def test_16_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = np.asarray(fd.to_channels(Image.fromarray(values), 1))
    assert out.tolist() == [[0, 1, 128, 255]]  # round(v * 255 / 65535)
    wide = Image.fromarray(values.astype(np.int32), "I")
    assert np.asarray(fd.to_channels(wide, 1)).tolist() == [[0, 1, 128, 255]]


def test_float_images_are_read_as_unit_range():
    values = np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32)
    out = np.asarray(fd.to_channels(Image.fromarray(values, "F"), 1))
    assert out.tolist() == [[0, 128, 255, 255]]


def test_alpha_is_composited_on_white():
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], dtype=np.uint8)
    out = np.asarray(fd.to_channels(Image.fromarray(rgba, "RGBA"), 3)).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent: the background
    assert out[0, 1].tolist() == [255, 0, 0]  # opaque: the color
    # half-transparent blue over white: 255 (1 - a) + 255 a on blue, 255 (1 - a) elsewhere
    expected = round(255 * (1 - 128 / 255))
    assert abs(out[0, 2, 0] - expected) <= 1 and out[0, 2, 2] == 255
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert np.asarray(fd.to_channels(la, 1)).tolist() == [[255, 0]]


def test_palettes_are_expanded_and_transparency_honoured():
    rgb = np.random.default_rng(2).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=256)
    expected = np.asarray(palette.convert("RGB"))
    assert np.array_equal(np.asarray(fd.to_channels(palette, 3)), expected)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    out = np.asarray(fd.to_channels(palette, 3))
    assert out[0, 0].tolist() == [255, 255, 255]


def test_cmyk_gray_to_rgb_and_rgb_to_luma():
    rgb = np.random.default_rng(3).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert np.array_equal(np.asarray(fd.to_channels(cmyk, 3)), np.asarray(cmyk.convert("RGB")))
    gray = np.asarray(fd.to_channels(Image.fromarray(rgb), 1)).astype(float)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # ITU-R 601-2
    assert np.abs(gray - luma).max() <= 1
    l_image = Image.fromarray(rgb[..., 0])
    out = np.asarray(fd.to_channels(l_image, 3))
    assert (out == rgb[..., :1]).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((2, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # top left, before the rotation
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "r.jpg") as loaded:
        out = np.asarray(fd.to_channels(loaded, 1))
    assert out.shape == (3, 2)  # stood upright: 3 high, 2 wide
    assert out[0, 1] > 200 and out[0, 0] < 50  # top left went to the top right


def test_grayscale_is_decided_by_content():
    assert fd.is_grayscale(Image.fromarray(np.full((2, 2, 3), 7, dtype=np.uint8)))
    color = np.zeros((2, 2, 3), dtype=np.uint8)
    color[0, 0, 0] = 1
    assert not fd.is_grayscale(Image.fromarray(color))
    gray_palette = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).convert("P")
    assert fd.is_grayscale(gray_palette)
    assert fd.is_grayscale(Image.fromarray(np.zeros((2, 2), np.uint16)))


# ---- sizes and resize modes ------------------------------------------------------------------


def test_sizes_parse_and_canonicalize():
    assert parse_size("32") == 32 and parse_size("16,32") == [16, 32]
    assert parse_size("16x32") == [16, 32] and parse_size("8,8") == 8
    for bad in ("0", "1,2,3", "a", "-4,8"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert size_hw(8) == (8, 8) and size_hw([16, 32]) == (16, 32)
    assert check_value("dataset", "resolution", [8, 8], "") == 8
    with pytest.raises(UserError, match="dataset.resolution"):
        check_value("dataset", "resolution", [8, 8, 8], "")


def test_resize_modes():
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))  # 30 high
    for mode in fd.RESIZE_MODES:
        assert fd.ResizeTo(16, 32, mode)(image).size == (32, 16)
    # center-crop: the largest centred 1:2 box (25 x 50, top 2) resized
    expected = image.crop((0, 2, 50, 27)).resize((32, 16), Image.BICUBIC)
    assert np.array_equal(np.asarray(fd.ResizeTo(16, 32)(image)), np.asarray(expected))
    # pad: 30 x 50 fits 16 x 32 as 10 x 16 wide... scaled by min(32/50, 16/30) = 0.533
    padded = np.asarray(fd.ResizeTo(16, 32, "pad")(image))
    assert (padded[:, :2] == fd.PAD_FILL).all() and (padded[:, -2:] == fd.PAD_FILL).all()
    assert padded[:, 8:24].std() > 10
    # square targets: today's behaviour (largest centred square, bicubic resize)
    square = image.crop((10, 0, 40, 30)).resize((8, 8), Image.BICUBIC)
    assert np.array_equal(np.asarray(fd.ResizeTo(8, 8)(image)), np.asarray(square))


# ---- the checked, cached index ---------------------------------------------------------------


def test_index_names_bad_files_and_is_cached(tmp_path, monkeypatch, caplog):
    root = write_mixed_folder(tmp_path / "mixed")
    index = fd.build_index(str(root))
    assert sorted(name for name, _ in index.bad) == ["empty.png", "trunc.jpg"]
    assert dict(index.bad)["empty.png"] == "empty file"
    assert len(index.files) == 7 and not index.all_grayscale
    with caplog.at_level("WARNING"):
        fd.report_bad_files(index, strict=False)
    text = caplog.text
    assert text.count("trunc.jpg") == 1 and text.count("empty.png") == 1
    assert "2 bad file(s) skipped; 7 images used" in text
    with pytest.raises(UserError, match="--strict-images: 2 file"):
        fd.report_bad_files(index, strict=True)

    # A second start decodes nothing; a changed file is checked again.
    calls = []
    real = fd.check_image
    monkeypatch.setattr(fd, "check_image", lambda p: calls.append(p) or real(p))
    assert fd.build_index(str(root)) == index and calls == []
    (root / "trunc.jpg").write_bytes((root / "photo.jpg").read_bytes())
    again = fd.build_index(str(root))
    assert [Path(p).name for p in calls] == ["trunc.jpg"]
    assert len(again.files) == 8 and [n for n, _ in again.bad] == ["empty.png"]


def test_dataset_yields_every_mode_at_the_asked_size(tmp_path):
    root = write_mixed_folder(tmp_path / "mixed")
    dataset = build_dataset("folder", str(root), image_size=[16, 32])
    assert len(dataset) == 7
    for i in range(len(dataset)):
        image, _ = dataset[i]
        assert image.shape == (3, 16, 32) and -1 <= image.min() and image.max() <= 1


def test_a_file_broken_after_the_start_is_one_line(tmp_path):
    root = write_gray_folder(tmp_path / "g", n=2)
    dataset = build_dataset("folder", str(root), image_size=8)
    (root / "1.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"cannot read image .*1\.png"):
        dataset[1]


def test_pinned_files_refuse_missing_and_state_added(tmp_path, caplog):
    root = write_gray_folder(tmp_path / "g", n=4)
    index = fd.build_index(str(root))
    pinned = index.files[:3]
    with caplog.at_level("WARNING"):
        assert fd.pin_files(index, pinned) == pinned
    assert "1 image(s) were added" in caplog.text
    with pytest.raises(UserError, match="missing or no longer decode"):
        fd.pin_files(index, (*pinned, "gone.png"))


# ---- end to end ------------------------------------------------------------------------------


def _train(tmp_path, root, *extra, name="run"):
    from ddpmkit.cli.train import main
    from ddpmkit.config import PACKAGE_CONFIG_DIR

    config = str(Path(PACKAGE_CONFIG_DIR) / "cifar10.json")  # the network comes from TINY
    return main(["--dataset", "folder", "--root", str(root), "--batch-size", "4",
                 "--config-path", config,
                 "--precision", "fp32", *TINY, *run_args(tmp_path, name), *extra])


def _generate(capsys, tmp_path, ckpt, *extra):
    from ddpmkit.cli.generate import main

    code = main(["--chkpt-path", str(ckpt), "--total-size", "2", "--save-dir",
                 str(tmp_path / "samples"), "--sampler", "ddim", "--steps", "2",
                 "--precision", "fp32", "--no-progress", *extra])
    assert code == 0, capsys.readouterr().err
    return sorted((tmp_path / "samples").rglob("*.png"))


def test_mixed_folder_trains_with_the_bad_files_named(tmp_path, capsys, caplog):
    root = write_mixed_folder(tmp_path / "mixed")
    assert _train(tmp_path, root, "--image-size", "16", "--max-steps", "2") == 0
    err = caplog.text
    assert err.count("trunc.jpg") == 1 and err.count("empty.png") == 1  # named once
    assert "2 bad file(s) skipped" in err
    assert "an epoch is 1 updates of 4" in err
    state = final_state(tmp_path)
    assert state["step"] == 2 and state["config"]["dataset"]["channels"] == 3
    listed = (tmp_path / "chkpts" / "run" / "images.txt").read_text().split()
    assert len(listed) == 7 and "trunc.jpg" not in listed
    capsys.readouterr()
    code = _train(tmp_path, root, "--image-size", "16", "--max-steps", "1", "--strict-images",
                  name="strict")
    one_line_error(capsys, code, "--strict-images", "trunc.jpg", "empty.png")


def test_gray_folder_trains_one_channel_and_samples_l_pngs(tmp_path, capsys, caplog):
    root = write_gray_folder(tmp_path / "gray")
    assert _train(tmp_path, root, "--image-size", "8", "--max-steps", "1") == 0
    err = caplog.text
    assert "every image is grayscale" in err and "1 channel(s)" in err
    state = final_state(tmp_path)
    assert state["config"]["dataset"]["channels"] == 1
    assert state["config"]["model"]["in_channels"] == 1
    with Image.open(tmp_path / "images" / "run" / "step1.png") as grid:
        assert grid.mode == "L"
    ckpt = next((tmp_path / "chkpts" / "run").glob("*.pt"))
    for png in _generate(capsys, tmp_path, ckpt):
        with Image.open(png) as im:
            assert im.mode == "L" and im.size == (8, 8)
    # --channels 3 overrides the auto choice
    assert _train(tmp_path, root, "--image-size", "8", "--max-steps", "1", "--channels", "3",
                  name="rgb") == 0
    assert final_state(tmp_path, "rgb")["config"]["model"]["in_channels"] == 3


def test_non_square_trains_samples_and_exports(tmp_path, capsys):
    root = write_mixed_folder(tmp_path / "mixed")
    assert _train(tmp_path, root, "--image-size", "16,32", "--max-steps", "1",
                  "--resize-mode", "pad") == 0
    capsys.readouterr()
    state = final_state(tmp_path)
    assert state["config"]["dataset"]["resolution"] == [16, 32]
    assert state["config"]["dataset"]["resize_mode"] == "pad"
    with Image.open(tmp_path / "images" / "run" / "step1.png") as grid:
        assert grid.height < grid.width  # 2 x 2 samples of 16 x 32 with padding
    ckpt = next((tmp_path / "chkpts" / "run").glob("*.pt"))
    for png in _generate(capsys, tmp_path, ckpt):
        with Image.open(png) as im:
            assert im.size == (32, 16)  # 16 high, 32 wide

    from ddpmkit.cli.export import main as export

    out = tmp_path / "pipe"
    assert export([str(ckpt), str(out), "--format", "diffusers"]) == 0, capsys.readouterr().err
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["sample_size"] == [16, 32]


def test_image_size_the_unet_cannot_take_names_valid_sizes(tmp_path, capsys):
    root = write_gray_folder(tmp_path / "gray", n=4)
    code = _train(tmp_path, root, "--image-size", "7,8", "--max-steps", "1")
    one_line_error(capsys, code, "7x8", "multiples of 2", "nearest valid --image-size: 6,8 or 8,8")


def test_resumed_run_keeps_its_images(tmp_path, caplog):
    root = write_gray_folder(tmp_path / "gray", n=8)
    common = ["--image-size", "8", "--chkpt-every-steps", "1"]
    assert _train(tmp_path, root, *common, "--max-steps", "4", name="straight") == 0
    assert _train(tmp_path, root, *common, "--max-steps", "2", name="split") == 0
    # Added mid-run, and in color: the resumed run neither reads it nor turns to 3 channels.
    Image.fromarray(np.full((8, 8, 3), (200, 0, 0), np.uint8)).save(root / "late.png")
    caplog.clear()
    assert _train(tmp_path, root, *common, "--max-steps", "4", "--resume", name="split") == 0
    assert "1 image(s) were added" in caplog.text
    from helpers import same_tensors

    same_tensors(final_state(tmp_path, "straight")["model"], final_state(tmp_path, "split")["model"])


def _printed(capsys) -> dict:
    """The `name: value` lines eval printed."""
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()
                if ": " in line)


def test_eval_scores_one_channel_non_square_samples(tmp_path, capsys, monkeypatch):
    """bits/dim on the training folder (its channels and size from the checkpoint) and FID of
    the L PNG samples against a reference folder of 16-bit images."""
    from helpers import random_inception_weights

    from ddpmkit.cli.eval import main as eval_main
    from ddpmkit.metrics import weights as wts

    root = write_gray_folder(tmp_path / "gray")
    assert _train(tmp_path, root, "--image-size", "8,16", "--max-steps", "1") == 0
    ckpt = next((tmp_path / "chkpts" / "run").glob("*.pt"))
    samples = _generate(capsys, tmp_path, ckpt, "--total-size", "4")
    assert len(samples) == 4
    capsys.readouterr()
    common = ["--device", "cpu", "--num-workers", "0", "--eval-batch-size", "2"]
    assert eval_main(["--metrics", "bpd", "--chkpt-path", str(ckpt), "--dataset", "folder",
                      "--root", str(root), "--bpd-split", "all", "--eval-total-size", "2",
                      *common]) == 0
    lines = _printed(capsys)
    assert np.isfinite(float(lines["bits/dim"])) and lines["images"] == "2"

    weights, spec = random_inception_weights(tmp_path, seed=3)
    monkeypatch.setattr(wts, "INCEPTION_WEIGHTS", spec)
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(4):
        deep = np.random.default_rng(i).integers(0, 65536, (8, 16), dtype=np.uint16)
        Image.fromarray(deep).save(ref / f"{i}.png")
    assert eval_main(["--metrics", "fid", "--sample-folder", str(samples[0].parent),
                      "--ref-folder", str(ref), "--inception-weights", weights,
                      *common]) == 0, capsys.readouterr().err
    fid = float(_printed(capsys)["FID"])
    assert np.isfinite(fid) and fid > 0
