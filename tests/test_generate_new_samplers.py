"""`ddpmkit generate` with each newer sampler on a tiny class-conditional UNet with guidance:
PNGs written, the same images whatever the batch size (the SDE samplers' noise is per sample),
the sampler and its timesteps in the manifest, an interrupted folder completed identically."""

import json
import os

import pytest
from test_class_cond_cli import _checkpoint, _generate, _pngs

from ddpmkit.choices import SAMPLERS
from ddpmkit.generation import MANIFEST_NAME

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
