"""A trained model -> the formats other tools load: a diffusers pipeline folder, a .safetensors file.

- `diffusers`: `OUT/model_index.json`, `OUT/unet/{config.json, diffusion_pytorch_model.safetensors}`
  and `OUT/scheduler/scheduler_config.json` (a DDPMScheduler). `DDPMPipeline.from_pretrained(OUT)`,
  `DDIMPipeline.from_pretrained(OUT)` and `UNet2DModel.from_pretrained(OUT, subfolder="unet")`
  load it, and the UNet computes what ddpmkit's does (see `diffusers_format`). Refused, each
  with a one-line reason: `block_size` > 1 (pixel shuffle), a `learned` variance, the `mean`
  mean type. Exported with an exact conversion: `x_0` as prediction_type `sample`, `v` as
  `v_prediction`, zero terminal SNR as `rescale_betas_zero_snr`; beta
  schedules diffusers has no name for (warmup10, warmup50, jsd, custom) as `trained_betas`.
- `safetensors`: one file with the weights and the resolved config in its metadata (see
  `safetensors_format`); ddpmkit's `--chkpt-path` loads it.
One set of weights is exported: the EMA weights when the checkpoint has them (unless
`use_ema=False`), else the raw ones. Nothing is written until everything has been checked, and
the output appears at once (temp folder or file + rename), so a failed export leaves nothing.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ddpmkit.errors import UserError
from ddpmkit.utils.io import (
    check_free_space,
    check_not_protected,
    check_replaceable_file,
    check_replaceable_folder,
    check_writable_folder,
    write_folder_atomically,
)

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "safetensors")


@dataclass(frozen=True)
class ExportResult:
    path: str
    format: str
    weights: str      # "ema", "model", or "unlabelled" (a bare state dict)
    num_tensors: int


def _is_ddpmkit_safetensors(path: str) -> bool:
    from ddpmkit.interop.safetensors_format import KEY_CONFIG, is_safetensors_file, read_metadata

    return is_safetensors_file(path) and KEY_CONFIG in read_metadata(path)


def check_output(out: str, fmt: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """Check `out` before any work: its folder writable, and existing output replaced only
    with `overwrite` and only when ddpmkit wrote it (an export folder holding nothing else, a
    ddpmkit .safetensors file), never an input or the working folder (an empty folder is
    fine)."""
    what = "output folder" if fmt == "diffusers" else "output file"
    if fmt == "safetensors":
        check_replaceable_file(out, what, lambda path: True, inputs)  # folder, input: refused
        check_writable_folder(os.path.dirname(os.path.abspath(out)), "output folder")
    else:
        if os.path.lexists(out) and not os.path.isdir(out):
            raise UserError(f"{what} {out} is a file; --format diffusers writes a folder: give "
                            "a new folder path")
        check_writable_folder(out, what)
    if not os.path.lexists(out):
        return
    if fmt == "diffusers":
        check_not_protected(out, what, inputs)
        if not os.listdir(out):
            return
    if not overwrite:
        raise UserError(f"{out!r} already exists; pass --overwrite to replace it, or choose "
                        "another output path")
    if fmt == "safetensors":
        check_replaceable_file(out, what, _is_ddpmkit_safetensors, inputs)
    else:
        check_replaceable_folder(out, what, inputs)


def _export_diffusers(out: str, state_dict: Mapping[str, Any], config: Mapping[str, Any]
                      ) -> int:
    from ddpmkit.interop.diffusers_folder import write_pipeline_folder
    from ddpmkit.interop.diffusers_format import state_dict_to_diffusers, unet_config_from_model
    from ddpmkit.interop.diffusers_scheduler import scheduler_config_from_diffusion
    from ddpmkit.models.loading import image_shape

    _, height, width = image_shape(config)
    unet_config = unet_config_from_model(config["model"], [height, width])
    scheduler_config = scheduler_config_from_diffusion(config.get("diffusion") or {})
    tensors = state_dict_to_diffusers(state_dict, config["model"])
    write_folder_atomically(
        out, lambda tmp: write_pipeline_folder(tmp, unet_config, tensors, scheduler_config))
    return len(tensors)


def export_checkpoint(checkpoint: str, out: str, fmt: str, use_ema: bool | None = None,
                      overwrite: bool = False, config: Mapping[str, Any] | None = None
                      ) -> ExportResult:
    """Export `checkpoint` (anything `--chkpt-path` accepts) to `out` in format `fmt`.

    `use_ema`: None takes the EMA weights when present; `config` gives the architecture of
    files that carry none (the reference project's).
    """
    from ddpmkit.interop.safetensors_format import save_weights
    from ddpmkit.interop.sources import load_checkpoint_any, resolve_checkpoint
    from ddpmkit.models.loading import load_model_dict

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    check_output(out, fmt, overwrite, inputs=(os.path.expanduser(checkpoint),))
    ckpt = load_checkpoint_any(resolve_checkpoint(checkpoint))
    model, config, entry = load_model_dict(ckpt, config, use_ema, "cpu", repr(checkpoint))
    weights = "unlabelled" if entry == "bare state dict" else ckpt.get("weights") or entry
    state_dict = model.state_dict()
    where = out if fmt == "diffusers" else os.path.dirname(os.path.abspath(out))
    check_free_space(where, "output folder", sum(t.numel() * t.element_size()
                                                 for t in state_dict.values()), "the export")
    if fmt == "safetensors":
        save_weights(out, state_dict, config, weights)
        count = len(state_dict)
    else:
        count = _export_diffusers(out, state_dict, config)
    log.info("exported %s weights of %s to %s (%s)", weights, checkpoint, out, fmt)
    return ExportResult(os.path.abspath(out), fmt, weights, count)
