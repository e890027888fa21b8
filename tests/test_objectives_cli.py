"""The objectives through the commands: `train` and `train-toy` take them, store them in the
checkpoint, `generate` rebuilds the diffusion from it, ill-defined settings are one-line errors
that write nothing."""

import os

import pytest
from helpers import TINY, final_state, one_line_error, run_args, write_fake_cifar

from ddpmkit.build import build_diffusion
from ddpmkit.checkpoints.files import load_checkpoint
from ddpmkit.choices import SAMPLERS
from ddpmkit.cli.generate import main as generate_main
from ddpmkit.cli.train import main as train_main
from ddpmkit.cli.train_toy import main as toy_main
from ddpmkit.training.toy import DECODER, load_toy_model

OBJECTIVE = ["--model-mean-type", "v", "--loss-weight", "min-snr", "--min-snr-gamma", "3",
             "--zero-terminal-snr"]
STORED = {"model_mean_type": "v", "loss_weight": "min-snr", "min_snr_gamma": 3.0,
          "zero_terminal_snr": True}


def toy_args(tmp_path, *extra):
    return ["--dataset", "gaussian8", "--size", "128", "--batch-size", "32", "--timesteps", "10",
            "--mid-features", "16", "--num-temporal-layers", "1", "--eval-intv", "1",
            "--num-eval-samples", "200", "--num-interim-samples", "100", "--chkpt-intv", "1",
            "--no-progress", "--image-dir", str(tmp_path / "img"), "--chkpt-dir",
            str(tmp_path / "ck"), "--epochs", "1", *extra]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_train_toy_stores_the_objective_and_samples_with_it(tmp_path, capsys, sampler):
    assert toy_main(toy_args(tmp_path, *OBJECTIVE, "--sampler", sampler)) == 0
    assert "final: hist-KL" in capsys.readouterr().out
    path = str(tmp_path / "ck" / "ddpm_gaussian8_1.pt")
    c = load_checkpoint(path)["config"]
    assert {k: c[k] for k in STORED} == STORED
    model, c = load_toy_model(path)
    diffusion = build_diffusion(c, DECODER)
    assert (diffusion.model_mean_type, diffusion.loss_weight, diffusion.min_snr_gamma,
            diffusion.alphas_bar[-1]) == ("v", "min-snr", 3.0, 0.0)
    # A checkpoint from before these settings existed builds today's defaults.
    old = {k: v for k, v in c.items() if k not in ("loss_weight", "min_snr_gamma",
                                                    "zero_terminal_snr")}
    before = build_diffusion({**old, "model_mean_type": "eps"}, DECODER)
    assert (before.loss_weight, before.zero_terminal_snr) == ("uniform", False)


@pytest.mark.parametrize("flags, needle", [
    (["--zero-terminal-snr"], "zero terminal SNR"),
    (["--loss-weight", "min-snr", "--loss-type", "kl"], "min-snr"),
    (["--min-snr-gamma", "0"], "--min-snr-gamma"),
    (["--min-snr-gamma", "nan"], "--min-snr-gamma"),
    (["--loss-weight", "snr"], "--loss-weight"),
])
def test_train_toy_refuses_ill_defined_objectives_and_writes_nothing(tmp_path, capsys, flags,
                                                                      needle):
    one_line_error(capsys, toy_main(toy_args(tmp_path, *flags)), needle)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "img").exists()


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("data"))


def _train(cifar_root, tmp_path, *flags):
    return train_main(["--dataset", "cifar10", "--root", str(cifar_root), "--dry-run",
                       "--batch-size", "4", "--precision", "fp32", *TINY, *run_args(tmp_path),
                       *flags])


def test_train_stores_the_objective_and_generate_uses_it_with_every_sampler(cifar_root,
                                                                             tmp_path):
    assert _train(cifar_root, tmp_path, *OBJECTIVE) == 0
    state = final_state(tmp_path)
    assert {k: state["config"]["diffusion"][k] for k in STORED} == STORED
    assert state["step"] == 1
    path = next((tmp_path / "chkpts" / "run").glob("*.pt"))
    for sampler in SAMPLERS:
        out = tmp_path / sampler
        steps = [] if sampler == "ddpm" else ["--steps", "4"]
        code = generate_main(["--chkpt-path", str(path), "--total-size", "2", "--save-dir",
                              str(out), "--sampler", sampler, *steps, "--no-progress"])
        assert code == 0, sampler
        pngs = [n for _, _, names in os.walk(out) for n in names if n.endswith(".png")]
        assert len(pngs) == 2, sampler


@pytest.mark.parametrize("flags, needle", [
    (["--model-mean-type", "eps", "--zero-terminal-snr"], "zero terminal SNR"),
    (["--loss-weight", "min-snr", "--loss-type", "kl", "--model-var-type", "learned"],
     "min-snr"),
    (["--min-snr-gamma", "-1"], "--min-snr-gamma"),
])
def test_train_refuses_ill_defined_objectives_and_writes_nothing(cifar_root, tmp_path, capsys,
                                                                 flags, needle):
    one_line_error(capsys, _train(cifar_root, tmp_path, *flags), needle)
    assert not (tmp_path / "chkpts").exists() and not (tmp_path / "images").exists()


def test_generate_warns_when_the_steps_miss_the_pure_noise_step(cifar_root, tmp_path, caplog):
    """At zero terminal SNR, DDIM's `linear` steps start at t = T - T/S, where the network never
    saw pure noise: said once; `trailing` starts at T-1 and is quiet."""
    assert _train(cifar_root, tmp_path, *OBJECTIVE) == 0
    path = next((tmp_path / "chkpts" / "run").glob("*.pt"))
    T = final_state(tmp_path)["config"]["diffusion"]["timesteps"]
    said = {}
    for spacing in ("linear", "trailing"):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert generate_main(["--chkpt-path", str(path), "--total-size", "1", "--save-dir",
                                  str(tmp_path / spacing), "--sampler", "ddim", "--steps", "4",
                                  "--skip-schedule", spacing, "--no-progress"]) == 0
        said[spacing] = [r.getMessage() for r in caplog.records if "terminal SNR" in r.getMessage()]
    (warning,) = said["linear"]
    assert f"starts at t = {T - T // 4}" in warning and "trailing" in warning
    assert said["trailing"] == []
