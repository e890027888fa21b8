"""The image-training config: every section and key, its type, range, choices, default and
meaning, in one table that imports no torch.

A config file (`configs/<dataset>.json`, `--config-path`) and the flags of `ddpmkit train` are
checked against it before any work starts: unknown keys (with a "did you mean"), wrong types,
non-integers where integers belong, values out of range or not among the choices are one-line
`UserError`s naming the key and the file. The README's key table is
`config.table.markdown_table()`.

The reference project's config files are accepted as they are (`normalize`): a top-level
`"dataset": "cifar10"` string, a `denoise` section for the network, a top-level `seed`, and
`celeba_hq` for `celebahq`. The toy run's keys are the toy section, `config.toy_schema`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ddpmkit.choices import (
    BETA_SCHEDULES,
    COMPILE_MODES,
    IMAGE_DATASETS,
    LOSS_TYPES,
    LOSS_WEIGHTS,
    MODEL_MEAN_TYPES,
    MODEL_VAR_TYPES,
    PRECISIONS,
    RESIZE_MODES,
    SAMPLERS,
    SKIP_SCHEDULES,
)
from ddpmkit.errors import UserError

# Kinds of values. "int" also takes a float with an integer value (1e3 in JSON).
KINDS = ("int", "float", "bool", "str", "int_list", "bool_list", "str_list", "compile", "size")

# What the reference's files call a few things.
DATASET_ALIASES = {"celeba_hq": "celebahq"}


@dataclass(frozen=True)
class Key:
    """One config key. `low`/`high` bound numbers (`*_open`: the bound itself is excluded);
    `nullable`: null is allowed (it means "decide for me", see `doc`); `default` None: no
    built-in value (it comes from the dataset's config file or is decided at run time)."""

    kind: str
    doc: str
    default: Any = None
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False


def _int(doc, default=None, low=None, high=None, nullable=False, low_open=False):
    return Key("int", doc, default, low=low, high=high, low_open=low_open, nullable=nullable)


def _float(doc, default=None, low=None, high=None, low_open=False, high_open=False,
           nullable=False):
    return Key("float", doc, default, low=low, high=high, low_open=low_open,
               high_open=high_open, nullable=nullable)


def _choice(doc, default, choices, nullable=False):
    return Key("str", doc, default, choices=tuple(choices), nullable=nullable)


def _bool(doc, default=None, nullable=False):
    return Key("bool", doc, default, nullable=nullable)


SCHEMA: dict[str, dict[str, Key]] = {
    "dataset": {
        "name": _choice("dataset to train on", "cifar10", IMAGE_DATASETS),
        "root": Key("str", "folder holding the datasets (for `folder`: the image folder)",
                    "~/datasets"),
        "split": Key("str", "split to train on (null: the dataset's training split)",
                     nullable=True),
        "resolution": Key("size", "image size: S for S x S, or [H, W] (null: the dataset's "
                          "own; required for `folder`)", low=1, nullable=True),
        "channels": _int("image channels, 1 or 3 (null: the dataset's own; for `folder`, 1 "
                         "when every image is grayscale, else 3)", low=1, high=3,
                         nullable=True),
        "resize_mode": _choice("how `folder` images reach the image size: largest centred "
                               "crop of its aspect, stretch, or fit with black bars",
                               "center-crop", RESIZE_MODES),
        "strict_images": _bool("refuse a `folder` holding files that cannot be decoded "
                               "(else they are named and skipped)", False),
        "random_flip": _bool("random horizontal flips (null: the dataset's default)",
                             nullable=True),
        "download": _bool("download the dataset when it is missing", False),
        "num_workers": _int("data-loading processes (null: up to 4, no more than the CPUs "
                            "this process may use)", low=0, nullable=True),
        "class_names": Key("str_list", "class names in label order (null: set at run time by "
                           "train.class_cond: the dataset's, or a folder's subfolders)",
                           nullable=True),
    },
    "diffusion": {
        "timesteps": _int("number of diffusion steps T", 1000, low=2),
        "beta_schedule": _choice("noise schedule", "linear", BETA_SCHEDULES),
        "beta_start": _float("first beta (linear, quad, warmup schedules)", 1e-4, low=0,
                             high=1, low_open=True, high_open=True),
        "beta_end": _float("last beta", 0.02, low=0, high=1, low_open=True, high_open=True),
        "model_mean_type": _choice("what the network predicts (v: sqrt(alphas_bar) eps - "
                                   "sqrt(1 - alphas_bar) x_0)", "eps", MODEL_MEAN_TYPES),
        "model_var_type": _choice("reverse-process variance", "fixed-large", MODEL_VAR_TYPES),
        "loss_type": _choice("training loss", "mse", LOSS_TYPES),
        "loss_weight": _choice("weight of the MSE over t: uniform, or min-snr (Hang et al. 2023; "
                               "see the README's objectives)", "uniform", LOSS_WEIGHTS),
        "min_snr_gamma": _float("gamma of min-snr: the SNR above which the weight stops "
                                "growing", 5.0, low=0, low_open=True),
        "zero_terminal_snr": _bool("rescale the betas to zero SNR at t = T-1 (Lin et al. 2024; "
                                   "not with model_mean_type eps: use v)", False),
    },
    "model": {
        "in_channels": _int("image channels the network takes", low=1),
        "hid_channels": _int("base channels", low=1),
        "ch_multipliers": Key("int_list", "channels of each level, as multiples of "
                              "hid_channels", low=1),
        "num_res_blocks": _int("residual blocks per level", low=1),
        "apply_attn": Key("bool_list", "self-attention at each level (one bool per level, or "
                          "one for all)"),
        "drop_rate": _float("dropout in the residual blocks", 0.0, low=0, high=1,
                            high_open=True),
        "group_norm_eps": _float("GroupNorm epsilon", 1e-5, low=0, low_open=True),
        "block_size": _int("pixel-shuffle block size (1: off)", 1, low=1),
        "time_embedding_dim": _int("width of the time embedding (null: 4 x hid_channels)",
                                   low=1, nullable=True),
        "num_groups": _int("GroupNorm groups", 32, low=1),
        "num_classes": _int("classes of a class-conditional network (null: unconditional; "
                            "set from the dataset by train.class_cond)", low=1, nullable=True),
    },
    "train": {
        "epochs": _int("total number of training epochs", 50, low=1),
        "max_steps": _int("stop after this many optimizer updates (null: no limit)", low=1,
                          nullable=True),
        "lr": _float("learning rate", 2e-4, low=0, low_open=True),
        "beta1": _float("Adam beta_1", 0.9, low=0, high=1, high_open=True),
        "beta2": _float("Adam beta_2", 0.999, low=0, high=1, high_open=True),
        "weight_decay": _float("AdamW weight decay (0: plain Adam)", 0.0, low=0),
        "batch_size": _int("global batch: split across processes and accumulation steps",
                           128, low=1),
        "num_accum": _int("micro-batches per optimizer update", 1, low=1),
        "grad_norm": _float("gradient clipping norm (0: off)", 1.0, low=0),
        "warmup": _int("linear LR warmup, in updates", 5000, low=0),
        "use_ema": _bool("keep an exponential moving average of the weights", False),
        "ema_decay": _float("EMA decay", 0.9999, low=0, high=1, high_open=True),
        "image_intv": _int("epochs between sample grids (0: none)", 10, low=0),
        "num_samples": _int("images in each sample grid", 64, low=0),
        "chkpt_intv": _int("epochs between permanent checkpoints (0: none)", 120, low=0),
        "chkpt_every_minutes": _float("minutes between rolling checkpoints of the latest "
                                      "state (0: off)", 30.0, low=0),
        "chkpt_every_steps": _int("updates between rolling checkpoints (0: off)", 0, low=0),
        "log_intv": _int("updates between log.jsonl records", 50, low=1),
        "seed": _int("random seed", 1234),
        "precision": _choice("network precision: bf16 or fp16 autocast (fp16 with loss "
                             "scaling), fp32, or auto (bf16 where the GPU or CPU has it "
                             "natively, fp16 on older GPUs, else fp32)", "auto", PRECISIONS),
        "channels_last": _bool("channels_last memory format (null: off)", nullable=True),
        "compile": Key("compile", "torch.compile the model: a mode (" + ", ".join(COMPILE_MODES)
                       + "), true (default mode) or null/false (off)", nullable=True),
        "class_cond": _bool("train a class-conditional model on the dataset's labels (mnist, "
                            "cifar10; folder: one class per subfolder)", False),
        "class_dropout": _float("probability that a label is replaced by \"no class\" "
                                "(classifier-free guidance)", 0.1, low=0, high=1,
                                high_open=True),
    },
    "eval": {
        "enabled": _bool("compute FID during training", False),
        "intv": _int("epochs between evaluations (null: chkpt_intv)", low=1, nullable=True),
        "total_size": _int("samples per evaluation", 50000, low=1),
        "batch_size": _int("sampling batch size", 256, low=1),
        "use_ddim": _bool("sample with DDIM (else DDPM)", False),
        "sampler": _choice("sampler of the sample grids and FID evaluations (null: ddim with "
                           "use_ddim, else ddpm)", None, SAMPLERS, nullable=True),
        "skip_schedule": _choice("step spacing of DDIM and the solvers", "quadratic",
                                 SKIP_SCHEDULES),
        "subseq_size": _int("DDIM steps (and the other samplers' but ddpm)", 50, low=1),
        "guidance_scale": _float("classifier-free guidance scale w of the sample grids and "
                                 "FID evaluations of a class-conditional run", 1.0, low=0),
    },
}

# Keys of the network that no built-in default can stand for (the config file names them).
MODEL_REQUIRED = ("hid_channels", "ch_multipliers", "num_res_blocks", "apply_attn")

# Top-level entries that are not sections: written by ddpmkit into the resolved config.
RESOLVED_ONLY = ("run", "config_file")


def defaults() -> dict[str, dict[str, Any]]:
    """The built-in value of every key that has one, laid out as sections."""
    return {section: {k: key.default for k, key in keys.items() if key.default is not None}
            for section, keys in SCHEMA.items()}


def section_with_defaults(config: Mapping[str, Any], section: str) -> dict[str, Any]:
    """`config[section]` with the built-in value of every key it lacks (an older config)."""
    return {**defaults()[section], **(config.get(section) or {})}


def normalize(config: Mapping[str, Any]) -> dict[str, Any]:
    """The reference project's file layouts in ddpmkit's: `"dataset": NAME` becomes
    `{"name": NAME}`, a `denoise` section becomes `model`, a top-level `seed` goes to `train`,
    and `celeba_hq` is `celebahq`. Anything else is left for `check` to judge."""
    config = dict(config)
    if isinstance(config.get("dataset"), str):
        config["dataset"] = {"name": config["dataset"]}
    if "denoise" in config and "model" not in config:
        config["model"] = config.pop("denoise")
    if "seed" in config and isinstance(config.get("train", {}), Mapping):
        config["train"] = {"seed": config.pop("seed"), **dict(config.get("train") or {})}
    data = config.get("dataset")
    if isinstance(data, Mapping) and data.get("name") in DATASET_ALIASES:
        config["dataset"] = {**data, "name": DATASET_ALIASES[data["name"]]}
    return config


# Names other projects use for keys of this schema, for "did you mean".
COMMON_NAMES = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs",
                "num_timesteps": "timesteps", "warmup_steps": "warmup", "dropout": "drop_rate",
                "channel_mult": "ch_multipliers", "attention": "apply_attn",
                "ema": "use_ema", "image_size": "resolution", "num_steps": "max_steps"}


