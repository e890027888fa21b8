"""`ddpmkit generate` with each newer sampler on a tiny class-conditional UNet with guidance:
PNGs written, the same images whatever the batch size (the SDE samplers' noise is per sample),
the sampler and its timesteps in the manifest, an interrupted folder completed identically."""

import json
import os

import pytest
from test_class_cond_cli import _checkpoint, _generate, _pngs

from ddpmkit.choices import SAMPLERS
from ddpmkit.sampling import MANIFEST_NAME

NEW_SAMPLERS = SAMPLERS[3:]
STEPS = 3


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck"), num_classes=3)


@pytest.mark.parametrize("name", NEW_SAMPLERS)
def test_each_sampler_writes_the_same_images_at_any_batch_size(tmp_path, conditional_checkpoint,
                                                               capsys, name):
    common = ["--chkpt-path", conditional_checkpoint, "--total-size", 5, "--sampler", name,
              "--steps", STEPS, "--guidance-scale", 2]
    code, _, err = _generate(capsys, *common, "--batch-size", 5, "--save-dir", tmp_path / "a")
    assert code == 0, err
    assert _generate(capsys, *common, "--batch-size", 2, "--save-dir", tmp_path / "b")[0] == 0
    a, b = tmp_path / "a" / "cifar10", tmp_path / "b" / "cifar10"
    assert _pngs(a) == [f"{i:06d}.png" for i in range(5)]
    for png in _pngs(a):
        assert (a / png).read_bytes() == (b / png).read_bytes(), png
    manifest = json.loads((a / MANIFEST_NAME).read_text())
    nfe = 2 * STEPS - 1 if name == "heun" else STEPS
    assert manifest["sampler"] == name and manifest["steps"] == STEPS
    assert len(manifest["timesteps"]) == nfe
    # guidance changes the images
    assert _generate(capsys, *common[:-1], 0, "--save-dir", tmp_path / "c")[0] == 0
    assert (tmp_path / "c" / "cifar10" / "000001.png").read_bytes() != \
        (a / "000001.png").read_bytes()


@pytest.mark.parametrize("name", ["dpm-solver++2m-sde", "euler-ancestral"])
def test_an_interrupted_stochastic_run_is_completed_identically(tmp_path, conditional_checkpoint,
                                                                 capsys, name):
    argv = ["--chkpt-path", conditional_checkpoint, "--total-size", 4, "--batch-size", 3,
            "--sampler", name, "--steps", STEPS, "--save-dir", tmp_path]
    assert _generate(capsys, *argv)[0] == 0
    folder = tmp_path / "cifar10"
    original = {png: (folder / png).read_bytes() for png in _pngs(folder)}
    os.remove(folder / "000002.png")
    code, out, _ = _generate(capsys, *argv)
    assert code == 0 and "1 new" in out
    assert {png: (folder / png).read_bytes() for png in _pngs(folder)} == original
    argv[argv.index(name)] = "unipc2"
    code, _, err = _generate(capsys, *argv)
    assert code == 2 and "other settings" in err


# ---- train-time sample grids --------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    from helpers import write_fake_cifar

    return write_fake_cifar(tmp_path_factory.mktemp("data"))


def test_train_grids_use_the_eval_sampler(cifar_root, tmp_path, monkeypatch):
    from helpers import TINY, run_args

    from ddpmkit.cli.train import main
    from ddpmkit.training import images

    used = []
    real = images.SampleGrid.__init__

    def spy(self, *args, **kwargs):
        used.append((kwargs["sampler_name"], kwargs["steps"]))
        real(self, *args, **kwargs)

    monkeypatch.setattr(images.SampleGrid, "__init__", spy)
    code = main(["--dataset", "cifar10", "--root", str(cifar_root), "--dry-run",
                 "--batch-size", "4", "--sampler", "unipc3", "--subseq-size", "4", *TINY,
                 *run_args(tmp_path)])
    assert code == 0 and used == [("unipc3", 4)]
    assert len(list((tmp_path / "images" / "run").glob("*.png"))) == 1
    config = json.loads((tmp_path / "chkpts" / "run" / "config.json").read_text())
    assert config["eval"]["sampler"] == "unipc3"


def test_train_refuses_use_ddim_with_another_sampler(tmp_path, capsys):
    from helpers import TINY, one_line_error, run_args

    from ddpmkit.cli.train import main

    code = main(["--dataset", "cifar10", "--dry-run", "--use-ddim", "--sampler", "heun", *TINY,
                 *run_args(tmp_path)])
    one_line_error(capsys, code, "--use-ddim (eval.use_ddim) contradicts --sampler heun")


# ---- toy evaluations ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["heun", "dpm-solver++2m-sde"])
def test_train_toy_evaluates_with_the_sampler(tmp_path, capsys, monkeypatch, name):
    from test_class_cond_cli import toy_args

    from ddpmkit.cli import main as ddpmkit_main
    from ddpmkit.training import toy

    built = []
    real = toy.build_sampler
    monkeypatch.setattr(toy, "build_sampler", lambda c, d: built.append(real(c, d)) or built[-1])
    rc = ddpmkit_main(toy_args(tmp_path, "--epochs", "1", "--class-cond", "--guidance-scale",
                               "1", "--sampler", name, "--steps", "4"))
    assert rc == 0 and built and all(s.steps == 4 for s in built)
    assert {type(s).__name__ for s in built} == {"HeunSampler" if name == "heun"
                                                 else "DPMSolverPPSampler"}
    metrics = json.loads((tmp_path / "img" / "gaussian8" / "metrics.json").read_text())
    assert metrics["num_samples"] == 160 and "kl" in metrics
