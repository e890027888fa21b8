"""Every flag of the reference project's four scripts is accepted, with its choices."""

import importlib

import pytest

SCHEDULES = {"quad", "linear", "warmup10", "warmup50", "jsd"}
MEAN_TYPES = {"mean", "x_0", "eps"}
VAR_TYPES = {"learned", "fixed-small", "fixed-large"}
LOSSES = {"kl", "mse"}
IMAGE_DATASETS = {"mnist", "cifar10", "celeba", "celebahq"}

# flag -> set of choices the reference offered (None: no fixed choices)
REFERENCE_FLAGS = {
    "train_toy": {
        "--dataset": {"gaussian8", "gaussian25", "swissroll"}, "--size": None, "--root": None,
        "--epochs": None, "--lr": None, "--beta1": None, "--beta2": None, "--lr-warmup": None,
        "--batch-size": None, "--timesteps": None, "--beta-schedule": SCHEDULES,
        "--beta-start": None, "--beta-end": None, "--model-mean-type": MEAN_TYPES,
        "--model-var-type": VAR_TYPES, "--loss-type": LOSSES, "--image-dir": None,
        "--chkpt-dir": None, "--chkpt-intv": None, "--eval-intv": None, "--seed": None,
        "--resume": None, "--device": None, "--mid-features": None,
        "--num-temporal-layers": None,
    },
    "train": {
        "--dataset": IMAGE_DATASETS, "--root": None, "--epochs": None, "--lr": None,
        "--beta1": None, "--beta2": None, "--batch-size": None, "--num-accum": None,
        "--block-size": None, "--timesteps": None, "--beta-schedule": SCHEDULES,
        "--beta-start": None, "--beta-end": None, "--model-mean-type": MEAN_TYPES,
        "--model-var-type": VAR_TYPES, "--loss-type": LOSSES, "--num-workers": None,
        "--train-device": None, "--eval-device": None, "--image-dir": None,
        "--image-intv": None, "--num-save-images": None, "--num-samples": None,
        "--config-dir": None, "--config-path": None, "--chkpt-dir": None,
        "--chkpt-name": None, "--chkpt-intv": None, "--seed": None, "--resume": None,
        "--chkpt-path": None, "--eval": None, "--use-ema": None, "--ema-decay": None,
        "--distributed": None, "--rigid-launch": None, "--num-gpus": None, "--dry-run": None,
        "--eval-total-size": None, "--eval-batch-size": None, "--use-ddim": None,
        "--skip-schedule": None, "--subseq-size": None, "--exp-name": None,
    },
    "generate": {
        "--dataset": IMAGE_DATASETS, "--batch-size": None, "--total-size": None,
        "--config-dir": None, "--config-path": None, "--chkpt-dir": None,
        "--chkpt-path": None, "--save-dir": None, "--device": None, "--use-ema": None,
        "--use-ddim": None, "--eta": None, "--skip-schedule": None, "--subseq-size": None,
        "--suffix": None, "--max-workers": None, "--num-gpus": None,
    },
    "eval": {
        "--root": None, "--dataset": IMAGE_DATASETS, "--model-device": None,
        "--eval-device": None, "--eval-batch-size": None, "--eval-total-size": None,
        "--num-workers": None, "--nhood-size": None, "--row-batch-size": None,
        "--col-batch-size": None, "--device": None, "--eval-dir": None,
        "--precomputed-dir": None, "--metrics": None, "--seed": None, "--folder-name": None,
        "--sample-folder": None,
    },
}


def _options(parser):
    return {opt: action for action in parser._actions for opt in action.option_strings}


@pytest.mark.parametrize("command", sorted(REFERENCE_FLAGS))
def test_reference_flags_accepted(command):
    module = importlib.import_module(f"ddpmkit.cli.{command}")
    options = _options(module.build_parser())
    missing = sorted(set(REFERENCE_FLAGS[command]) - set(options))
    assert not missing, f"{command}: reference flags missing: {missing}"
    for flag, choices in REFERENCE_FLAGS[command].items():
        if choices:
            offered = set(options[flag].choices or ())
            assert choices <= offered, f"{command} {flag}: missing choices {choices - offered}"


@pytest.mark.parametrize("command", sorted(REFERENCE_FLAGS))
def test_help_exits_cleanly(command, capsys):
    module = importlib.import_module(f"ddpmkit.cli.{command}")
    with pytest.raises(SystemExit) as info:
        module.build_parser().parse_args(["--help"])
    assert info.value.code == 0
    assert "usage" in capsys.readouterr().out