def _did_you_mean(name: str, options) -> str:
    options = list(options)
    if COMMON_NAMES.get(name) in options:
        return f"; did you mean {COMMON_NAMES[name]!r}?"
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _elsewhere(name: str, section: str | None) -> str:
    """A hint for a key that belongs to (or is close to a key of) another section."""
    for other, keys in SCHEMA.items():
        if other != section:
            hint = _did_you_mean(name, keys) if name not in keys else f"; did you mean {name!r}?"
            if hint:
                return hint.replace("did you mean '", f"did you mean '{other}.")
    return ""


def _kind_error(key: Key, value: Any) -> str | None:
    """Why `value` is not of the key's kind (None when it is)."""
    if value is None:
        return None if key.nullable else "must not be null"
    if key.kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            return f"must be an integer, got {value!r}"
    elif key.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
    elif key.kind == "bool":
        if not isinstance(value, bool):
            return f"must be true or false, got {value!r}"
    elif key.kind == "str":
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
    elif key.kind == "int_list":
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return f"must be a non-empty list of integers, got {value!r}"
    elif key.kind == "bool_list":
        if not isinstance(value, bool) and (not isinstance(value, (list, tuple)) or not value
                                            or not all(isinstance(v, bool) for v in value)):
            return f"must be true/false or a list of them, got {value!r}"
    elif key.kind == "str_list":
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(v, str) for v in value):
            return f"must be a non-empty list of strings, got {value!r}"
    elif key.kind == "compile":
        if not isinstance(value, (bool, str)):
            return f"must be a compile mode, true or false, got {value!r}"
    elif key.kind == "size":
        if _size_error(value):
            return f"must be an integer S or a list [H, W] of integers, got {value!r}"
    return None


