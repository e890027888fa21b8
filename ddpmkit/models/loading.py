"""Checkpoint file -> ready network: ddpmkit's own checkpoints and the reference project's files.

Accepted layouts (all read with `torch.load(weights_only=True)`; the reference's numpy `fid`
scalar is the only non-tensor object allowed):
- ddpmkit trainer checkpoints: `model` (state_dict), `ema` (EMA weights), `config` (the resolved
  config: dataset / diffusion / model / train sections), `step`, `epoch`, `format_version`.
- reference trainer checkpoints: `model`, optionally `ema = {"decay", "shadow", "num_updates"}`,
  `optimizer`, `scheduler`, `epoch`, `loss`, `fid`; no config, so the architecture comes from
  `--dataset` / `--config-path` (a shipped `configs/<dataset>.json`).
- bare state dicts (the reference's released `cifar10_2040.pt`).
- through `ddpmkit.interop.sources` (which loads any of them by path): .safetensors files,
  diffusers folders and Hub ids.
Key prefixes `module.` (DDP), `_model.` (the reference's pixel-shuffle wrapper) and
`_orig_mod.` (torch.compile) are stripped.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ddpmkit.errors import UserError
from ddpmkit.models.unet import MODEL_DEFAULTS

log = logging.getLogger(__name__)

KEY_PREFIXES = ("module.", "_model.", "_orig_mod.")
MODEL_GROUP_NORM_EPS = MODEL_DEFAULTS["group_norm_eps"]
# How many offending key names an error message lists.
KEYS_SHOWN = 4

StateDict = dict[str, torch.Tensor]


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors (and nothing else)."""
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
                   ) -> StateDict:
    """Remove leading `module.` / `_model.` / `_orig_mod.` (in any combination) from every key."""
    out: StateDict = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(KEY_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise UserError(f"{source}: keys {key!r} and another both map to {name!r} once "
                            f"the prefixes {', '.join(KEY_PREFIXES)} are removed")
        out[name] = value
    return out


def _ema_weights(ema: Any, source: str) -> StateDict:
    """The averaged weights inside an `ema` entry: the reference's `{"shadow": ...}`, a wrapper
    with `state_dict` / `params`, or a bare state dict."""
    if isinstance(ema, Mapping):
        for key in ("shadow", "state_dict", "params", "model"):
            if key in ema and is_state_dict(ema[key]):
                return dict(ema[key])
        if is_state_dict(ema):
            return dict(ema)
    described = sorted(ema)[:KEYS_SHOWN] if isinstance(ema, Mapping) else type(ema).__name__
    raise UserError(f"{source}: cannot find the EMA weights in its 'ema' entry ({described})")


def choose_weights(ckpt: Mapping[str, Any], use_ema: bool | None = None,
                   source: str = "checkpoint") -> str:
    """Which weights of a loaded checkpoint to use: "ema", "model" or "bare state dict".

    `use_ema` None takes the EMA weights whenever the file has them (what DDPM results are
    sampled from; the reference's configs set `use_ema` too), else the raw ones; True demands
    the EMA weights (an error when there are none: silently using the raw weights would change
    the results); False takes the raw weights. A bare state dict is used as it is either way:
    it does not say whether it holds EMA weights.
    """
    if is_state_dict(ckpt):
        return "bare state dict"
    has_ema = ckpt.get("ema") is not None
    if use_ema and not has_ema:
        raise UserError(f"{source} holds no EMA weights (no 'ema' entry); drop --use-ema "
                        "to use its raw model weights")
    if has_ema and use_ema is not False:
        return "ema"
    if not is_state_dict(ckpt.get("model")):
        keys = ", ".join(sorted(map(str, ckpt))[:8])
        raise UserError(f"{source} is neither a state dict nor a trainer checkpoint with a "
                        f"'model' entry (its keys: {keys})")
    return "model"


def select_weights(ckpt: Mapping[str, Any], use_ema: bool | None = None,
                   source: str = "checkpoint") -> tuple[StateDict, str]:
    """(state_dict with prefixes stripped, which entry it came from) from a loaded checkpoint;
    `use_ema` as in `choose_weights`."""
    entry = choose_weights(ckpt, use_ema, source)
    if entry == "bare state dict":
        return strip_prefixes(ckpt, source), entry
    if entry == "ema":
        return strip_prefixes(_ema_weights(ckpt["ema"], source), source), entry
    return strip_prefixes(ckpt["model"], source), entry


def describe_weights(entry: str, source: str, has_ema: bool = False,
                     action: str = "using") -> str:
    """One line saying which weights were loaded (`action`: what is done with them, e.g.
    "sampling") and how to pick the others."""
    if entry == "ema":
        return f"{action} the EMA weights of {source} (--no-ema for the raw weights)"
    if entry == "model" and has_ema:
        return f"{action} the raw weights of {source} (--no-ema; it also holds EMA weights)"
    if entry == "model":
        return f"{action} the raw weights of {source}, which holds no EMA weights"
    return (f"{action} the weights of {source} as they are (a bare state dict: EMA or raw, "
            "the file does not say)")


def checkpoint_config(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The resolved config a ddpmkit checkpoint carries, or None (reference files, bare dicts)."""
    config = ckpt.get("config") if not is_state_dict(ckpt) else None
    return dict(config) if isinstance(config, Mapping) and "model" in config else None


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's or file's config in ddpmkit's layout (`schema.normalize`: the reference
    project's bare dataset name, `denoise` section, ...), which must describe a network."""
    from ddpmkit.config.schema import normalize

    config = normalize(config)
    if not isinstance(config.get("model"), Mapping):
        raise UserError("the config has no \"model\" section describing the network")
    return {**config, "model": dict(config["model"])}


def image_shape(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of the images a config's network makes."""
    from ddpmkit.config.schema import size_hw
    from ddpmkit.data.images import dataset_info

    data = config.get("dataset") or {}
    channels = config["model"].get("in_channels") or data.get("channels")
    resolution = data.get("resolution") or data.get("image_size")
    if resolution is None:
        if not data.get("name"):
            raise UserError("the config names no dataset and no resolution")
        channels_default, resolution = dataset_info(data["name"])
        channels = channels or channels_default
    height, width = size_hw(resolution)
    return int(channels), height, width


def build_from_config(config: Mapping[str, Any]):
    """(network, GaussianDiffusion) described by a config; the diffusion decides the network's
    output channels (2C for a learned variance)."""
    from ddpmkit.build import build_diffusion
    from ddpmkit.models.unet import build_model

    config = normalize_config(config)
    diffusion = build_diffusion(config.get("diffusion") or {})
    channels = image_shape(config)[0]
    model = build_model(config["model"], diffusion.model_out_channels(channels))
    return model, diffusion


def _few(keys) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > KEYS_SHOWN else ""
    return ", ".join(keys[:KEYS_SHOWN]) + more


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                 source: str = "checkpoint") -> None:
    """`model.load_state_dict(state_dict)` with one readable UserError for missing or extra keys
    and shape mismatches (a few of each are named)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s): {_few(extra)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) (file vs model): {_few(shapes)}")
    if problems:
        raise UserError(f"{source} does not fit the network its config describes: "
                        + "; ".join(problems)
                        + ". Check --dataset / --config-path (and group_norm_eps, block_size)")
    model.load_state_dict(state_dict, strict=True)


def _with_group_norm_eps(config: dict[str, Any], eps: float | None, own: bool,
                         source: str) -> dict[str, Any]:
    """`config` with the model's GroupNorm epsilon set to `eps` for files without a config of
    their own (a checkpoint's own config is what it was trained with), and one log line. The
    reference's GroupNorm epsilon was 1e-5 until its commit 9a8ecb5 (2023-07-16), which its
    released checkpoints were trained with, and 1e-6 after; its files do not record it."""
    model = dict(config["model"])
    if own:
        if eps is not None and eps != model.get("group_norm_eps", MODEL_GROUP_NORM_EPS):
            log.warning("%s carries its own config (group_norm_eps %g); --group-norm-eps %g is "
                        "not used", source, model.get("group_norm_eps", MODEL_GROUP_NORM_EPS), eps)
        return config
    if eps is not None:
        model["group_norm_eps"] = float(eps)
    used = model.get("group_norm_eps", MODEL_GROUP_NORM_EPS)
    log.info("%s carries no config: GroupNorm eps %g (the reference's released checkpoints use "
             "1e-5; models trained with its code after 2023-07-16 need --group-norm-eps 1e-6)",
             source, used)
    return {**config, "model": model}


class LoadedModel(NamedTuple):
    """A network ready to run, the config it was built from, and which of the checkpoint's
    weights it holds ("ema", "model" or "bare state dict": see `choose_weights`)."""
    model: nn.Module
    config: dict[str, Any]
    weights: str


def load_model_dict(ckpt: Mapping[str, Any], config: Mapping[str, Any] | None = None,
                    use_ema: bool | None = None, device: Any = "cpu",
                    source: str = "checkpoint", group_norm_eps: float | None = None,
                    action: str = "using") -> LoadedModel:
    """The model in eval mode on `device`, its config and its weights' entry, from an already
    loaded checkpoint dict.

    The checkpoint's own config wins; `config` is used only when the file carries none (the
    reference project's files), and one of the two must exist. `use_ema`: see
    `choose_weights` (default: the EMA weights when present). `group_norm_eps` overrides the
    epsilon of files without a config of their own. `action` words the log line.
    """
    own = checkpoint_config(ckpt)
    stored = None if is_state_dict(ckpt) else ckpt.get("config")
    if own is None and isinstance(stored, Mapping):
        raise UserError(f"{source} is not an image-model checkpoint: its config has no "
                        "\"model\" section (a `train-toy` checkpoint?)")
    if own is None and config is None:
        raise UserError(f"{source} carries no config (a reference-project file or bare weights); "
                        "name the architecture with --dataset NAME or --config-path FILE")
    config = normalize_config(own if own is not None else config)
    config = _with_group_norm_eps(config, group_norm_eps, own is not None, source)
    state_dict, entry = select_weights(ckpt, use_ema, source)
    model, _ = build_from_config(config)
    load_weights(model, state_dict, f"{source} ({entry})")
    has_ema = not is_state_dict(ckpt) and ckpt.get("ema") is not None
    log.info(describe_weights(entry, source, has_ema, action))
    return LoadedModel(model.to(device).eval(), config, entry)


def model_from_checkpoint_dict(ckpt: Mapping[str, Any], config: Mapping[str, Any] | None = None,
                               use_ema: bool | None = None, device: Any = "cpu",
                               source: str = "checkpoint", group_norm_eps: float | None = None,
                               action: str = "using"):
    """(model in eval mode on `device`, config): `load_model_dict` without the weights' entry."""
    loaded = load_model_dict(ckpt, config, use_ema, device, source, group_norm_eps, action)
    return loaded.model, loaded.config
