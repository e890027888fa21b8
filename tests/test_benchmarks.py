"""The benchmark scripts run end to end on a tiny config (their numbers are not checked)."""

import json
import os
import sys

import pytest
from helpers import tiny_config

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def bench(one_thread):
    sys.path.insert(0, BENCH)
    yield
    sys.path.remove(BENCH)


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config()))
    return str(path)


def test_train_throughput_runs_every_mode(bench, config_path, capsys):
    import train_throughput

    train_throughput.main(["--config", config_path, "--batch-size", "2", "--steps", "1",
                           "--warmup", "1", "--device", "cpu", "--modes", "fp32", "bf16+cl"])
    out = capsys.readouterr().out
    assert "GFLOP per training image" in out
    assert "bf16+cl" in out and "1.00x" in out


def test_sample_throughput_modes_and_samplers(bench, config_path, capsys):
    import sample_throughput

    assert sample_throughput.main(["--config", config_path, "--batch-size", "2", "--device",
                                   "cpu", "--samplers", "ddim:3", "dpm-solver++:2", "ddpm",
                                   "--ddpm-steps", "2", "--modes", "fp32", "bf16", "overhead",
                                   "--timed-steps", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith(("ddim", "dpm-solver++", "ddpm"))]
    assert len(rows) == 9
    assert {(r[0], r[2]) for r in rows} == {("ddim", "3"), ("dpm-solver++", "2"), ("ddpm", "10")}


def test_benchmark_mode_errors(bench):
    import sample_throughput
    import train_throughput

    with pytest.raises(SystemExit, match="unknown mode"):
        train_throughput.parse_mode("bf16+turbo")
    assert train_throughput.parse_mode("bf16+fused+compile-ro")["compile"] == "reduce-overhead"
    assert sample_throughput.parse_mode("bf16+compile")["compile"] == "default"
    assert sample_throughput.parse_mode("bf16+compile")["freeze"] is None  # generate's default
    assert sample_throughput.parse_mode("bf16+compile+freeze")["freeze"] is True
    assert sample_throughput.parse_mode("bf16+compile+nofreeze")["freeze"] is False
    with pytest.raises(SystemExit, match="CUDA graphs"):
        sample_throughput.main(["--device", "cpu", "--modes", "bf16+graph"])


def test_eval_throughput_runs(bench, capsys):
    import eval_throughput

    assert eval_throughput.main(["--device", "cpu", "--num-images", "2", "--batch-size", "2",
                                 "--pr-size", "50", "--feature-dim", "64",
                                 "--row-batch-size", "16", "--col-batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP per image" in out and "precision/recall" in out and "frechet" in out


def test_profile_step_runs_and_sorts_kernels(bench, config_path, capsys):
    import profile_step

    profile_step.main(["--config", config_path, "--device", "cpu", "--batch-size", "2",
                       "--sample-batch-size", "2", "--rows", "3"])
    out = capsys.readouterr().out
    assert "## training step" in out and "## sampling forward" in out
    kinds = {name: profile_step.kernel_kind(name) for name in (
        "sm90_xmma_fprop_implicit_gemm_bf16", "void cudnn::ops::nchwToNhwcKernel<float>",
        "void at::native::RowwiseMomentsCUDAKernel<float>", "triton_poi_fused_add_silu_0",
        "void at::native::vectorized_elementwise_kernel<4, bfloat16_copy_kernel_cuda>",
        "void pytorch_flash::flash_fwd_kernel", "multi_tensor_apply_kernel<FusedAdam>")}
    assert list(kinds.values()) == ["matmul/conv", "layout", "norm", "elementwise",
                                    "copy/cast", "attention", "optimizer"]


def test_toy_samplers_nfe_counts_heun_honestly(bench, capsys):
    import toy_samplers_nfe

    assert [toy_samplers_nfe.steps_for("heun", n) for n in (5, 10, 20, 50)] == [3, 5, 10, 25]
    assert toy_samplers_nfe.main(["--timesteps", "100", "--train-steps", "2", "--batch-size",
                                  "16", "--num-points", "200", "--samplers", "heun",
                                  "euler-ancestral"]) == 0
    rows = [line.split("|")[1:4] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| heun", "| euler", "| ddpm"))]
    assert [[c.strip() for c in r] for r in rows] == (
        [["ddpm", "100", "100"]] + [["heun", str(2 * s - 1), str(s)] for s in (3, 5, 10, 25)]
        + [["euler-ancestral", str(n), str(n)] for n in (5, 10, 20, 50)])


def test_toy_objectives_compares_at_equal_updates(bench, capsys):
    import toy_objectives

    assert toy_objectives.main(["--updates", "4", "--eval-every", "2", "--batch-size", "16",
                                "--num-points", "200", "--objectives", "eps", "v + min-SNR",
                                "x_0"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "objective" not in line]
    assert [(r[0].strip(), int(r[1])) for r in rows] == [
        (name, step) for name in ("eps", "v + min-SNR", "x_0") for step in (2, 4)]


def test_folder_loading_compares_with_torchvision(bench, tmp_path, capsys):
    import folder_loading
    import numpy as np
    from PIL import Image

    for i in range(4):
        (tmp_path / "imgs" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / "a" /
                                                                    f"{i}.png")
    assert folder_loading.main(["--folder", str(tmp_path / "imgs"), "--image-size", "8",
                                "--workers", "0", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "cached start (stat only)" in out and "| 0 |" in out and "x |" in out


def test_mnist_samplers_table_has_every_sampler_at_each_nfe(bench, tmp_path, capsys):
    import mnist_samplers
    import numpy as np
    import torch
    from helpers import randomize_
    from test_data_images import write_mnist

    from ddpmkit.checkpoints.files import save_checkpoint
    from ddpmkit.choices import SAMPLERS
    from ddpmkit.models.loading import build_from_config

    rng = np.random.default_rng(0)  # a fake MNIST test split for the classifier
    write_mnist(tmp_path / "mnist", "t10k", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
                np.arange(30, dtype=np.uint8) % 10, gz=True)
    config = tiny_config()
    config["dataset"] = {"name": "mnist", "resolution": 32, "channels": 1,
                         "class_names": [str(k) for k in range(10)]}
    config["diffusion"]["timesteps"] = 20
    config["model"].update(in_channels=1, num_classes=10, apply_attn=[False, False])
    torch.manual_seed(0)
    model, _ = build_from_config(config)
    randomize_(model, seed=1)
    path = str(tmp_path / "cond.pt")
    save_checkpoint({"model": model.state_dict(), "config": config, "step": 1, "epoch": 1}, path)

    assert mnist_samplers.main(["--chkpt-path", path, "--root", str(tmp_path), "--num-samples",
                                "3", "--nfe", "4", "6", "--raw-weights",
                                "--precision", "fp32"]) == 0
    rows = [[c.strip() for c in line.split("|")[1:-1]]
            for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "sampler" not in line]
    steps = {"heun": (2, 3)}  # the most steps within the budget: 2 S - 1 <= NFE
    assert [r[:3] for r in rows] == [
        [name, str(s), str(2 * s - 1 if name == "heun" else s)]
        for name in SAMPLERS for s in steps.get(name, (4, 6))]
    assert {r[3] for r in rows} <= {"0.0%", "33.3%", "66.7%", "100.0%"}  # k of 3 samples