def _size_error(value: Any) -> bool:
    sizes = value if isinstance(value, (list, tuple)) else [value]
    return not 1 <= len(sizes) <= 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in sizes)


def parse_size(text: str) -> int | list[int]:
    """`S` -> S; `H,W` (or `HxW`) -> [H, W] (S when H = W); anything else a ValueError."""
    sizes = [int(p) for p in text.lower().replace("x", ",").replace(" ", "").split(",")]
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise ValueError(f"expected S or H,W (positive integers), got {text!r}")
    return sizes[0] if len(set(sizes)) == 1 else sizes


def size_hw(resolution: Any) -> tuple[int, int]:
    """(H, W) of an image size written S, [S], or [H, W] (config and checkpoint values)."""
    if _size_error(resolution):
        raise UserError(f"an image size must be S or [H, W] (positive integers), got "
                        f"{resolution!r}")
    sizes = list(resolution) if isinstance(resolution, (list, tuple)) else [resolution]
    return int(sizes[0]), int(sizes[-1])


def _range_error(key: Key, value: Any) -> str | None:
    """Why `value` is outside the key's choices or bounds (None when it is inside)."""
    if value is None or isinstance(value, bool):
        return None
    if key.choices and value not in key.choices:
        return f"must be one of {', '.join(key.choices)}; got {value!r}" \
            + _did_you_mean(str(value), key.choices)
    if key.kind == "compile" and isinstance(value, str) and value not in COMPILE_MODES:
        return f"must be one of {', '.join(COMPILE_MODES)}; got {value!r}"
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for number in numbers:
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        if key.low is not None and (number < key.low or (key.low_open and number == key.low)):
            return f"must be {'>' if key.low_open else '>='} {key.low:g}, got {number!r}"
        if key.high is not None and (number > key.high or (key.high_open and number == key.high)):
            return f"must be {'<' if key.high_open else '<='} {key.high:g}, got {number!r}"
    return None


