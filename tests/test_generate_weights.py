"""Which weights `generate` and `eval --metrics bpd` use: the EMA weights whenever the checkpoint
has them (`--no-ema` for the raw ones), and the GroupNorm epsilon of files without a config."""

import json
import logging
import os

import pytest
import torch
from helpers import randomize_, tiny_config

from ddpmkit.checkpoints.files import save_checkpoint
from ddpmkit.cli.generate import main as generate_main
from ddpmkit.models.loading import (
    build_from_config,
    choose_weights,
    model_from_checkpoint_dict,
)
from ddpmkit.sampling import MANIFEST_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

DDIM = ["--sampler", "ddim", "--steps", "3", "--total-size", "3", "--batch-size", "3",
        "--no-progress", "--device", "cpu"]


def _state(seed):
    model, _ = build_from_config(tiny_config())
    return randomize_(model, seed).state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints of one raw and one EMA state, in each layout generate reads."""
    root = tmp_path_factory.mktemp("weights")
    raw, ema = _state(0), _state(1)
    config_path = root / "tiny.json"
    config_path.write_text(json.dumps(tiny_config()))
    paths = {"config": str(config_path)}
    reference = {"model": raw, "ema": {"decay": 0.9999, "shadow": ema, "num_updates": 10},
                 "optimizer": {}, "scheduler": None, "epoch": 3, "loss": 0.1}
    ours = {"model": raw, "ema": {"decay": 0.999, "num_updates": 10, "shadow": ema,
                                  "warmup": False},
            "config": tiny_config(), "step": 10, "epoch": 3}
    for name, ckpt in (("reference", reference), ("ours", ours), ("no_ema", {"model": raw})):
        paths[name] = str(root / f"{name}.pt")
        save_checkpoint(ckpt, paths[name])
    for name, state in (("raw", raw), ("ema", ema)):  # bare state dicts
        paths[name] = str(root / f"{name}.pt")
        torch.save(state, paths[name])
    return paths


def _generate(files, name, save_dir, *flags):
    argv = ["--chkpt-path", files[name], "--save-dir", str(save_dir), *DDIM, *flags]
    if name != "ours":
        argv += ["--config-path", files["config"]]
    code = generate_main(argv)
    folder = save_dir / "cifar10"
    images = {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))
              if n.endswith(".png")} if code == 0 else None
    manifest = json.loads((folder / MANIFEST_NAME).read_text()) if code == 0 else None
    return code, images, manifest


@pytest.mark.parametrize("layout", ["reference", "ours"])
def test_generate_samples_the_ema_weights_by_default(files, layout, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    code, default, manifest = _generate(files, layout, tmp_path / "default")
    assert code == 0 and len(default) == 3
    assert manifest["use_ema"] is True
    assert any("sampling the EMA weights" in r.getMessage() and "--no-ema" in r.getMessage()
               for r in caplog.records)
    _, ema, _ = _generate(files, "ema", tmp_path / "ema")  # the EMA state alone
    assert default == ema
    caplog.clear()
    code, raw_flag, manifest = _generate(files, layout, tmp_path / "no_ema", "--no-ema")
    assert code == 0 and manifest["use_ema"] is False
    said = [r.getMessage() for r in caplog.records if "raw weights" in r.getMessage()]
    assert said and all("holds no EMA weights" not in m and "also holds EMA" in m
                        for m in said), said
    _, raw, _ = _generate(files, "raw", tmp_path / "raw")
    assert raw_flag == raw and raw_flag != default
    _, explicit, _ = _generate(files, layout, tmp_path / "use_ema", "--use-ema")
    assert explicit == default


def test_without_ema_weights_the_raw_ones_are_used(files, tmp_path, capsys):
    code, images, manifest = _generate(files, "no_ema", tmp_path / "a")
    assert code == 0 and manifest["use_ema"] is False
    _, raw, _ = _generate(files, "raw", tmp_path / "raw")
    assert images == raw
    code, _, _ = _generate(files, "no_ema", tmp_path / "b", "--use-ema")
    assert code == 2 and "holds no EMA weights" in capsys.readouterr().err
    code, _, _ = _generate(files, "reference", tmp_path / "c", "--use-ema", "--no-ema")
    assert code == 2 and "contradict" in capsys.readouterr().err


def test_a_folder_of_raw_samples_is_not_resumed_with_ema_weights(files, tmp_path, capsys):
    assert _generate(files, "reference", tmp_path, "--no-ema")[0] == 0
    assert _generate(files, "reference", tmp_path)[0] == 2
    assert "use_ema: False there, True now" in capsys.readouterr().err


def test_choose_weights():
    raw = {"w": torch.zeros(1)}
    trainer = {"model": raw, "ema": {"shadow": raw}}
    assert choose_weights(trainer) == choose_weights(trainer, True) == "ema"
    assert choose_weights(trainer, False) == "model"
    assert choose_weights({"model": raw, "ema": None}) == "model"
    assert choose_weights(raw) == choose_weights(raw, True) == "bare state dict"


# ---- GroupNorm epsilon --------------------------------------------------------------------------
def _eps_sensitive_state():
    """Tiny first-layer weights: the first GroupNorm sees activations of variance ~1e-6, where
    eps 1e-5 and 1e-6 normalize very differently."""
    model, _ = build_from_config(tiny_config())
    randomize_(model, 2)
    with torch.no_grad():
        model.in_conv.weight.mul_(1e-3)
        model.in_conv.bias.mul_(1e-3)
    return model.state_dict()


def _eps_of(model):
    return {m.eps for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}


def test_group_norm_eps_for_files_without_a_config(caplog):
    caplog.set_level(logging.INFO)
    state = _eps_sensitive_state()
    model, config = model_from_checkpoint_dict({"model": state}, tiny_config())
    assert _eps_of(model) == {1e-5}
    assert any("GroupNorm eps 1e-05" in r.getMessage() and "--group-norm-eps 1e-6"
               in r.getMessage() for r in caplog.records)
    model, config = model_from_checkpoint_dict({"model": state}, tiny_config(),
                                               group_norm_eps=1e-6)
    assert _eps_of(model) == {1e-6} and config["model"]["group_norm_eps"] == 1e-6
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        six = model(x, t)
        five = model_from_checkpoint_dict({"model": state}, tiny_config())[0](x, t)
    assert (six - five).abs().max() > 1e-3  # the flag changes the network, not just a number
    # a checkpoint's own config is what it was trained with: the flag is not applied
    own = tiny_config()
    own["model"]["group_norm_eps"] = 1e-6
    caplog.clear()
    model, _ = model_from_checkpoint_dict({"model": state, "config": own}, group_norm_eps=1e-5)
    assert _eps_of(model) == {1e-6}
    assert any("is not used" in r.getMessage() for r in caplog.records)


def test_generate_group_norm_eps_flag(tmp_path, capsys):
    state = _eps_sensitive_state()
    config = tiny_config()
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(config))
    torch.save(state, str(tmp_path / "reference.pt"))
    own = tiny_config()
    own["model"]["group_norm_eps"] = 1e-6
    save_checkpoint({"model": state, "config": own}, str(tmp_path / "ours.pt"))

    def images(name, *flags):
        save = tmp_path / name
        argv = ["--chkpt-path", str(tmp_path / f"{name.split('_')[0]}.pt"), "--save-dir",
                str(save), *DDIM, *flags]
        assert generate_main(argv) == 0, capsys.readouterr().err
        folder = save / "cifar10"
        return [(folder / f"{i:06d}.png").read_bytes() for i in range(3)]

    six = images("reference_6", "--config-path", str(config_path), "--group-norm-eps", "1e-6")
    five = images("reference_5", "--config-path", str(config_path))
    assert six == images("ours")  # the same network as a checkpoint trained with eps 1e-6
    assert six != five
    assert generate_main(["--chkpt-path", str(tmp_path / "reference.pt"), "--group-norm-eps",
                          "0", *DDIM]) == 2
    assert "--group-norm-eps must be positive" in capsys.readouterr().err


# ---- the sampler switches on the command line ---------------------------------------------------
def test_cli_ddim_switches_reach_the_sampler_and_the_manifest(files, tmp_path, capsys):
    flags = ["--skip-schedule", "linspace", "--ddim-eps-from", "model", "--ddim-step-to",
             "stride"]
    code, images, manifest = _generate(files, "ours", tmp_path / "a", *flags)
    assert code == 0
    assert (manifest["ddim_eps_from"], manifest["ddim_step_to"]) == ("model", "stride")
    assert manifest["timesteps"] == [9, 4, 0] and manifest["skip_schedule"] == "linspace"
    _, default, manifest = _generate(files, "ours", tmp_path / "b")
    assert manifest["timesteps"] == [6, 3, 0]  # linear: 0, T / S, 2 T / S, as the reference
    assert (manifest["ddim_eps_from"], manifest["ddim_step_to"]) == ("clipped", "next")
    assert images != default
    code = generate_main(["--chkpt-path", files["ours"], "--sampler", "ddpm",
                          "--ddim-eps-from", "model", "--no-progress"])
    assert code == 2 and "apply to ddim only" in capsys.readouterr().err


def test_eval_bpd_passes_the_weight_flags_to_the_loader(monkeypatch, capsys):
    from ddpmkit.cli import eval as cli_eval
    from ddpmkit.interop import sources

    seen = []

    def fake_loader(path, config, use_ema, device, group_norm_eps=None):
        seen.append((use_ema, group_norm_eps))
        raise sources.UserError("stop here")

    monkeypatch.setattr(sources, "load_model_from_checkpoint", fake_loader)
    base = ["--metrics", "bpd", "--chkpt-path", "x.pt", "--device", "cpu"]
    for flags in ([], ["--no-ema"], ["--use-ema", "--group-norm-eps", "1e-6"]):
        assert cli_eval.main([*base, *flags]) == 2
        assert "stop here" in capsys.readouterr().err
    assert seen == [(None, None), (False, None), (True, 1e-6)]
