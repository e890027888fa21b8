"""What `--chkpt-path` may name, and how each becomes one checkpoint dict.

- a checkpoint file of ddpmkit or of the reference project (torch.save, weights_only loading);
- a .safetensors file (ddpmkit's export with its config, or bare weights);
- a diffusers model or pipeline folder (config.json + weights, or unet/ + scheduler/);
- a Hugging Face Hub id (`google/ddpm-cifar10-32`), through huggingface_hub's cache.
A local path that exists always wins over a Hub id of the same spelling.

The dict has ddpmkit's checkpoint layout (`model`, optionally `ema` and `config`), or is a
bare state dict, so `models.loading.model_from_checkpoint_dict` takes every source alike;
`load_model_from_checkpoint` does both steps.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

from ddpmkit.errors import UserError
from ddpmkit.utils.io import sha256_of_file

# Bytes read at a time while hashing.


def resolve_checkpoint(spec: str, cache_dir: str | None = None) -> str:
    """A local file or folder for `spec`: the path itself when it exists, else the snapshot
    folder of the Hub id `spec`."""
    from ddpmkit.interop.hub import looks_like_hub_id, snapshot_folder

    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return path
    if looks_like_hub_id(spec):
        return snapshot_folder(spec, cache_dir)
    raise UserError(f"checkpoint {path!r} does not exist")


def load_checkpoint_any(path: str) -> dict[str, Any]:
    """The checkpoint dict of a local file or folder (see the module docstring)."""
    from ddpmkit.checkpoints.files import load_checkpoint
    from ddpmkit.interop.diffusers_folder import is_diffusers_folder, load_diffusers_folder
    from ddpmkit.interop.safetensors_format import (
        is_safetensors_file,
        load_safetensors_checkpoint,
    )

    if os.path.isdir(path):
        if not is_diffusers_folder(path):
            raise UserError(f"{path!r} is a folder but not a diffusers model folder (no "
                            "config.json, unet/config.json or model_index.json); pass a "
                            "checkpoint file or a diffusers folder")
        return load_diffusers_folder(path)
    if is_safetensors_file(path):
        return load_safetensors_checkpoint(path)
    return load_checkpoint(path, map_location="cpu", allow_numpy_scalars=True)


def checkpoint_digest(path: str) -> str:
    """sha256 of a checkpoint file; of a folder, sha256 over (name, sha256) of the files the
    model is read from, so any change to the weights or configs changes it."""
    if not os.path.isdir(path):
        return sha256_of_file(path)
    from ddpmkit.interop.diffusers_folder import used_files

    digest = hashlib.sha256()
    for file in used_files(path):
        name = os.path.relpath(file, os.path.abspath(path))
        digest.update(f"{name}\0{sha256_of_file(file)}\n".encode())
    return digest.hexdigest()


def load_model_from_checkpoint(path: str, config: Mapping[str, Any] | None = None,
                               use_ema: bool | None = None, device: Any = "cpu",
                               group_norm_eps: float | None = None):
    """(model in eval mode on `device`, resolved config) from a checkpoint file of ddpmkit or the
    reference project, a .safetensors file, a diffusers folder or a Hub id (see
    the module docstring). `config` supplies the architecture when the file has none;
    `use_ema` and `group_norm_eps` as in `model_from_checkpoint_dict`."""
    from ddpmkit.models.loading import model_from_checkpoint_dict

    ckpt = load_checkpoint_any(resolve_checkpoint(path))
    return model_from_checkpoint_dict(ckpt, config, use_ema, device, source=repr(path),
                                      group_norm_eps=group_norm_eps)
