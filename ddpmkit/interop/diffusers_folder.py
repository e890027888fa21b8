"""diffusers folders on disk: find the files, read them into a ddpmkit checkpoint, write one.

Layouts read (the first two are what the Hub's google/ddpm-* repositories hold):
- a model folder: `config.json` (UNet2DModel) + `diffusion_pytorch_model.safetensors` (or
  `.bin`, or a sharded `*.index.json`), with `scheduler_config.json` beside it or not;
- a pipeline folder: `model_index.json`, `unet/` (as above) and `scheduler/scheduler_config.json`;
- the `unet/` folder of a pipeline, whose scheduler is then `../scheduler/`.
Without any scheduler config, DDPMScheduler's defaults apply (as `DDPMScheduler()` would).

Layout written (`write_pipeline_folder`): the pipeline layout, which `DDPMPipeline` /
`DDIMPipeline.from_pretrained(folder)` and `UNet2DModel.from_pretrained(folder,
subfolder="unet")` load.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ddpmkit.errors import UserError
from ddpmkit.interop.diffusers_format import (
    model_config_from_unet,
    state_dict_from_diffusers,
)
from ddpmkit.interop.diffusers_scheduler import diffusion_config_from_scheduler

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
MODEL_INDEX_NAME = "model_index.json"
WEIGHTS_NAME = "diffusion_pytorch_model"
# In the order diffusers prefers them; fp16 variants (`save_pretrained(variant="fp16")`:
# one file, or shards named by a `.index.fp16.json`) only when nothing else is there. Their
# tensors load into the float32 network exactly (every fp16 value is a float32 value).
FP16_VARIANT = "fp16"
WEIGHTS_FILES = (f"{WEIGHTS_NAME}.safetensors", f"{WEIGHTS_NAME}.safetensors.index.json",
                 f"{WEIGHTS_NAME}.bin", f"{WEIGHTS_NAME}.bin.index.json",
                 f"{WEIGHTS_NAME}.{FP16_VARIANT}.safetensors",
                 f"{WEIGHTS_NAME}.safetensors.index.{FP16_VARIANT}.json",
                 f"{WEIGHTS_NAME}.{FP16_VARIANT}.bin",
                 f"{WEIGHTS_NAME}.bin.index.{FP16_VARIANT}.json")
PIPELINE_COMPONENTS = ("unet", "scheduler")
PIPELINE_CLASS = "DDPMPipeline"
FORMAT = "diffusers"


@dataclass(frozen=True)
class FolderLayout:
    """Where a diffusers folder keeps its parts (paths; `scheduler_config` may be None)."""
    root: str
    unet_dir: str
    scheduler_config: str | None


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path!r} as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path!r} does not hold a JSON object")
    return data


def is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, *name))
        for name in ((CONFIG_NAME,), ("unet", CONFIG_NAME), (MODEL_INDEX_NAME,)))


def _check_model_index(root: str) -> None:
    """A pipeline must consist of a UNet and a scheduler (no VAE, text encoder, ...)."""
    path = os.path.join(root, MODEL_INDEX_NAME)
    if not os.path.isfile(path):
        return
    index = read_json(path)
    others = sorted(k for k, v in index.items() if not k.startswith("_")
                    and k not in PIPELINE_COMPONENTS and v not in (None, [None, None]))
    if others:
        raise UserError(f"{path}: a {index.get('_class_name', 'pipeline')} with components "
                        f"{', '.join(others)}; only unconditional pixel-space pipelines (a "
                        "unet and a scheduler, as DDPMPipeline) map onto ddpmkit")


def locate(path: str) -> FolderLayout:
    """The parts of the diffusers folder `path`; a UserError says what is missing."""
    root = os.path.abspath(path)
    _check_model_index(root)
    unet_dir = os.path.join(root, "unet")
    if not os.path.isfile(os.path.join(unet_dir, CONFIG_NAME)):
        unet_dir = root
    if not os.path.isfile(os.path.join(unet_dir, CONFIG_NAME)):
        raise UserError(f"{path!r} is not a diffusers model folder: it has no {CONFIG_NAME} "
                        f"(nor unet/{CONFIG_NAME}); pass a checkpoint file, a .safetensors "
                        "file, or a folder holding config.json and diffusion_pytorch_model.*")
    candidates = [os.path.join(root, "scheduler", SCHEDULER_CONFIG_NAME),
                  os.path.join(unet_dir, SCHEDULER_CONFIG_NAME)]
    if os.path.basename(root) == "unet":
        candidates.append(os.path.join(os.path.dirname(root), "scheduler", SCHEDULER_CONFIG_NAME))
    scheduler = next((c for c in candidates if os.path.isfile(c)), None)
    return FolderLayout(root, unet_dir, scheduler)


def weights_files(unet_dir: str) -> list[str]:
    """The weight file(s) of a UNet folder: one file, or the shards an index names."""
    for name in WEIGHTS_FILES:
        path = os.path.join(unet_dir, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".json"):
            return [path]
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{path}: no \"weight_map\" in the shard index")
        return [os.path.join(unet_dir, f) for f in sorted(set(weight_map.values()))]
    raise UserError(f"{unet_dir!r} holds {CONFIG_NAME} but no weights "
                    f"({WEIGHTS_NAME}.safetensors or .bin, or their .{FP16_VARIANT} variants); "
                    "copy the weights file there")


def _read_weights_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from ddpmkit.interop.safetensors_format import read_tensors

        return read_tensors(path)[0]
    from ddpmkit.checkpoints.files import load_checkpoint
    from ddpmkit.models.loading import is_state_dict

    state_dict = load_checkpoint(path, map_location="cpu")
    if not is_state_dict(state_dict):
        raise UserError(f"{path!r} is not a state dict of tensors")
    return state_dict


def read_configs(path: str) -> tuple[FolderLayout, dict[str, Any]]:
    """(layout, ddpmkit config) of a diffusers folder, from its JSON files alone."""
    layout = locate(path)
    unet_config = os.path.join(layout.unet_dir, CONFIG_NAME)
    model, resolution = model_config_from_unet(read_json(unet_config), unet_config)
    if layout.scheduler_config is None:
        log.warning("%s has no %s: using DDPMScheduler's defaults (linear betas 1e-4..0.02, "
                    "T 1000, fixed_small, clip_sample)", path, SCHEDULER_CONFIG_NAME)
        diffusion = diffusion_config_from_scheduler(None, f"{path} (no scheduler config)")
    else:
        diffusion = diffusion_config_from_scheduler(read_json(layout.scheduler_config),
                                                    layout.scheduler_config)
    config = {"dataset": {"resolution": resolution, "channels": model["in_channels"]},
              "diffusion": diffusion, "model": model}
    return layout, config


def used_files(path: str) -> list[str]:
    """Every file a diffusers folder's network and diffusion are read from."""
    layout = locate(path)
    files = [os.path.join(layout.unet_dir, CONFIG_NAME), *weights_files(layout.unet_dir)]
    return files + ([layout.scheduler_config] if layout.scheduler_config else [])


