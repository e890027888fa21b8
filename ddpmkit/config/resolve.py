"""The one resolver of image-run configs: built-in defaults (the schema) <- the dataset's JSON
config file <- the options the user gave, each checked against the schema, then the dataset's
facts completed (`config.facts`), frozen as an `ImageRunConfig`.

It takes plain values: `values`, a dict of option name -> value (the names of `OPTION_KEYS`,
plus `dataset`, `config_path`, `config_dir`, `image_size`, `exp_name`, `chkpt_name`,
`image_dir`, `chkpt_dir`; missing names count as not given), and `given`, the names the user
set (only those override the file). `ddpmkit train` passes its parsed flags; a script passes a
dict.
"""

import logging
import os
from typing import Any, Dict, Mapping, Set

from ddpmkit.config import deep_update, find_config_file, load_json, schema
from ddpmkit.config.facts import checkpoint_folder, complete_dataset_facts, read_image_list
from ddpmkit.config.run import ImageRunConfig
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

# Option name (a flag's dest) -> (config section, key). Only these options end up in the config.
OPTION_KEYS = {
    "dataset": ("dataset", "name"), "root": ("dataset", "root"),
    "image_size": ("dataset", "resolution"), "channels": ("dataset", "channels"),
    "resize_mode": ("dataset", "resize_mode"), "strict_images": ("dataset", "strict_images"),
    "random_flip": ("dataset", "random_flip"), "download": ("dataset", "download"),
    "num_workers": ("dataset", "num_workers"), "split": ("dataset", "split"),
    **{name: ("diffusion", name) for name in schema.SCHEMA["diffusion"]},
    **{name: ("model", name) for name in ("block_size", "hid_channels", "ch_multipliers",
                                          "num_res_blocks", "apply_attn", "drop_rate",
                                          "group_norm_eps")},
    **{name: ("train", name) for name in schema.SCHEMA["train"]},
    "guidance_scale": ("eval", "guidance_scale"), "eval": ("eval", "enabled"),
    "eval_intv": ("eval", "intv"), "eval_total_size": ("eval", "total_size"),
    "eval_batch_size": ("eval", "batch_size"), "use_ddim": ("eval", "use_ddim"),
    "sampler": ("eval", "sampler"),
    "skip_schedule": ("eval", "skip_schedule"), "subseq_size": ("eval", "subseq_size"),
}
# A folder of images of these sizes (the longer side) takes this shipped config's network.
FOLDER_CONFIG_BY_SIZE = {32: "cifar10", 64: "celeba", 256: "celebahq"}


def _config_name(values: Mapping[str, Any]) -> str:
    """The shipped config to read when no config path is given (folder: by image size)."""
    name = values.get("dataset") or "cifar10"
    if name != "folder" or values.get("config_path"):
        return name
    if not values.get("image_size"):
        raise UserError("--dataset folder needs --image-size S or H,W (and optionally "
                        "--config-path FILE for the network)")
    height, width = schema.size_hw(values["image_size"])
    if max(height, width) not in FOLDER_CONFIG_BY_SIZE:
        raise UserError(f"no shipped config for {height}x{width} images (shipped: longer side "
                        "32, 64 or 256): pass --config-path FILE (see configs/ for the schema)")
    return FOLDER_CONFIG_BY_SIZE[max(height, width)]


def _file_config(values: Mapping[str, Any]) -> Dict[str, Any]:
    """The JSON config for the run, normalized and checked against the schema."""
    path = find_config_file(_config_name(values), values.get("config_path"),
                            values.get("config_dir"))
    cfg = schema.check(schema.normalize(load_json(path)), f"config file {path}")
    cfg["config_file"] = os.path.abspath(path)
    return cfg


def _given_options(values: Mapping[str, Any], given: Set[str]) -> Dict[str, Dict[str, Any]]:
    """The options the user gave, as config sections, each checked against the schema."""
    out: Dict[str, Dict[str, Any]] = {}
    for name in sorted(given):
        if name in OPTION_KEYS:
            section, key = OPTION_KEYS[name]
            value = schema.check_value(section, key, values.get(name), source="",
                                       label="--" + name.replace("_", "-"))
            out.setdefault(section, {})[key] = value
    return out


def resolve_image_dict(values: Mapping[str, Any], given: Set[str]) -> Dict[str, Any]:
    """defaults < JSON < given options, as one nested dict (dataset facts not yet completed)."""
    file_cfg = _file_config(values)
    file_dataset = file_cfg.get("dataset", {}).get("name")
    dataset = values.get("dataset") or file_dataset or "cifar10"
    if values.get("dataset") and file_dataset and file_dataset != dataset \
            and dataset != "folder":
        logger.warning("--dataset %s overrides the config file's dataset %s", dataset,
                       file_dataset)
    config = deep_update(deep_update(schema.defaults(), file_cfg), _given_options(values, given))
    config["dataset"]["name"] = dataset
    if dataset == "folder":
        if file_dataset != "folder" and "channels" not in given:
            # The file's image channels are another dataset's: the folder decides.
            config["dataset"]["channels"] = None
            config["model"].pop("in_channels", None)
        config["dataset"]["resolution"] = schema.check_value(
            "dataset", "resolution", values.get("image_size"), "", "--image-size")
    config["eval"].setdefault("intv", None)
    if config["eval"]["intv"] is None:
        config["eval"]["intv"] = config["train"]["chkpt_intv"] or None
    config["run"] = {
        "exp_name": values.get("exp_name") or dataset,
        "chkpt_name": values.get("chkpt_name") or f"ddpm_{dataset}",
        "image_dir": values.get("image_dir") or "./images/train",
        "chkpt_dir": values.get("chkpt_dir") or "./chkpts",
    }
    return config


def validate_config(config: Dict[str, Any]) -> None:
    """Checks that involve more than one key (each key alone was checked by the schema)."""
    train = config["train"]
    missing = [k for k in schema.MODEL_REQUIRED if k not in config.get("model", {})]
    if missing:
        raise UserError(f"the config names no {', '.join(missing)} for the network (section "
                        f"\"model\" of {config.get('config_file')})")
    if train["batch_size"] % train["num_accum"]:
        raise UserError(f"--batch-size {train['batch_size']} must be divisible by --num-accum "
                        f"{train['num_accum']}")
    if config["dataset"]["name"] == "folder" and not config["dataset"].get("resolution"):
        raise UserError("--dataset folder needs --image-size S or H,W")
    schema.eval_sampler_name(config["eval"])


def check_class_options(config: Dict[str, Any], given: Set[str]) -> None:
    """The class-conditioning options mean nothing without class_cond: given alone, they are
    refused rather than ignored."""
    if config["train"].get("class_cond"):
        return
    named = [f"--{d.replace('_', '-')}" for d in ("class_dropout", "guidance_scale")
             if d in given]
    if named:
        verb = "apply" if len(named) > 1 else "applies"
        raise UserError(f"{' and '.join(named)} {verb} to class-conditional runs: add "
                        "--class-cond")


def resolve_image_run(values: Mapping[str, Any], given: Set[str],
                      resuming: bool = False) -> ImageRunConfig:
    """The frozen config of an image run: resolved, checked, and its dataset facts completed
    (a resumed folder run keeps the image list it started with)."""
    config = resolve_image_dict(values, given)
    validate_config(config)
    check_class_options(config, given)
    run_images = read_image_list(checkpoint_folder(config["run"])) if resuming else None
    return ImageRunConfig.from_dict(complete_dataset_facts(config, run_images))
