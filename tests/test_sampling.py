"""`ddpmkit.sampling` without the command line: `run` from a `SampleConfig` or plain values
writes what `ddpmkit generate` writes; the config's checks, and the flags that build it."""

import hashlib

import pytest
import torch
from helpers import randomize_, tiny_config

from ddpmkit.checkpoints.files import save_checkpoint
from ddpmkit.cli.generate import build_parser, flag_name
from ddpmkit.cli.generate import main as generate_main
from ddpmkit.config.sample import DEFAULT_STEPS
from ddpmkit.errors import UserError
from ddpmkit.models.loading import build_from_config, load_model_dict
from ddpmkit.sampling import SampleConfig, SampleSummary, run

SMALL = dict(total_size=3, batch_size=2, sampler="ddim", steps=3, precision="fp32",
             progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny trainer checkpoint whose EMA weights differ from its raw ones."""
    torch.manual_seed(0)
    model, _ = build_from_config(tiny_config())
    raw = {k: v.clone() for k, v in randomize_(model, seed=1).state_dict().items()}
    ema = randomize_(model, seed=2).state_dict()
    path = tmp_path_factory.mktemp("chkpt") / "ddpm_cifar10.pt"
    save_checkpoint({"model": raw, "ema": {"decay": 0.9, "shadow": ema, "num_updates": 1},
                     "config": tiny_config(), "step": 1, "epoch": 1}, str(path))
    return str(path)


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*.png"))}


def test_run_from_plain_values_writes_the_commands_pngs(checkpoint, tmp_path, capsys):
    summary = run(checkpoint=checkpoint, save_dir=str(tmp_path / "lib"), **SMALL)
    assert isinstance(summary, SampleSummary)
    assert (summary.present, summary.total, summary.written, summary.exit_code) == (3, 3, 3, 0)
    assert summary.folder == str(tmp_path / "lib" / "cifar10")
    assert generate_main(["--chkpt-path", checkpoint, "--save-dir", str(tmp_path / "cli"),
                          "--total-size", "3", "--batch-size", "3", "--sampler", "ddim",
                          "--steps", "3", "--precision", "fp32", "--no-progress"]) == 0
    assert "3 of 3 samples in" in capsys.readouterr().out
    lib, cli = _hashes(tmp_path / "lib" / "cifar10"), _hashes(tmp_path / "cli" / "cifar10")
    assert len(lib) == 3 and lib == cli
    # a rerun finds everything made: nothing new, same summary
    again = run(SampleConfig(checkpoint=checkpoint, save_dir=str(tmp_path / "lib"), **SMALL))
    assert (again.present, again.written) == (3, 0)


def test_the_weights_are_chosen_once_and_recorded(checkpoint, tmp_path):
    """EMA by default, raw with use_ema=False: different images, and the manifest says which."""
    import json

    for use_ema in (None, False):
        run(checkpoint=checkpoint, save_dir=str(tmp_path), suffix=f"_{use_ema}",
            use_ema=use_ema, **SMALL)
    ema, raw = (tmp_path / "cifar10_None", tmp_path / "cifar10_False")
    assert _hashes(ema) != _hashes(raw)
    assert json.loads((ema / "generation.json").read_text())["use_ema"] is True
    assert json.loads((raw / "generation.json").read_text())["use_ema"] is False
    ckpt = torch.load(checkpoint, weights_only=True)
    assert load_model_dict(ckpt).weights == "ema"
    assert load_model_dict(ckpt, use_ema=False).weights == "model"
    assert load_model_dict(ckpt["model"], tiny_config()).weights == "bare state dict"


@pytest.mark.parametrize("values, message", [
    (dict(total_size=0), "total_size must be at least 1, got 0"),
    (dict(sampler="ddpm", steps=5), "steps apply to every sampler but ddpm"),
    (dict(sampler="ddim", steps=0), "steps must be at least 1, got 0"),
    (dict(sampler="dpm-solver++", eta=0.5), "eta applies to ddim only"),
    (dict(sampler="euler"), "sampler must be one of ddpm"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(class_labels=[" "]), "class_labels needs a class number"),
    (dict(group_norm_eps=0.0), "group_norm_eps must be positive"),
    (dict(compile="fastest"), "compile must be one of default"),
    (dict(totl_size=3), "unknown sample setting 'totl_size'; did you mean 'total_size'?"),
])
def test_bad_values_are_one_line_errors_naming_the_key(values, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("+", r"\+").replace("?", r"\?")):
        run(save_dir=str(tmp_path), **values)
    assert list(tmp_path.iterdir()) == []


def test_every_config_field_has_its_flag():
    """The command line reaches every setting, and its error messages name real flags."""
    options = {o for action in build_parser()._actions for o in action.option_strings}
    for field in SampleConfig.__dataclass_fields__:
        assert set(flag_name(field).split(" / ")) <= options, field
    assert DEFAULT_STEPS == {"ddim": 50, "dpm-solver++": 20}


def test_the_readmes_python_call_names_real_settings():
    import re
    from dataclasses import fields
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (call,) = re.findall(r"`ddpmkit\.sampling\.run\((.*?)\)`", text, flags=re.S)
    keys = re.findall(r"(\w+)=", call)
    assert keys and set(keys) <= {f.name for f in fields(SampleConfig)}
    for name in ("present", "written", "folder"):
        assert name in {f.name for f in fields(SampleSummary)}
