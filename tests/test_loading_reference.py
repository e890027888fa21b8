"""Checkpoint -> model: the reference project's file layouts and key names, our own files, and
clear errors for files that do not fit."""

import ast
import collections
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config

from ddpmkit.checkpoints.files import save_checkpoint
from ddpmkit.config import find_config_file, load_json
from ddpmkit.errors import UserError
from ddpmkit.interop.sources import load_model_from_checkpoint
from ddpmkit.models.loading import (
    build_from_config,
    select_weights,
    strip_prefixes,
)

ROOT = Path(__file__).resolve().parents[1]
KEYS_TSV = ROOT / "tests" / "data" / "reference" / "ddpm-torch-unet-keys-cifar10.tsv"

TINY_CONFIG = tiny_config()


def _reference_keys():
    assert KEYS_TSV.is_file(), f"reference key list {KEYS_TSV} is missing from the repository"
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()
            if line and not line.startswith("#")]
    return [(name, ast.literal_eval(shape)) for name, shape in rows]


@pytest.fixture(scope="module")
def reference_weights():
    """Random tensors with every name and shape of the reference's CIFAR-10 UNet (35.7M)."""
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in _reference_keys()}


@pytest.fixture(scope="module")
def cifar10_config():
    return load_json(find_config_file("cifar10"))


def _assert_same_state(model, expected):
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_reference_trainer_checkpoint_loads_exact_ema_and_model(tmp_path, reference_weights,
                                                                 cifar10_config):
    n_params = sum(t.numel() for t in reference_weights.values())
    assert n_params == 35_746_307  # the figure in the reference key list's header
    ema = {name: t + 1.0 for name, t in reference_weights.items()}
    path = tmp_path / "ddpm_cifar10_2160.pt"
    # Trained with DDP: `module.` on every model key; the EMA shadow without it.
    torch.save({
        "model": {f"module.{k}": v for k, v in reference_weights.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0]}]},
        "scheduler": None,
        "ema": {"decay": 0.9999, "shadow": ema, "num_updates": 10},
        "epoch": 2160,
        "loss": 0.0277,
        "fid": np.float64(3.25),  # the numpy scalar a weights_only load must allow
    }, path)

    model, config = load_model_from_checkpoint(str(path), cifar10_config, use_ema=True)
    _assert_same_state(model, ema)
    assert not model.training
    assert config["model"]["group_norm_eps"] == 1e-5  # the released files' GroupNorm epsilon
    model, _ = load_model_from_checkpoint(str(path), cifar10_config, use_ema=False)
    _assert_same_state(model, reference_weights)


@pytest.mark.parametrize("prefix", ["", "module.", "_model.", "module._model."])
def test_bare_state_dict_with_prefixes(tmp_path, reference_weights, cifar10_config, prefix):
    path = tmp_path / "cifar10_2040.pt"
    torch.save(collections.OrderedDict((prefix + k, v) for k, v in reference_weights.items()),
               path)
    model, _ = load_model_from_checkpoint(str(path), cifar10_config, use_ema=True)
    _assert_same_state(model, reference_weights)


def test_missing_and_extra_keys_are_named(tmp_path, reference_weights, cifar10_config):
    weights = dict(reference_weights)
    del weights["in_conv.weight"], weights["out_conv.2.bias"]
    weights["downsamples.level_9.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save({"model": weights}, path)
    with pytest.raises(UserError) as info:
        load_model_from_checkpoint(str(path), cifar10_config)
    message = str(info.value)
    assert "2 missing key(s)" in message and "in_conv.weight" in message
    assert "out_conv.2.bias" in message
    assert "1 unexpected key(s)" in message and "downsamples.level_9.0.conv1.weight" in message
    assert "\n" not in message


def test_architecture_mismatch_is_explained(tmp_path, reference_weights, cifar10_config):
    """CIFAR-10 weights do not fit the CelebA network (attention at level 2, not 1), nor a
    narrower one."""
    path = tmp_path / "ref.pt"
    torch.save(reference_weights, path)
    with pytest.raises(UserError, match=r"144 missing key\(s\): downsamples\.level_1\.0\.norm1.*"
                                        r"144 unexpected key\(s\): downsamples\.level_1\.0\.0\."):
        load_model_from_checkpoint(str(path), load_json(find_config_file("celeba")))
    narrower = {**cifar10_config, "model": {**cifar10_config["model"], "hid_channels": 64}}
    with pytest.raises(UserError, match=r"shape mismatch\(es\).*embed.0.weight \(512, 128\) "
                                        r"vs \(256, 64\)"):
        load_model_from_checkpoint(str(path), narrower)


def test_tiny_reference_file_without_config_needs_one(tmp_path):
    model, _ = build_from_config(TINY_CONFIG)
    path = tmp_path / "ref_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(UserError, match="carries no config.*--dataset.*--config-path"):
        load_model_from_checkpoint(str(path))
    with pytest.raises(UserError, match="no EMA weights"):
        load_model_from_checkpoint(str(path), TINY_CONFIG, use_ema=True)


def test_own_checkpoint_rebuilds_from_its_config(tmp_path):
    torch.manual_seed(1)
    model, _ = build_from_config(TINY_CONFIG)
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    path = tmp_path / "ours.pt"
    save_checkpoint({"model": model.state_dict(), "ema": {"shadow": ema}, "config": TINY_CONFIG,
                     "step": 3, "epoch": 1}, str(path))
    # A config passed in is only a fallback: the file's own config wins.
    other = {**TINY_CONFIG, "model": {**TINY_CONFIG["model"], "hid_channels": 32}}
    loaded, config = load_model_from_checkpoint(str(path), other, use_ema=True)
    assert config["model"]["hid_channels"] == 16
    _assert_same_state(loaded, ema)


def test_unsafe_objects_are_refused(tmp_path):
    """Only the numpy *scalar* is allow-listed: a numpy array (or any other object) is not."""
    model, _ = build_from_config(TINY_CONFIG)
    path = tmp_path / "unsafe.pt"
    torch.save({"model": model.state_dict(), "fid": np.zeros(3)}, path)
    with pytest.raises(UserError, match="not safe to load"):
        load_model_from_checkpoint(str(path), TINY_CONFIG)


def test_select_weights_and_prefixes():
    w = torch.ones(1)
    assert strip_prefixes({"module._model.a": w, "_orig_mod.b": w}) == {"a": w, "b": w}
    with pytest.raises(UserError, match="both map to"):
        strip_prefixes({"module.a": w, "a": w})
    state, entry = select_weights({"model": {"module.a": w}, "epoch": 1}, use_ema=False)
    assert entry == "model" and list(state) == ["a"]
    with pytest.raises(UserError, match="neither a state dict nor"):
        select_weights({"epoch": 1, "loss": 0.5}, use_ema=False)
    with pytest.raises(UserError, match="cannot find the EMA weights"):
        select_weights({"model": {"a": w}, "ema": {"decay": 0.9}}, use_ema=True)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model_from_checkpoint(os.fspath(tmp_path / "nope.pt"), TINY_CONFIG)


def test_toy_checkpoint_is_refused_clearly(tmp_path):
    path = tmp_path / "toy.pt"
    save_checkpoint({"model": {"in_fc.weight": torch.zeros(128, 2)},
                     "config": {"dataset": "gaussian8", "mid_features": 128}}, str(path))
    with pytest.raises(UserError, match="not an image-model checkpoint"):
        load_model_from_checkpoint(str(path), TINY_CONFIG)
