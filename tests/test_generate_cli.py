"""`ddpmkit generate` end to end on a tiny UNet: folder layout, uint8 PNGs, exact counts,
batch-size invariance, resuming, grid and animation files, one-line errors."""

import os

import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image

from ddpmkit.checkpoints.files import save_checkpoint
from ddpmkit.cli.generate import main
from ddpmkit.models.loading import build_from_config
from ddpmkit.sampling import MANIFEST_NAME

TINY_CONFIG = tiny_config()


def _random_model(config, seed=0):
    torch.manual_seed(seed)
    model, _ = build_from_config(config)
    with torch.no_grad():
        for p in model.parameters():  # not the near-zero init: outputs must depend on weights
            p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = _random_model(TINY_CONFIG)
    path = tmp_path_factory.mktemp("chkpt") / "ddpm_cifar10.pt"
    save_checkpoint({"model": model.state_dict(), "config": TINY_CONFIG, "step": 1, "epoch": 1},
                    str(path))
    return str(path)


def _run(capsys, *argv):
    code = main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _pngs(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".png"))


def test_layout_count_and_uint8(tmp_path, tiny_checkpoint, capsys):
    code, out, err = _run(capsys, "--chkpt-path", tiny_checkpoint, "--total-size", 5,
                          "--batch-size", 2, "--save-dir", tmp_path, "--suffix", "_tiny",
                          "--sampler", "ddim", "--steps", 4, "--grid", "--animate",
                          "--animate-count", 3)
    assert code == 0, err
    folder = tmp_path / "cifar10_tiny"  # <save-dir>/<dataset><suffix>, as in the reference
    assert _pngs(folder) == [f"{i:06d}.png" for i in range(5)]
    assert sorted(os.listdir(folder)) == sorted(_pngs(folder) + [MANIFEST_NAME])
    for name in _pngs(folder):
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (8, 8)
            pixels = np.asarray(im)
        assert pixels.dtype == np.uint8 and pixels.std() > 0
    with Image.open(tmp_path / "cifar10_tiny_grid.png") as grid:
        assert grid.size == (2 + 3 * 10, 2 + 2 * 10)  # 3 columns, 2 rows, 2-pixel padding
    samples = [np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(3)]
    with Image.open(tmp_path / "cifar10_tiny_denoise.webp") as anim:
        assert anim.n_frames >= 2 and anim.size == (2 + 3 * 10, 2 + 10)
        anim.seek(anim.n_frames - 1)
        last = np.asarray(anim.convert("RGB"))
    # The last frame (x_0 predicted at the final DDIM step) shows the written samples 0..2.
    for i, sample in enumerate(samples):
        assert np.array_equal(last[2:10, 2 + 10 * i:10 + 10 * i], sample)
    assert "5 of 5 samples" in out
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(folder / "000000.png").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_batch_size_and_writer_threads_change_no_image(tmp_path, tiny_checkpoint, capsys):
    common = ["--chkpt-path", tiny_checkpoint, "--total-size", 7, "--sampler", "ddpm"]
    assert _run(capsys, *common, "--batch-size", 7, "--save-dir", tmp_path / "a")[0] == 0
    assert _run(capsys, *common, "--batch-size", 3, "--max-workers", 0,
                "--save-dir", tmp_path / "b")[0] == 0
    a, b = tmp_path / "a" / "cifar10", tmp_path / "b" / "cifar10"
    assert _pngs(a) == _pngs(b) and len(_pngs(a)) == 7
    for name in _pngs(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # A different seed gives different images.
    assert _run(capsys, *common, "--seed", 1, "--save-dir", tmp_path / "c")[0] == 0
    other = tmp_path / "c" / "cifar10" / "000000.png"
    assert other.read_bytes() != (a / "000000.png").read_bytes()


def test_rerun_makes_only_missing_files(tmp_path, tiny_checkpoint, capsys):
    argv = ["--chkpt-path", tiny_checkpoint, "--total-size", 6, "--batch-size", 4,
            "--save-dir", tmp_path, "--sampler", "ddim", "--steps", 3, "--eta", 1.0]
    assert _run(capsys, *argv)[0] == 0
    folder = tmp_path / "cifar10"
    original = {n: (folder / n).read_bytes() for n in _pngs(folder)}
    for name in ("000001.png", "000004.png"):
        os.remove(folder / name)
    # What a run killed mid-write leaves: a hidden temp file, never a half PNG.
    (folder / ".000004.png.abc123.tmp").write_bytes(b"\x89PNG half")
    kept = {n: os.stat(folder / n) for n in _pngs(folder)}

    code, out, _ = _run(capsys, *argv)
    assert code == 0 and "2 new" in out
    assert _pngs(folder) == sorted(original)
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    for name, data in original.items():
        assert (folder / name).read_bytes() == data, name  # stochastic DDIM: same noise again
    for name, st in kept.items():  # untouched: same inode, same modification time
        now = os.stat(folder / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name


def test_rerun_with_other_settings_is_refused(tmp_path, tiny_checkpoint, capsys):
    argv = ["--chkpt-path", tiny_checkpoint, "--total-size", 2, "--save-dir", tmp_path]
    assert _run(capsys, *argv, "--sampler", "dpm-solver++", "--steps", 3)[0] == 0
    code, _, err = _run(capsys, *argv, "--sampler", "dpm-solver++", "--steps", 5)
    assert code == 2 and "other settings (steps: 3 there, 5 now)" in err
    assert len(_pngs(tmp_path / "cifar10")) == 2


def test_reference_layout_file_with_config_path(tmp_path, capsys):
    """A reference-project trainer file (`module.` keys, `ema.shadow`, numpy `fid`, no config)
    takes its architecture from --config-path."""
    import json

    model = _random_model(TINY_CONFIG, seed=3)
    ckpt = tmp_path / "ref.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()},
                "ema": {"decay": 0.999, "shadow": model.state_dict(), "num_updates": 1},
                "epoch": 1, "fid": np.float64(12.5)}, ckpt)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY_CONFIG, "dataset": "cifar10"}))  # reference style
    code, _, err = _run(capsys, "--chkpt-path", ckpt, "--config-path", config, "--use-ema",
                        "--total-size", 2, "--save-dir", tmp_path, "--use-ddim", "--steps", 2)
    assert code == 0, err
    assert _pngs(tmp_path / "cifar10") == ["000000.png", "000001.png"]


