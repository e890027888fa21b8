"""Classifier-free guidance on toy data, where quality is exact: samples asked for mode k land on
mode k. Each test trains a small class-conditional network (minutes on a CPU: `slow`)."""

import json

import pytest
import torch

from ddpmkit.cli import main as ddpmkit_main
from ddpmkit.cli.train_toy import resolve_config

# The sharp recipe without EMA (0.999 averages over ~1000 updates, longer than these runs) on
# 20,000 points: 20 updates of 1000 points per epoch.
SHORT_SHARP = ["--recipe", "sharp", "--ema-decay", "0", "--size", "20000", "--eval-intv", "100",
               "--no-progress", "--animation-format", "none"]


@pytest.mark.slow
def test_gaussian8_samples_sit_on_the_requested_mode(tmp_path, capsys):
    """The bar: a short class-conditional gaussian8 run samples with --guidance-scale, and the
    points asked for each mode lie on that mode (within 3 std)."""
    rc = ddpmkit_main(["train-toy", "--dataset", "gaussian8", *SHORT_SHARP, "--epochs", "20",
                       "--class-cond", "--guidance-scale", "2", "--num-eval-samples", "800",
                       "--chkpt-dir", str(tmp_path / "ck"), "--image-dir", str(tmp_path / "img")])
    out = capsys.readouterr().out
    assert rc == 0, out
    metrics = json.loads((tmp_path / "img" / "gaussian8" / "metrics.json").read_text())
    assert metrics["guidance_scale"] == 2 and metrics["modes_covered"] == 8
    assert metrics["on_requested_mode"] >= 0.97  # measured 99.9%
    assert metrics["worst_requested_mode"] >= 0.9  # every mode: measured 99.0% at worst


@pytest.mark.slow
def test_gaussian25_guidance_puts_95_percent_on_the_requested_mode(tmp_path):
    """The README's guidance curve: at least 95% of the points asked for mode k within 3 std of
    mode k (guidance 1; measured 99.6%), and guidance raises that share over w = 0."""
    from ddpmkit.build import build_diffusion
    from ddpmkit.recipes.toy import train_toy
    from ddpmkit.training.toy import DECODER, ToyEvaluation, guidance_curve, load_toy_model

    c = resolve_config(["--dataset", "gaussian25", *SHORT_SHARP, "--epochs", "30",
                        "--class-cond", "--num-eval-samples", "1000",
                        "--chkpt-dir", str(tmp_path / "ck"), "--image-dir", str(tmp_path / "img")])
    assert train_toy(c, report=lambda line: None) == 0
    model, saved = load_toy_model(str(tmp_path / "ck" / "ddpm_gaussian25_30.pt"))
    evaluation = ToyEvaluation(saved, build_diffusion(saved, DECODER), torch.device("cpu"), "")
    plain, guided = guidance_curve(evaluation, model, [0.0, 1.0], 4000)
    assert guided["on_requested_mode"] >= 0.95
    assert guided["worst_requested_mode"] >= 0.9
    assert guided["on_requested_mode"] > plain["on_requested_mode"] + 0.05  # measured 80.9%
    assert guided["modes_covered"] == 25
