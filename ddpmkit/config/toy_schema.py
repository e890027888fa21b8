"""The toy section of the schema: every `train-toy` setting (the reference project's spellings),
its kind, choices, bounds, default and meaning, in one table that imports no torch.

`ToyRunConfig` takes its field defaults from here and `check_toy` checks a toy config against
it: the kinds with the image schema's rules, the bounds with `train-toy`'s messages
(`--lr must be positive, got -0.001`), then the rules that relate several keys.
"""

from __future__ import annotations

import math
from typing import Any

from ddpmkit.choices import (
    ANIMATION_FORMATS,
    BETA_SCHEDULES,
    LOSS_TYPES,
    LOSS_WEIGHTS,
    LR_DECAYS,
    MODEL_MEAN_TYPES,
    MODEL_VAR_TYPES,
    SAMPLERS,
    TOY_DATASETS,
)
from ddpmkit.config.schema import Key, _bool, _choice, _float, _int, _kind_error
from ddpmkit.errors import UserError

# The presets of `--recipe` (their values live with the command: `cli.train_toy.RECIPES`).
TOY_RECIPES = ("reference", "sharp")
# Guidance scale of a class-conditional run's evaluations when none is given.
DEFAULT_TOY_GUIDANCE_SCALE = 1.0

_POSITIVE = dict(low=0, low_open=True)
_AT_LEAST_0 = dict(low=0)
_UNIT = dict(low=0, high=1, high_open=True)  # [0, 1)

TOY_KEYS: dict[str, Key] = {
    # ---- the reference project's settings (names, defaults) ----
    "dataset": _choice("2-D dataset", "gaussian8", TOY_DATASETS),
    "size": _int("number of training points", 100_000, **_POSITIVE),
    "root": Key("str", "root directory of datasets (unused: toy data is generated)",
                "~/datasets"),
    "epochs": _int("total number of training epochs", 100, **_POSITIVE),
    "lr": _float("learning rate", 1e-3, **_POSITIVE),
    "beta1": _float("Adam beta_1", 0.9, **_UNIT),
    "beta2": _float("Adam beta_2", 0.999, **_UNIT),
    "lr_warmup": _int("number of warming-up epochs", 0, **_AT_LEAST_0),
    "batch_size": _int("training batch size", 1000, **_POSITIVE),
    "timesteps": _int("number of diffusion steps T", 100, **_POSITIVE),
    "beta_schedule": _choice("noise schedule", "linear", BETA_SCHEDULES),
    "beta_start": _float("first beta", 0.001),
    "beta_end": _float("last beta", 0.2),
    "model_mean_type": _choice("what the network predicts", "eps", MODEL_MEAN_TYPES),
    "model_var_type": _choice("reverse-process variance", "fixed-large", MODEL_VAR_TYPES),
    "loss_type": _choice("training loss", "mse", LOSS_TYPES),
    "image_dir": Key("str", "folder of the evaluation plots", "./images/train"),
    "chkpt_dir": Key("str", "folder of the checkpoints", "./chkpts"),
    "chkpt_intv": _int("epochs between permanent checkpoints", 100, **_POSITIVE),
    "eval_intv": _int("epochs between evaluations", 10, **_POSITIVE),
    "seed": _int("random seed", 1234),
    "resume": _bool("resume training from a checkpoint", False),
    "device": Key("str", "auto, cpu, cuda or cuda:N", "auto"),
    "mid_features": _int("width of the MLP", 128, **_POSITIVE),
    "num_temporal_layers": _int("time-conditioned layers of the MLP", 3, **_AT_LEAST_0),
    # ---- beyond the reference (defaults keep its behaviour) ----
    "recipe": _choice("preset defaults (typed flags override them)", "reference", TOY_RECIPES),
    "chkpt_path": Key("str", "checkpoint to resume from (null: the newest in chkpt_dir)",
                      nullable=True),
    "overwrite": _bool("replace the saved run of the dataset in chkpt_dir", False),
    "chkpt_every_minutes": _float("minutes between rolling checkpoints (0: off)", 10.0,
                                  **_AT_LEAST_0),
    "lr_decay": _choice("LR decay after warmup", "none", LR_DECAYS),
    "grad_clip": _float("max global gradient norm (0: no clipping)", 0.0, **_AT_LEAST_0),
    "ema_decay": _float("EMA decay of the weights (0: off)", 0.0, **_UNIT),
    "fourier_features": _int("random Fourier features of the input (0: off)", 0,
                             **_AT_LEAST_0),
    "fourier_scale": _float("std of the Fourier frequencies", 1.0),
    "num_eval_samples": _int("points of the final evaluation", 50_000, **_POSITIVE),
    "num_interim_samples": _int("points of each evaluation before the last", 5_000,
                                **_POSITIVE),
    "sampler": _choice("sampler of the evaluations", "ddpm", SAMPLERS),
    "steps": _int("sampling steps of every sampler but ddpm (null: the sampler's own)",
                  nullable=True, **_POSITIVE),
    "eta": _float("DDIM eta", 0.0),
    "animation_format": _choice("format of the animation of the evaluation plots", "gif",
                                (*ANIMATION_FORMATS, "none")),
    "class_cond": _bool("class-conditional on the mixture's mode index", False),
    "class_dropout": _float("probability that a label is replaced by \"no class\"", 0.1,
                            **_UNIT),
    "guidance_scale": _float("guidance scale w of a class-conditional run's evaluations "
                             f"(null: {DEFAULT_TOY_GUIDANCE_SCALE:g} with class_cond)",
                             nullable=True),
    "loss_weight": _choice("weight of the MSE over t", "uniform", LOSS_WEIGHTS),
    "min_snr_gamma": _float("gamma of min-snr", 5.0, **_POSITIVE),
    "zero_terminal_snr": _bool("rescale the betas to zero SNR at t = T-1", False),
    "log_every": _int("steps between JSONL log records", 100, **_POSITIVE),
    "no_progress": _bool("no progress bar", False),
}


