"""Generation with several processes (torchrun, and the reference's --num-gpus spawn) on CPU:
the same bytes as one process, and a resumed multi-process run only fills the gaps."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from ddpmkit.checkpoints.files import save_checkpoint
from ddpmkit.cli.generate import main
from ddpmkit.models.loading import build_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = tiny_config()
TOTAL = 9  # not a multiple of the process count or the batch size


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, _ = build_from_config(TINY_CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("chkpt") / "tiny.pt"
    save_checkpoint({"model": model.state_dict(), "config": TINY_CONFIG}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def one_process(checkpoint, tmp_path_factory):
    """The reference result: one process, batch 4, DDPM (fresh noise at every step)."""
    save_dir = tmp_path_factory.mktemp("one")
    assert main(["--chkpt-path", checkpoint, "--total-size", str(TOTAL), "--batch-size", "4",
                 "--save-dir", str(save_dir), "--no-progress"]) == 0
    folder = save_dir / "cifar10"
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))
            if n.endswith(".png")}


def _launch(argv, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _torchrun(checkpoint, save_dir, batch_size):
    return _launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "generate.py", "--chkpt-path", checkpoint, "--total-size", str(TOTAL),
                    "--batch-size", str(batch_size), "--save-dir", str(save_dir),
                    "--device", "cpu", "--precision", "fp32", "--no-progress"])


def _pngs(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))
            if n.endswith(".png")}


def test_torchrun_two_processes_match_one(checkpoint, one_process, tmp_path):
    proc = _torchrun(checkpoint, tmp_path, batch_size=2)
    assert proc.returncode == 0, proc.stderr
    assert f"{TOTAL} of {TOTAL} samples" in proc.stdout
    assert proc.stdout.count("samples in") == 1  # only rank 0 reports
    assert _pngs(tmp_path / "cifar10") == one_process  # same names, same bytes


def test_torchrun_resume_fills_only_the_gaps(checkpoint, one_process, tmp_path):
    folder = tmp_path / "cifar10"
    assert main(["--chkpt-path", checkpoint, "--total-size", str(TOTAL), "--batch-size", "3",
                 "--save-dir", str(tmp_path), "--no-progress"]) == 0
    removed = ["000000.png", "000003.png", "000008.png"]  # both ranks lose files
    for name in removed:
        os.remove(folder / name)
    kept = {n: os.stat(folder / n) for n in os.listdir(folder) if n.endswith(".png")}
    proc = _torchrun(checkpoint, tmp_path, batch_size=4)
    assert proc.returncode == 0, proc.stderr
    assert f"{TOTAL} of {TOTAL} samples in {folder}; {len(removed)} new" in proc.stdout
    assert _pngs(folder) == one_process
    for name, st in kept.items():
        now = os.stat(folder / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name


def test_num_gpus_spawn_on_cpu_matches_one(checkpoint, one_process, tmp_path):
    proc = _launch(["generate.py", "--chkpt-path", checkpoint, "--total-size", str(TOTAL),
                    "--batch-size", "5", "--save-dir", str(tmp_path), "--num-gpus", "2",
                    "--device", "cpu", "--precision", "fp32", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert f"{TOTAL} of {TOTAL} samples" in proc.stdout
    assert _pngs(tmp_path / "cifar10") == one_process


def test_num_gpus_spawn_reports_an_error_once(checkpoint, tmp_path):
    assert main(["--chkpt-path", checkpoint, "--total-size", "1", "--save-dir", str(tmp_path),
                 "--no-progress"]) == 0
    proc = _launch(["generate.py", "--chkpt-path", checkpoint, "--total-size", str(TOTAL),
                    "--save-dir", str(tmp_path), "--num-gpus", "2", "--device", "cpu",
                    "--seed", "5", "--no-progress"])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "seed: 0 there, 5 now" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_num_gpus_without_cuda_is_one_line(checkpoint, tmp_path, capsys):
    code = main(["--chkpt-path", checkpoint, "--save-dir", str(tmp_path), "--num-gpus", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        ("error: --num-gpus 2 needs 2 CUDA devices, found 0; pass --device cpu to run 2 CPU "
        "processes instead")]
