"""The frozen run configs (`ddpmkit.config`): their fields are the schema's keys with the
schema's defaults, `to_dict` gives back the resolved dict every checkpoint stores, the one
resolver takes plain values, and nothing there needs torch."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ddpmkit.config import ImageRunConfig, ToyRunConfig, schema
from ddpmkit.config.run import SECTIONS
from ddpmkit.errors import UserError

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


@pytest.mark.parametrize("section", sorted(schema.SCHEMA))
def test_section_fields_are_the_schema_keys_with_its_defaults(section):
    fields = {f.name: f.default for f in dataclasses.fields(SECTIONS[section])}
    assert list(fields) == list(schema.SCHEMA[section])
    for name, key in schema.SCHEMA[section].items():
        assert fields[name] == key.default, f"{section}.{name}"


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("config_*.json")), ids=lambda p: p.stem)
def test_golden_resolved_configs_round_trip(path):
    config = json.loads(path.read_text())["value"]
    frozen = ImageRunConfig.from_dict(config)
    assert frozen.to_dict() == config
    assert json.dumps(frozen.to_dict(), sort_keys=True) == json.dumps(config, sort_keys=True)


def test_replace_makes_a_new_object_and_leaves_the_old_one():
    config = ImageRunConfig()
    chosen = config.replace("train", precision="bf16")
    assert (config.train.precision, chosen.train.precision) == ("auto", "bf16")
    assert chosen.model is config.model
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0


def test_unknown_keys_are_one_line_errors():
    with pytest.raises(UserError, match="learning_rate"):
        ImageRunConfig.from_dict({"train": {"learning_rate": 1e-3}})
    with pytest.raises(UserError, match="lr_max"):
        ToyRunConfig.from_dict({"lr_max": 1.0})


def test_the_resolver_takes_plain_values_and_equals_the_command_line():
    """A dict and the set of options given, no Namespace: the same config as `ddpmkit train`
    with the same flags (facts completed as `train` completes them)."""
    from ddpmkit.cli.train import build_parser, resolve_config
    from ddpmkit.config import parse_with_explicit
    from ddpmkit.config.facts import complete_dataset_facts
    from ddpmkit.config.resolve import resolve_image_run

    argv = ["--dataset", "mnist", "--lr", "1e-3", "--class-cond", "--exp-name", "x"]
    args, typed = parse_with_explicit(build_parser(), argv)
    expected = complete_dataset_facts(resolve_config(args, typed))
    config = resolve_image_run({"dataset": "mnist", "lr": 1e-3, "class_cond": True,
                                "exp_name": "x", "config_dir": "./configs"},
                               {"dataset", "lr", "class_cond"})
    assert isinstance(config, ImageRunConfig)
    assert config.to_dict() == expected
    assert config.train.lr == 1e-3 and config.model.num_classes == 10
    assert config.dataset.class_names == tuple(expected["dataset"]["class_names"])


def test_values_not_given_do_not_override_the_file():
    from ddpmkit.config.resolve import resolve_image_run

    config = resolve_image_run({"dataset": "cifar10", "lr": 5.0}, {"dataset"})
    assert config.train.lr == 2e-4  # configs/cifar10.json's


def test_toy_config_defaults_are_the_command_defaults_and_check_values():
    from ddpmkit.cli.train_toy import resolve_config

    assert ToyRunConfig().to_dict() == resolve_config([])
    assert ToyRunConfig(class_cond=True).guidance_scale == 1.0
    with pytest.raises(UserError, match="--lr must be positive"):
        ToyRunConfig(lr=-1.0)
    with pytest.raises(UserError, match="--guidance-scale needs --class-cond"):
        ToyRunConfig(guidance_scale=2.0)


def test_the_config_package_imports_no_torch():
    script = ("import sys\nimport ddpmkit.config, ddpmkit.config.resolve, ddpmkit.config.facts\n"
              "from ddpmkit.config import ImageRunConfig, ToyRunConfig\n"
              "from ddpmkit.config.sample import SampleConfig\n"
              "ImageRunConfig().to_dict(); ToyRunConfig().to_dict()\n"
              "SampleConfig(total_size=2).check()\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_toy_section_of_the_schema_is_the_toy_config_and_its_flags():
    from ddpmkit.cli.train_toy import RECIPES, build_parser
    from ddpmkit.config.toy_schema import TOY_KEYS, TOY_RECIPES

    fields = {f.name: f.default for f in dataclasses.fields(ToyRunConfig)}
    assert set(fields) == set(TOY_KEYS) | {"device_resolved"}
    assert all(fields[name] == key.default for name, key in TOY_KEYS.items())
    assert tuple(RECIPES) == TOY_RECIPES
    for action in build_parser()._actions:
        if action.dest in TOY_KEYS:
            assert action.default == TOY_KEYS[action.dest].default, action.dest
            if action.choices:
                assert set(action.choices) == set(TOY_KEYS[action.dest].choices), action.dest
    # an open lower bound reads "must be positive": it is 0 wherever one is used
    assert {key.low for key in TOY_KEYS.values() if key.low_open} == {0}


@pytest.mark.parametrize("changes, message", [
    (dict(size=0), "--size must be positive, got 0"),
    (dict(lr=float("nan")), "--lr must be a finite number, got nan"),
    (dict(lr_warmup=-1), "--lr-warmup must be >= 0, got -1"),
    (dict(ema_decay=1.0), "--ema-decay must be in [0, 1), got 1.0"),
    (dict(class_dropout=1.0), "--class-dropout must be in [0, 1), got 1.0"),
    (dict(steps=0), "--steps must be positive, got 0"),
    (dict(timesteps=1), "--timesteps must be at least 2"),
    (dict(epochs=2.5), "--epochs must be an integer, got 2.5"),
    (dict(dataset="moons"), "--dataset must be one of gaussian8, gaussian25, swissroll"),
])
def test_toy_values_are_checked_against_the_schema(changes, message):
    with pytest.raises(UserError) as info:
        ToyRunConfig(**changes)
    assert str(info.value).startswith(message)


def test_a_toy_checkpoint_without_the_newer_keys_gets_what_it_trained_with():
    from ddpmkit.training.toy import ADDED_LATER

    image = schema.defaults()["diffusion"]
    assert {k: v for k, v in ADDED_LATER.items() if k in image} == {
        "loss_weight": "uniform", "min_snr_gamma": 5.0, "zero_terminal_snr": False}
    assert all(image[k] == v for k, v in ADDED_LATER.items() if k in image)


def test_toy_and_image_settings_reach_the_trainer_through_one_mapping(tmp_path):
    from ddpmkit.config import TrainCfg
    from ddpmkit.recipes.common import trainer_options
    from ddpmkit.recipes.toy import train_settings
    from ddpmkit.training.run_folder import RunFolder

    folder = RunFolder(str(tmp_path), "ddpm_x", {})
    toy = ToyRunConfig(lr_warmup=2, grad_clip=0.5, ema_decay=0.0, log_every=7,
                       class_cond=True, class_dropout=0.2).to_dict()
    got = trainer_options(train_settings(toy, batches_per_epoch=30), folder, [], toy, None)
    assert (got["warmup_steps"], got["grad_clip"], got["ema_decay"], got["log_every"],
            got["class_dropout"], got["optimizer"], got["chkpt_prefix"]) == (
        60, 0.5, None, 7, 0.2, "adam", "ddpm_x")
    assert got["callbacks"] == [folder] and got["config"] is toy
    image = TrainCfg(use_ema=True, ema_decay=0.99, warmup=5, grad_norm=1.0, log_intv=3,
                     weight_decay=0.1, class_dropout=0.3)
    got = trainer_options(image, folder, [], {}, None)
    assert (got["warmup_steps"], got["grad_clip"], got["ema_decay"], got["log_every"],
            got["class_dropout"], got["optimizer"]) == (5, 1.0, 0.99, 3, 0.0, "adamw")