def toy_default(name: str) -> Any:
    """The built-in value of toy setting `name` (None: decided at run time, see its doc)."""
    return TOY_KEYS[name].default


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bound_error(key: Key, value: Any) -> str | None:
    """Why `value` is outside the key's choices or bounds, in `train-toy`'s words."""
    if key.choices and value not in key.choices:
        return f"must be one of {', '.join(key.choices)}; got {value!r}"
    if key.high is not None and not key.low <= value < key.high:
        return f"must be in [{key.low:g}, {key.high:g}), got {value}"
    if key.low is not None and (value < key.low or (key.low_open and value == key.low)):
        return f"must be {'positive' if key.low_open else f'>= {key.low:g}'}, got {value}"
    return None


def check_toy(c: dict[str, Any]) -> None:
    """Every value of a toy config of the right kind and in range before anything runs (NaN
    and inf are out of every range); fills in a class-conditional run's guidance scale."""
    for name, key in TOY_KEYS.items():
        value = c[name]
        problem = _kind_error(key, value) or (None if value is None else _bound_error(key, value))
        if problem:
            raise UserError(f"{_flag(name)} {problem}")
    if c["timesteps"] < 2:
        raise UserError("--timesteps must be at least 2")
    if c["batch_size"] > c["size"]:
        raise UserError(f"--batch-size {c['batch_size']} is larger than --size {c['size']}")
    if c["eta"] != 0 and c["sampler"] != "ddim":
        raise UserError(f"--eta applies to ddim only, not to {c['sampler']}")
    _check_classes(c)
    if c["chkpt_path"] and not c["resume"]:
        raise UserError("--chkpt-path names the checkpoint to resume from: add --resume, or "
                        "drop --chkpt-path to start a new run")


def _check_classes(c: dict[str, Any]) -> None:
    """Class conditioning needs labels (the mixtures' modes); guidance needs conditioning."""
    if c["class_cond"] and c["dataset"] == "swissroll":
        raise UserError("--class-cond needs labels, and swissroll has none: use gaussian8 or "
                        "gaussian25 (labels are the mode index)")
    if c["guidance_scale"] is not None:
        if not c["class_cond"]:
            raise UserError("--guidance-scale needs --class-cond (an unconditional model has "
                            "nothing to guide)")
        if not 0 <= c["guidance_scale"] < math.inf:
            raise UserError(f"--guidance-scale must be a finite number >= 0, got "
                            f"{c['guidance_scale']}")
    elif c["class_cond"]:
        c["guidance_scale"] = DEFAULT_TOY_GUIDANCE_SCALE