def check_value(section: str, name: str, value: Any, source: str,
                label: str | None = None) -> Any:
    """`value` for `section.name` checked (kind, then range) and made canonical (an integral
    float becomes an int); a UserError "<source>: <label> ..." otherwise (`label`: the key's
    name, or the flag that set it)."""
    key = SCHEMA[section][name]
    problem = _kind_error(key, value) or _range_error(key, value)
    if problem:
        label = label or f"{section}.{name}"
        raise UserError(f"{source}: {label} {problem}" if source else f"{label} {problem}")
    if key.kind == "int" and isinstance(value, float):
        return int(value)
    if key.kind == "size" and isinstance(value, (list, tuple)):
        height, width = size_hw(value)  # canonical: S for square sizes, else [H, W]
        return height if height == width else [height, width]
    return value


def check(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A (normalized) config checked against the schema, with canonical values; `source` names
    where it came from in the error ("config file configs/x.json")."""
    out: dict[str, Any] = {}
    for section, body in config.items():
        if section in RESOLVED_ONLY:
            out[section] = body
            continue
        if section not in SCHEMA:
            hint = _did_you_mean(section, SCHEMA) or _elsewhere(section, None)
            raise UserError(f"{source}: unknown section {section!r}{hint} (sections: "
                            f"{', '.join(SCHEMA)})")
        if not isinstance(body, Mapping):
            raise UserError(f"{source}: section {section!r} must be a JSON object")
        keys = SCHEMA[section]
        checked = {}
        for name, value in body.items():
            if name not in keys:
                exact = [o for o in SCHEMA if o != section and name in SCHEMA[o]]
                hint = (f"; did you mean '{exact[0]}.{name}'?" if exact else
                        _did_you_mean(name, keys) or _elsewhere(name, section))
                raise UserError(f"{source}: unknown key {section}.{name}{hint} (see the "
                                "README's config keys)")
            checked[name] = check_value(section, name, value, source)
        out[section] = checked
    return out


def eval_sampler_name(ev: Mapping[str, Any]) -> str:
    """The sampler of a run's grids and evaluations: eval.sampler, else the reference's
    use_ddim (ddim) or ddpm; a use_ddim that contradicts eval.sampler is refused."""
    name = ev.get("sampler")
    if name is None:
        return "ddim" if ev.get("use_ddim") else "ddpm"
    if ev.get("use_ddim") and name != "ddim":
        raise UserError(f"--use-ddim (eval.use_ddim) contradicts --sampler {name} "
                        "(eval.sampler): drop one")
    return name
