"""`ddpmkit train-toy` end to end through `main(argv)`: outputs, exact resume, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import one_line_error

from ddpmkit.checkpoints.files import load_checkpoint
from ddpmkit.cli import main as ddpmkit_main
from ddpmkit.cli.train_toy import main

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(tmp_path, *extra, dataset="gaussian8"):
    return ["--dataset", dataset, "--size", "128", "--batch-size", "32", "--timesteps", "10",
            "--mid-features", "16", "--num-temporal-layers", "1", "--eval-intv", "1",
            "--num-eval-samples", "300", "--num-interim-samples", "100", "--chkpt-intv", "1",
            "--log-every", "2", "--no-progress", "--image-dir", str(tmp_path / "img"),
            "--chkpt-dir", str(tmp_path / "ck"), *extra]


def test_train_toy_end_to_end(tmp_path, capsys):
    rc = ddpmkit_main(["train-toy", *tiny_args(tmp_path, "--epochs", "2")])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("[eval] epoch") == 2 and "hist-KL" in out and "modes" in out
    ck, img = tmp_path / "ck", tmp_path / "img" / "gaussian8"
    assert {"ddpm_gaussian8_1.pt", "ddpm_gaussian8_2.pt", "ddpm_gaussian8_config.json",
            "ddpm_gaussian8_log.jsonl"} <= set(os.listdir(ck))
    assert {"epoch_0001.png", "epoch_0002.png", "train.gif", "metrics.json"} <= set(
        os.listdir(img))
    state = load_checkpoint(str(ck / "ddpm_gaussian8_2.pt"))  # weights_only loading
    assert state["epoch"] == 2 and state["step"] == 8
    assert state["config"]["dataset"] == "gaussian8" and state["config"]["mid_features"] == 16
    metrics = json.loads((img / "metrics.json").read_text())
    assert metrics["num_samples"] == 300 and metrics["num_modes"] == 8
    assert 0 <= metrics["high_quality"] <= 1 and metrics["kl"] >= 0
    log = [json.loads(line) for line in open(ck / "ddpm_gaussian8_log.jsonl")]
    assert any("eval" in r for r in log) and any("loss" in r for r in log)


def test_resume_continues_exactly(tmp_path, capsys):
    extra = ("--ema-decay", "0.9", "--lr-warmup", "1", "--eval-intv", "10",
             "--dataset", "swissroll")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(tiny_args(a, "--epochs", "4", *extra)) == 0
    assert main(tiny_args(b, "--epochs", "2", *extra)) == 0
    assert main(tiny_args(b, "--epochs", "4", "--resume", *extra)) == 0
    assert "resumed from" in capsys.readouterr().out
    sa = load_checkpoint(str(a / "ck" / "ddpm_swissroll_4.pt"))
    sb = load_checkpoint(str(b / "ck" / "ddpm_swissroll_4.pt"))
    assert sa["step"] == sb["step"] == 16
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    for key in sa["ema"]["shadow"]:
        assert torch.equal(sa["ema"]["shadow"][key], sb["ema"]["shadow"][key]), key
    for i, st in sa["optimizer"]["state"].items():
        for key in st:
            assert torch.equal(st[key], sb["optimizer"]["state"][i][key])
    assert sa["scheduler"] == sb["scheduler"]
    assert torch.equal(sa["rng"]["trainer"], sb["rng"]["trainer"])


@pytest.mark.parametrize("flags, needle", [
    (["--dataset", "moons"], "--dataset"),
    (["--timesteps", "0"], "--timesteps"),
    (["--timesteps", "-5"], "--timesteps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--model-var-type", "learned"], "learned"),
    (["--timesteps", "ten"], "--timesteps"),
])
def test_bad_flags(tmp_path, capsys, flags, needle):
    one_line_error(capsys, main(tiny_args(tmp_path, "--epochs", "1", *flags)), needle)


def test_resume_without_checkpoint(tmp_path, capsys):
    rc = main(tiny_args(tmp_path, "--epochs", "1", "--resume"))
    one_line_error(capsys, rc, "no checkpoint")


def test_resume_from_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "ddpm_gaussian8_3.pt").write_bytes(b"not a checkpoint at all")
    rc = main(tiny_args(tmp_path, "--epochs", "1", "--resume"))
    one_line_error(capsys, rc, "ddpm_gaussian8_3.pt")


def test_resume_with_other_settings(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "--epochs", "1", "--eval-intv", "5")) == 0
    capsys.readouterr()
    rc = main(tiny_args(tmp_path, "--epochs", "2", "--resume", "--mid-features", "32"))
    one_line_error(capsys, rc, "--mid-features 16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys):
    one_line_error(capsys, main(tiny_args(tmp_path, "--device", "cuda:0")), "CUDA")


def test_recipe_defaults_yield_to_typed_flags():
    from ddpmkit.cli.train_toy import RECIPES, resolve_config

    sharp = resolve_config(["--recipe", "sharp"])
    for key, value in RECIPES["sharp"].items():
        assert sharp[key] == value
    typed = resolve_config(["--recipe", "sharp", "--model-var-type", "fixed-large"])
    assert typed["model_var_type"] == "fixed-large"
    reference = resolve_config([])
    assert reference["model_var_type"] == "fixed-large" and reference["timesteps"] == 100


def test_reference_shim_reports_bad_flags_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "train_toy.py"), "--dataset", "moons"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
