"""Image training end to end on tiny models: dry run, exact resume, DDP, bad input."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, final_state, run_args, same_tensors, write_fake_cifar

from ddpmkit.checkpoints.files import load_checkpoint
from ddpmkit.cli.train import main

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("data"))


def test_dry_run_writes_checkpoint_grid_config_and_log(cifar_root, tmp_path):
    code = main(["--dataset", "cifar10", "--root", str(cifar_root), "--dry-run",
                 "--batch-size", "4", *TINY, *run_args(tmp_path)])
    assert code == 0
    state = final_state(tmp_path)
    assert state["step"] == 1 and state["format_version"] == 1
    assert state["config"]["model"]["hid_channels"] == 32  # typed flag beat the JSON's 128
    assert state["config"]["train"]["lr"] == 2e-4  # from configs/cifar10.json
    assert state["ema"] is not None  # cifar10.json turns EMA on
    grids = list((tmp_path / "images" / "run").glob("*.png"))
    assert len(grids) == 1
    config = json.loads((tmp_path / "chkpts" / "run" / "config.json").read_text())
    assert config["dataset"]["name"] == "cifar10"
    log = [json.loads(line) for line in
           (tmp_path / "chkpts" / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and np.isfinite(log[0]["loss"]) and "img_per_s" in log[0]
    assert {"lr", "grad_norm"} <= set(log[0])


def test_reference_shim_dry_run(cifar_root, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--dataset", "cifar10", "--dry-run",
         "--root", str(cifar_root), "--batch-size", "4", *TINY, *run_args(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert final_state(tmp_path)["step"] == 1


def test_exact_resume_mid_epoch_is_bit_identical(cifar_root, tmp_path):
    # 40 images, batch 8: 5 updates per epoch; 7 updates cross an epoch boundary and the
    # stop at 3 lands mid-epoch.
    # dropout on: the resumed run must also restore the global RNG it draws from
    common = ["--dataset", "cifar10", "--root", str(cifar_root), *TINY, "--batch-size", "8",
              "--num-accum", "2", "--use-ema", "--ema-decay", "0.9", "--drop-rate", "0.1",
              "--num-save-images", "0"]
    assert main([*common, "--max-steps", "7", *run_args(tmp_path, "straight")]) == 0
    assert main([*common, "--max-steps", "3", *run_args(tmp_path, "split")]) == 0
    assert final_state(tmp_path, "split")["step"] == 3
    assert main([*common, "--max-steps", "7", "--resume", *run_args(tmp_path, "split")]) == 0
    straight, resumed = final_state(tmp_path, "straight"), final_state(tmp_path, "split")
    assert straight["step"] == resumed["step"] == 7
    for key in ("model", "ema", "optimizer", "scheduler"):
        same_tensors(straight[key], resumed[key])


def test_resume_without_checkpoint_is_an_error(cifar_root, tmp_path, capsys):
    code = main(["--dataset", "cifar10", "--root", str(cifar_root), "--resume", *TINY,
                 "--batch-size", "4", *run_args(tmp_path)])
    assert code == 2
    assert "no checkpoint found" in capsys.readouterr().err


def test_checkpoint_from_another_config_is_refused(cifar_root, tmp_path, capsys):
    base = ["--dataset", "cifar10", "--root", str(cifar_root), "--batch-size", "4", *TINY,
            *run_args(tmp_path)]
    assert main([*base, "--dry-run"]) == 0
    newest = max((tmp_path / "chkpts" / "run").glob("*.pt"), key=os.path.getmtime)
    code = main([*base, "--resume", "--chkpt-path", str(newest), "--timesteps", "30"])
    assert code == 2
    assert "different config" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "6", "--num-accum", "4"], "divisible"),
    (["--root", "/nonexistent/data"], "not found"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--timesteps", "0"], "--timesteps must be >= 2"),
    (["--ema-decay", "1.5", "--use-ema"], "--ema-decay"),
])
def test_bad_input_is_one_line(cifar_root, tmp_path, capsys, argv, message):
    args = ["--dataset", "cifar10", "--root", str(cifar_root), *TINY, "--batch-size", "4",
            *run_args(tmp_path), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_image_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["--dataset", "folder", "--image-size", "32", "--root", str(tmp_path / "empty"),
                 *TINY, *run_args(tmp_path)])
    assert code == 2
    assert "no images" in capsys.readouterr().err.lower()


def test_nan_loss_stops_and_keeps_last_checkpoint(cifar_root, tmp_path, capsys, monkeypatch):
    from ddpmkit.training.images import ImageTrainer

    base = ["--dataset", "cifar10", "--root", str(cifar_root), "--batch-size", "8",
            "--chkpt-intv", "1", *TINY, *run_args(tmp_path)]
    original = ImageTrainer.compute_loss

    def poisoned(self, x_0):
        loss = original(self, x_0)
        return loss * float("nan") if self.epoch >= 1 else loss

    monkeypatch.setattr(ImageTrainer, "compute_loss", poisoned)
    assert main([*base, "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "loss became nan" in err
    files = sorted(p.name for p in (tmp_path / "chkpts" / "run").glob("*.pt"))
    assert files == ["ddpm_cifar10_1.pt"]
    state = load_checkpoint(str(tmp_path / "chkpts" / "run" / files[0]))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_folder_dataset_on_real_cifar_jpegs(tmp_path):
    tarball = SHARED_DATA / "cifar10" / "cifar10-test-jpg.tar.gz"
    if not tarball.is_file():
        pytest.skip(f"real CIFAR-10 JPEGs are not in {tarball.parent}")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:64]
        tar.extractall(tmp_path / "jpg", members=members, filter="data")
    code = main(["--dataset", "folder", "--image-size", "32", "--root", str(tmp_path / "jpg"),
                 "--batch-size", "16", "--max-steps", "3", *TINY, *run_args(tmp_path)])
    assert code == 0
    state = final_state(tmp_path)
    assert state["step"] == 3 and np.isfinite(state["loss"])


def _torchrun(nproc, argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *argv],
        capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


@pytest.mark.slow
def test_ddp_two_processes_match_one(cifar_root, tmp_path):
    common = ["--dataset", "cifar10", "--root", str(cifar_root), "--batch-size", "8",
              "--num-accum", "2", "--max-steps", "3", "--num-save-images", "0", *TINY,
              "--precision", "fp32"]  # other processes: the conftest pin does not reach them
    # TINY turns dropout off: each process has its own dropout RNG
    single = _torchrun(1, [*common, *run_args(tmp_path, "one")], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    double = _torchrun(2, [*common, *run_args(tmp_path, "two")], tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = final_state(tmp_path, "one"), final_state(tmp_path, "two")
    assert one["step"] == two["step"] == 3
    for k in one["model"]:
        torch.testing.assert_close(one["model"][k], two["model"][k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_rigid_spawn_launch(cifar_root, tmp_path):
    code = main(["--dataset", "cifar10", "--root", str(cifar_root), "--batch-size", "8",
                 "--max-steps", "2", "--distributed", "--rigid-launch", "--num-gpus", "2",
                 "--train-device", "cpu", "--num-save-images", "0", *TINY,
                 *run_args(tmp_path)])
    assert code == 0
    assert final_state(tmp_path)["step"] == 2


def test_fid_during_training_is_logged(cifar_root, tmp_path, monkeypatch):
    """--eval scores EMA samples against the training set with the eval command's code."""
    import dataclasses

    from ddpmkit.metrics import inception as inc
    from ddpmkit.metrics import weights as wts

    model = inc.randomize_weights_(inc.FIDInceptionV3(), torch.Generator().manual_seed(3))
    weights = tmp_path / "inception.pth"
    torch.save(model.state_dict(), weights)
    monkeypatch.setattr(wts, "INCEPTION_WEIGHTS", dataclasses.replace(
        wts.INCEPTION_WEIGHTS, sha256=wts.sha256_of_file(str(weights)),
        num_bytes=weights.stat().st_size))
    code = main(["--dataset", "cifar10", "--root", str(cifar_root), *TINY, "--batch-size", "8",
                 "--epochs", "1", "--num-save-images", "0", "--eval", "--eval-intv", "1",
                 "--eval-total-size", "8", "--eval-batch-size", "4", "--use-ddim",
                 "--subseq-size", "2", "--inception-weights", str(weights),
                 "--precomputed-dir", str(tmp_path / "stats"), *run_args(tmp_path)])
    assert code == 0
    log = [json.loads(line) for line in
           (tmp_path / "chkpts" / "run" / "log.jsonl").read_text().splitlines()]
    scored = [r for r in log if "fid" in r]
    assert len(scored) == 1 and scored[0]["epoch"] == 1
    assert np.isfinite(scored[0]["fid"]) and scored[0]["fid"] > 0
    assert 0 <= scored[0]["precision"] <= 1 and 0 <= scored[0]["recall"] <= 1
    assert list((tmp_path / "stats").glob("*.npz"))  # reference statistics were cached
