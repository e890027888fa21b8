"""What the default precision costs: `generate --precision fp32` writes a reference-format
checkpoint's PNGs bit for bit on any CPU (pinned hashes), while bf16 autocast changes them.

The fixture is a tiny UNet in the reference project's file layout (`module.` keys, an EMA
shadow, no config) with seeded O(1) weights. Why the hashes hold on any CPU, not just this
one: the float32 images differ from a float64 run of the same sampler by a tiny fraction of a
level (float32 rounding; another CPU's kernels round differently but as finely), and every
pixel lies further than that from a rounding boundary of the 8-bit quantization."""

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers import randomize_, tiny_config

import ddpmkit.generation as generation
from ddpmkit.cli.generate import main as generate_main
from ddpmkit.models.loading import build_from_config

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_IMAGES = 2
SEED = 0
# sha256 of 000000.png, 000001.png written with --precision fp32 (8x8, T = 10: DDPM runs all
# 10 steps), on a Xeon with AVX512 + AVX512_BF16 + AMX, torch 2.14.
# Measured here: float32 drift 1.0e-4 / 1.3e-4 levels, margin 2.2e-3 / 6.2e-3 levels.
PINNED = {
    "ddim-5": ["ac3402d035dc196f697c348206399a50c29c257a6c5f4cf79fdda039997bc637",
               "762fca888fcf6fe94caade8d933ac6114f80e4d3ae33d4b5fdae49ca3b8dcd92"],
    "ddpm": ["8accc823b4b7b400098a99ecd4143ff5212b11f62814114a6f1e8a802c0a4156",
             "c97bc56373858e22baa83360e894f78ab07d36244342bca4bde36d24bf6f1731"],
}
SAMPLER_ARGS = {"ddim-5": ["--sampler", "ddim", "--steps", "5"], "ddpm": ["--sampler", "ddpm"]}


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    config = tiny_config()
    torch.manual_seed(0)
    model, _ = build_from_config(config)
    state = randomize_(model, seed=5).state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()},
                "ema": {"decay": 0.9999, "shadow": state, "num_updates": 1}, "epoch": 1},
               folder / "ddpm_cifar10.pt")
    (folder / "tiny.json").write_text(json.dumps(config))  # 8x8 images
    return folder / "ddpm_cifar10.pt", folder / "tiny.json", model


def _generate(paths, out, sampler, precision, monkeypatch):
    """(sha256 of each PNG, the float images the PNGs were quantized from)."""
    ckpt, config, _ = paths
    seen = []
    to_uint8 = generation.to_uint8

    def spy(x):
        seen.append(x.detach().clone())
        return to_uint8(x)

    monkeypatch.setattr(generation, "to_uint8", spy)
    assert generate_main(["--chkpt-path", str(ckpt), "--config-path", str(config),
                          "--use-ema", "--total-size", str(NUM_IMAGES), "--seed", str(SEED),
                          "--save-dir", str(out), "--precision", precision, "--no-progress",
                          *SAMPLER_ARGS[sampler]]) == 0
    monkeypatch.undo()
    files = sorted((out / "cifar10").glob("*.png"))
    hashes = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    return hashes, torch.cat(seen)


def _float64_images(paths, sampler):
    """The same samples with the network and the sampler in float64."""
    from ddpmkit.build import build_diffusion
    from ddpmkit.diffusion.samplers import make_sampler
    from ddpmkit.models.loading import image_shape

    _, _, model = paths
    config = tiny_config()
    diffusion = build_diffusion(config["diffusion"])
    name, _, steps = sampler.partition("-")
    chosen = make_sampler(diffusion, name, steps=int(steps) if steps else None)
    with torch.no_grad():
        return generation.sample_indexed(diffusion, model.double().eval(), chosen,
                                         range(NUM_IMAGES), image_shape(config), SEED, "cpu",
                                         dtype=torch.float64)


def _levels(x):
    """Images in [-1, 1] as 8-bit levels before rounding (what `quantize` rounds)."""
    return (x.double().clamp(-1, 1) + 1) * 127.5


@pytest.mark.parametrize("sampler", list(SAMPLER_ARGS))
def test_fp32_writes_the_reference_checkpoints_pngs_bit_for_bit(reference_checkpoint, tmp_path,
                                                               sampler, monkeypatch):
    first, images = _generate(reference_checkpoint, tmp_path / "a", sampler, "fp32",
                              monkeypatch)
    second, _ = _generate(reference_checkpoint, tmp_path / "b", sampler, "fp32", monkeypatch)
    assert first == second == PINNED[sampler]
    # Why any CPU writes them: float32 rounding moves no pixel by more than `drift` levels,
    # and every pixel is further than 10x that from a rounding boundary (k + 0.5).
    levels = _levels(images)
    drift = float((levels - _levels(_float64_images(reference_checkpoint, sampler))).abs().max())
    assert drift < 1e-3
    margin = float(((levels - levels.floor()) - 0.5).abs().min())
    assert margin > 10 * drift, (margin, drift)


def test_bf16_changes_the_pngs(reference_checkpoint, tmp_path, monkeypatch):
    """The default on a CPU with native bf16 (and on GPUs) is bf16: same samples up to bf16
    rounding, not the same PNGs (on the reference's CIFAR-10 model: DDIM-5 differs on 7.8% of
    pixels by up to 41 levels)."""
    fp32, a = _generate(reference_checkpoint, tmp_path / "a", "ddim-5", "fp32", monkeypatch)
    bf16, b = _generate(reference_checkpoint, tmp_path / "b", "ddim-5", "bf16", monkeypatch)
    assert fp32 != bf16
    diff = np.abs(generation.to_uint8(a).astype(int) - generation.to_uint8(b).astype(int))
    assert 0 < diff.max() < 64  # the same images, changed in places