def test_grayscale_dataset(tmp_path, capsys):
    config = {**TINY_CONFIG, "dataset": {"name": "mnist", "resolution": 8, "channels": 1},
              "model": {**TINY_CONFIG["model"], "in_channels": 1}}
    path = tmp_path / "m.pt"
    save_checkpoint({"model": _random_model(config).state_dict(), "config": config}, str(path))
    code, _, err = _run(capsys, "--chkpt-path", path, "--total-size", 1, "--save-dir", tmp_path,
                        "--sampler", "dpm-solver++", "--steps", 2, "--precision", "bf16")
    assert code == 0, err
    with Image.open(tmp_path / "mnist" / "000000.png") as im:
        assert im.mode == "L" and im.size == (8, 8)


@pytest.mark.parametrize("argv, message", [
    (["--chkpt-path", "{tmp}/missing.pt"], "does not exist"),
    (["--chkpt-path", "{tmp}/corrupt.pt"], "corrupt or not a PyTorch checkpoint"),
    (["--chkpt-path", "{ckpt}", "--total-size", "0"], "--total-size must be at least 1"),
    (["--chkpt-path", "{ckpt}", "--sampler", "euler"], "invalid choice: 'euler'"),
    (["--chkpt-path", "{ckpt}", "--steps", "5"], "apply to every sampler but ddpm"),
    (["--chkpt-path", "{ckpt}", "--use-ddim", "--steps", "50"], "[1, 10], got 50"),
    (["--chkpt-path", "{ckpt}", "--sampler", "unipc3", "--steps", "2"],
     "order 3 needs at least 3 steps"),
    (["--chkpt-path", "{ckpt}", "--use-ddim", "--eta", "nan"], "--eta must be a finite number"),
    (["--chkpt-path", "{ckpt}", "--guidance-scale", "nan"], "--guidance-scale must be a finite"),
    (["--chkpt-path", "{ckpt}", "--use-ema"], "no EMA weights"),
    (["--chkpt-path", "{ckpt}", "--dataset", "celeba"], "trained on cifar10"),
    (["--chkpt-path", "{ckpt}", "--device", "floppy"], "invalid device"),
    (["--chkpt-path", "{ckpt}", "--device", "cpu", "--cuda-graph"], "--cuda-graph needs a CUDA"),
    (["--chkpt-path", "{ckpt}", "--cuda-graph", "--compile", "reduce-overhead"], "use one of"),
    (["--chkpt-path", "{ckpt}", "--compile", "fastest"], "invalid choice: 'fastest'"),
    (["--dataset", "mnist", "--chkpt-dir", "{tmp}"], "ddpm_mnist.pt nor ddpm_mnist_*.pt"),
    (["--chkpt-path", "{ckpt}", "--sampler", "ddim", "--eta", "nan"],
     "--eta must be a finite number, got nan"),
    (["--chkpt-path", "{ckpt}", "--save-dir", "/proc/x"], "--save-dir /proc/x: cannot create"),
])
def test_bad_input_is_one_line(tmp_path, tiny_checkpoint, capsys, argv, message):
    with open(tiny_checkpoint, "rb") as f:
        (tmp_path / "corrupt.pt").write_bytes(f.read(2000))  # a truncated file
    argv = [a.format(tmp=tmp_path, ckpt=tiny_checkpoint) for a in argv]
    code, _, err = _run(capsys, "--save-dir", tmp_path / "out", "--total-size", 1, *argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "cifar10").exists() or not _pngs(tmp_path / "out" / "cifar10")