def load_diffusers_folder(path: str) -> dict[str, Any]:
    """A ddpmkit checkpoint dict (`model`, `config`) from a diffusers folder.

    The folder holds one set of weights, so `ema` names the same tensors: `--use-ema` and its
    absence both use them.
    """
    layout, config = read_configs(path)
    tensors: dict[str, torch.Tensor] = {}
    files = weights_files(layout.unet_dir)
    if any(FP16_VARIANT in os.path.basename(f).replace("-", ".").split(".") for f in files):
        log.info("%s: fp16 weights (the only ones there), loaded into a float32 network",
                 layout.unet_dir)
    for file in files:
        tensors.update(_read_weights_file(file))
    state_dict = state_dict_from_diffusers(tensors, config["model"],
                                           source=", ".join(map(repr, files)))
    return {"model": state_dict, "ema": state_dict, "config": config, "format": FORMAT,
            "weights": "unlabelled"}


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_pipeline_folder(folder: str, unet_config: Mapping[str, Any],
                          unet_state_dict: Mapping[str, torch.Tensor],
                          scheduler_config: Mapping[str, Any]) -> None:
    """Write `folder`/{model_index.json, unet/, scheduler/} (the folder must exist)."""
    from ddpmkit.interop.diffusers_format import DIFFUSERS_VERSION
    from ddpmkit.interop.safetensors_format import require_safetensors

    save_file = require_safetensors().save_file
    os.makedirs(os.path.join(folder, "unet"))
    os.makedirs(os.path.join(folder, "scheduler"))
    save_file(dict(unet_state_dict), os.path.join(folder, "unet", f"{WEIGHTS_NAME}.safetensors"),
              metadata={"format": "pt"})
    _write_json(os.path.join(folder, "unet", CONFIG_NAME), unet_config)
    _write_json(os.path.join(folder, "scheduler", SCHEDULER_CONFIG_NAME), scheduler_config)
    _write_json(os.path.join(folder, MODEL_INDEX_NAME), {
        "_class_name": PIPELINE_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler_config["_class_name"]],
        "unet": ["diffusers", unet_config["_class_name"]]})
