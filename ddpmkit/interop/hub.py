"""Hugging Face Hub ids (`google/ddpm-cifar10-32`) -> a local folder, via huggingface_hub's cache.

huggingface_hub is optional (`pip install huggingface_hub`, or the `hub` extra). The cache is
tried first, so a model downloaded once loads offline without any network call; otherwise the
JSON files are fetched, checked (a model ddpmkit cannot map is refused before its weights are
downloaded), then only the UNet's weights (safetensors, else .bin; the fp16 variant only where
a repository has nothing else, as a local folder is read). The cache is huggingface_hub's:
`HF_HUB_CACHE` / `HF_HOME`, default ~/.cache/huggingface/hub.
"""
from __future__ import annotations

import logging
import os
import re

from ddpmkit.errors import UserError

log = logging.getLogger(__name__)

# owner/name, each part letters, digits, "-", "_", "." (the Hub's rule, roughly).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# A name ending like a file is a local path that does not exist, not a Hub id.
FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".json")
# Tried in turn: safetensors (with shards and their index), else pickled .bin.
WEIGHT_PATTERNS = ("diffusion_pytorch_model*.safetensors*", "diffusion_pytorch_model*.bin*")
NON_EMA = "*non_ema*"
# First without the fp16 variants (`*.fp16.*`, shards indexed by `*.index.fp16.json`), then,
# where those are all there is, with them.
ATTEMPTS = [(pattern, [NON_EMA, "*.fp16.*"]) for pattern in WEIGHT_PATTERNS] + [
    (pattern, [NON_EMA]) for pattern in WEIGHT_PATTERNS]


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_ID.fullmatch(spec)) and not spec.lower().endswith(FILE_SUFFIXES)


def _how_to_download(repo_id: str) -> str:
    return (f"download the model folder yourself (e.g. `hf download {repo_id} --local-dir DIR`) "
            "and pass its path")


def _cached(snapshot_download, repo_id: str, cache_dir: str | None) -> str | None:
    """The cached snapshot folder if it holds a complete model, else None (no network)."""
    from ddpmkit.interop.diffusers_folder import locate, weights_files

    try:
        folder = snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
        weights_files(locate(folder).unet_dir)
    except (OSError, ValueError, UserError):
        return None
    return folder


def _download(snapshot_download, repo_id: str, cache_dir: str | None) -> str:
    """Configs first (refusing what cannot map), then the UNet's weights."""
    from ddpmkit.interop.diffusers_folder import read_configs, weights_files

    folder = snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=["*.json"])
    layout, _ = read_configs(folder)  # a UserError here: nothing big was downloaded
    prefix = os.path.relpath(layout.unet_dir, folder)
    prefix = "" if prefix == "." else prefix + "/"
    for pattern, ignored in ATTEMPTS:
        folder = snapshot_download(repo_id, cache_dir=cache_dir,
                                   allow_patterns=[prefix + pattern], ignore_patterns=ignored)
        try:
            weights_files(os.path.join(folder, prefix))
            return folder
        except UserError:
            continue
    raise UserError(f"Hub repository {repo_id!r} holds no diffusion_pytorch_model weights for "
                    "its UNet")


def snapshot_folder(repo_id: str, cache_dir: str | None = None) -> str:
    """A local folder holding the Hub model `repo_id` (from the cache, else downloaded)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise UserError(f"{repo_id!r} is not a local file or folder; to load it as a Hugging "
                        "Face Hub id, pip install huggingface_hub (or ddpmkit[hub]); or "
                        f"{_how_to_download(repo_id)}") from exc
    folder = _cached(snapshot_download, repo_id, cache_dir)
    if folder is not None:
        log.info("%s: using the cached snapshot %s", repo_id, folder)
        return folder
    log.info("%s is not in the Hugging Face cache: downloading it", repo_id)
    try:
        return _download(snapshot_download, repo_id, cache_dir)
    except UserError:
        raise
    except Exception as exc:  # offline, unknown repo, HTTP errors: all end the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"{repo_id!r} is neither a local path nor a model in the Hugging Face "
                        f"cache, and downloading it failed ({type(exc).__name__}: {first}); "
                        f"{_how_to_download(repo_id)}") from exc