def test_checkpoint_found_in_chkpt_dir(tmp_path):
    from ddpmkit.sampling.source import checkpoint_path

    def found():  # what --dataset mnist --chkpt-dir tmp_path finds
        return checkpoint_path("", str(tmp_path), "mnist")

    # the reference's files (no step inside) rank by the number in their name
    for name in ("ddpm_cifar10_99.pt", "ddpm_mnist_10.pt", "ddpm_mnist_9.pt"):
        save_checkpoint({"epoch": 1}, str(tmp_path / name))
    assert found() == str(tmp_path / "ddpm_mnist_10.pt")
    # ours rank by the step stored inside, above files without one, whatever their age
    save_checkpoint({"step": 300}, str(tmp_path / "ddpm_mnist_step300.pt"))
    save_checkpoint({"step": 200}, str(tmp_path / "ddpm_mnist_2.pt"))
    (tmp_path / "ddpm_mnist_50.pt").write_bytes(b"damaged")  # skipped
    os.utime(tmp_path / "ddpm_mnist_step300.pt", (1e9, 1e9))  # the oldest file
    assert found() == str(tmp_path / "ddpm_mnist_step300.pt")
    # what a default `train` writes: <chkpt-dir>/<dataset>/, by the step inside as well
    os.makedirs(tmp_path / "mnist")
    save_checkpoint({"step": 400}, str(tmp_path / "mnist" / "ddpm_mnist_3.pt"))
    save_checkpoint({"step": 100}, str(tmp_path / "mnist" / "ddpm_mnist_1.pt"))
    assert found() == str(tmp_path / "mnist" / "ddpm_mnist_3.pt")
    (tmp_path / "ddpm_mnist.pt").write_bytes(b"x")  # the reference's fixed name wins
    assert found() == str(tmp_path / "ddpm_mnist.pt")


def test_channels_last_gives_the_same_images(tmp_path, tiny_checkpoint, capsys):
    folders = {}
    for flag in ("--no-channels-last", "--channels-last"):
        suffix = "_" + flag.strip("-")
        code, _, err = _run(capsys, "--chkpt-path", tiny_checkpoint, "--total-size", 4,
                            "--batch-size", 4, "--save-dir", tmp_path, "--suffix", suffix,
                            "--sampler", "ddim", "--steps", 4, flag)
        assert code == 0, err
        folders[flag] = tmp_path / f"cifar10{suffix}"
    assert _pngs(folders["--channels-last"]) == _pngs(folders["--no-channels-last"])
    assert len(_pngs(folders["--channels-last"])) == 4
    for name in _pngs(folders["--channels-last"]):
        a = np.asarray(Image.open(folders["--channels-last"] / name), dtype=np.int16)
        b = np.asarray(Image.open(folders["--no-channels-last"] / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # float summation order may move a pixel one level


@pytest.mark.slow
def test_compile_gives_the_eager_images(tmp_path, tiny_checkpoint, capsys):
    """`--compile` (weights frozen in on a CPU) against the eager network, both bf16."""
    folders = {}
    for extra in ([], ["--compile"]):
        suffix = "_compiled" if extra else "_eager"
        code, _, err = _run(capsys, "--chkpt-path", tiny_checkpoint, "--total-size", 4,
                            "--batch-size", 4, "--save-dir", tmp_path, "--suffix", suffix,
                            "--sampler", "ddim", "--steps", 4, "--precision", "bf16", *extra)
        assert code == 0, err
        folders[suffix] = tmp_path / f"cifar10{suffix}"
    names = _pngs(folders["_eager"])
    assert names == _pngs(folders["_compiled"]) and len(names) == 4
    diffs = [np.abs(np.asarray(Image.open(folders["_eager"] / n), dtype=np.int16)
                    - np.asarray(Image.open(folders["_compiled"] / n), dtype=np.int16))
             for n in names]
    # measured: at most 1 level apart, 0.01 on average (float summation order)
    assert max(d.max() for d in diffs) <= 3 and np.mean([d.mean() for d in diffs]) < 0.2
