"""ddpmkit weights as one .safetensors file, with the resolved config in its metadata.

safetensors stores tensors and a string-to-string metadata table, nothing executable (loading
cannot run code, unlike a pickle). A ddpmkit file holds one set of weights (EMA or raw) under
ddpmkit's state-dict names and three metadata entries:
    ddpmkit.config           the resolved config as JSON (dataset / diffusion / model / ...)
    ddpmkit.weights          "ema" or "model": which weights these are
    ddpmkit.format_version   FORMAT_VERSION
Read back, such a file is a checkpoint with a config; a .safetensors file without that metadata
is a bare state dict (the architecture then comes from --dataset / --config-path).
"""
from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch

from ddpmkit.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_CONFIG = "ddpmkit.config"
KEY_WEIGHTS = "ddpmkit.weights"
KEY_VERSION = "ddpmkit.format_version"
# A safetensors file starts with the JSON header's length (little-endian u64), then the header.
HEADER_LENGTH_BYTES = 8
# Names that only diffusers' UNet2DModel uses: a file with them needs its folder's config.json.
DIFFUSERS_MARKERS = ("conv_in.weight", "time_embedding.linear_1.weight")


def require_safetensors():
    """The `safetensors.torch` module, or a one-line UserError saying what to install."""
    try:
        import safetensors.torch
    except ImportError as exc:
        raise UserError("reading or writing .safetensors files needs the safetensors package: "
                        "pip install safetensors") from exc
    return safetensors.torch


def is_safetensors_file(path: str) -> bool:
    """Whether `path` starts like a safetensors file (header length, then a JSON object)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_LENGTH_BYTES + 1)
    except OSError:
        return False
    if len(head) < HEADER_LENGTH_BYTES + 1:
        return False
    (length,) = struct.unpack("<Q", head[:HEADER_LENGTH_BYTES])
    return head[-1:] == b"{" and 2 <= length <= size - HEADER_LENGTH_BYTES


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; a damaged file is a UserError."""
    require_safetensors()
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, ...: all mean "cannot read this file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {path!r} as a safetensors file ({first})") from exc
    return tensors, metadata


def read_metadata(path: str) -> dict[str, str]:
    """The metadata table of a safetensors file (empty when it cannot be read)."""
    require_safetensors()
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception:  # any unreadable file simply has no ddpmkit metadata
        return {}


def save_weights(path: str, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                 weights: str) -> None:
    """Write `state_dict` and `config` to `path` atomically (temp file + rename)."""
    from ddpmkit.utils.io import atomic_write

    st = require_safetensors()
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    metadata = {KEY_CONFIG: json.dumps(config, sort_keys=True), KEY_WEIGHTS: weights,
                KEY_VERSION: str(FORMAT_VERSION)}
    data = st.save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def load_safetensors_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint dict from a .safetensors file: `model` / `ema` / `config` for a ddpmkit
    file (one set of weights, used with or without --use-ema), else a bare state dict."""
    tensors, metadata = read_tensors(path)
    if KEY_CONFIG not in metadata:
        if all(k in tensors for k in DIFFUSERS_MARKERS):
            raise UserError(f"{path!r} holds diffusers UNet2DModel weights without their config: "
                            "pass the folder that holds it and its config.json instead")
        return tensors
    version = metadata.get(KEY_VERSION, "?")
    if version != str(FORMAT_VERSION):
        raise UserError(f"{path!r} is a ddpmkit safetensors file of format version {version}; "
                        f"this ddpmkit reads version {FORMAT_VERSION}: upgrade ddpmkit")
    try:
        config = json.loads(metadata[KEY_CONFIG])
    except json.JSONDecodeError as exc:
        raise UserError(f"{path!r}: its {KEY_CONFIG} metadata is not JSON ({exc})") from exc
    log.info("%s holds %s weights", path, metadata.get(KEY_WEIGHTS, "unlabelled"))
    return {"model": tensors, "ema": tensors, "config": config,
            "weights": metadata.get(KEY_WEIGHTS), "format": "safetensors"}
