"""`ddpmkit eval --metrics bpd`: the variational bound of a checkpoint on a dataset split."""

import json
import pickle

import numpy as np
import pytest
import torch

from ddpmkit.build import build_diffusion
from ddpmkit.cli.eval import main as eval_main
from ddpmkit.cli.train import main as train_main
from ddpmkit.data.images import build_dataset
from ddpmkit.interop.sources import load_model_from_checkpoint
from ddpmkit.metrics.bpd import dataset_bpd

TINY = ["--hid-channels", "32", "--ch-multipliers", "1,2", "--num-res-blocks", "1",
        "--apply-attn", "0,0", "--drop-rate", "0", "--timesteps", "10", "--num-workers", "0",
        "--num-save-images", "0", "--batch-size", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpd")
    folder = root / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0] * 4}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    assert train_main(["--dataset", "cifar10", "--root", str(root / "data"), "--max-steps", "2",
                       "--chkpt-dir", str(root / "c"), "--image-dir", str(root / "i"),
                       *TINY]) == 0
    chkpt = next((root / "c" / "cifar10").glob("*.pt"))
    return root, chkpt


def test_bpd_cli_matches_the_library_and_is_plausible(trained, capsys):
    root, chkpt = trained
    argv = ["--metrics", "bpd", "--chkpt-path", str(chkpt), "--dataset", "cifar10",
            "--root", str(root / "data"), "--eval-batch-size", "2", "--num-workers", "0",
            "--device", "cpu", "--seed", "7"]
    assert eval_main(argv) == 0
    out = capsys.readouterr().out
    record = json.loads((chkpt.parent / "metrics.jsonl").read_text().splitlines()[-1])
    got = record["metrics"]
    assert got["num_images"] == 4 and "bits/dim:" in out
    # The same bound computed directly from the library, with the same seed.
    model, config = load_model_from_checkpoint(str(chkpt), device="cpu")
    diffusion = build_diffusion(config["diffusion"])
    data = build_dataset("cifar10", str(root / "data"), split="test", random_flip=False)
    images = torch.stack([data[i][0] for i in range(4)])
    expected = dataset_bpd(diffusion, model, [images[:2], images[2:]], torch.device("cpu"),
                           seed=7)
    assert got["bpd"] == pytest.approx(expected.bpd, rel=1e-9)
    # A barely trained model on uniform-noise pixels: more than a bit per dimension, and far
    # from the absurd values a sign or unit error (nats vs bits, sum vs mean) would give.
    assert 1.0 < got["bpd"] < 30.0
    assert got["prior_bpd"] > 0 and got["decoder_bpd"] > 0


def test_bpd_without_checkpoint_is_an_error(capsys):
    assert eval_main(["--metrics", "bpd", "--device", "cpu"]) == 2
    assert "--chkpt-path" in capsys.readouterr().err


def test_bpd_uses_the_ema_weights_when_the_checkpoint_has_them(trained, tmp_path, capsys):
    root, chkpt = trained
    ckpt = torch.load(chkpt, map_location="cpu", weights_only=True)
    # after 2 updates the EMA is still nearly the initial weights: move it clearly away
    shadow = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
              for k, v in ckpt["model"].items()}
    ckpt["ema"] = {"decay": 0.999, "num_updates": 2, "shadow": shadow, "warmup": False}
    path = tmp_path / "with_ema.pt"
    torch.save(ckpt, path)

    def bpd(*flags):
        argv = ["--metrics", "bpd", "--chkpt-path", str(path), "--dataset", "cifar10",
                "--root", str(root / "data"), "--eval-batch-size", "4", "--num-workers", "0",
                "--device", "cpu", *flags]
        assert eval_main(argv) == 0
        capsys.readouterr()
        return json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["metrics"]

    default, ema, raw = bpd(), bpd("--use-ema"), bpd("--no-ema")
    assert default == ema and default["bpd"] != raw["bpd"]
    assert eval_main(["--metrics", "bpd", "--chkpt-path", str(path), "--use-ema",
                      "--no-ema"]) == 2
    assert "contradict" in capsys.readouterr().err
