"""Where a sample run's network comes from: the checkpoint, its weights, its class guidance."""
from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

from ddpmkit.checkpoints.files import CheckpointFiles, newest_file
from ddpmkit.config import architecture_config
from ddpmkit.config.sample import SampleConfig
from ddpmkit.errors import UserError
from ddpmkit.interop.sources import load_checkpoint_any, resolve_checkpoint
from ddpmkit.models.loading import checkpoint_config, load_model_dict
from ddpmkit.sampling.labels import DEFAULT_GUIDANCE_SCALE, Guidance, class_labels

log = logging.getLogger(__name__)


def checkpoint_path(checkpoint: str, chkpt_dir: str, dataset: str) -> str:
    """`checkpoint` (a file, a diffusers folder, or a Hub id: see ddpmkit.interop.sources);
    else <chkpt_dir>/ddpm_<dataset>.pt (the reference's name), else the checkpoint holding the
    highest training step among <chkpt_dir>/<dataset>/ddpm_<dataset>_*.pt (what a default
    `ddpmkit train` writes) and <chkpt_dir>/ddpm_<dataset>_*.pt."""
    if checkpoint:
        return resolve_checkpoint(checkpoint)
    folder = os.path.expanduser(chkpt_dir)
    path = os.path.join(folder, f"ddpm_{dataset}.pt")
    if os.path.isfile(path):
        return path
    prefix = f"ddpm_{dataset}"
    run_folder = os.path.join(folder, dataset)
    latest = newest_file(CheckpointFiles(run_folder, prefix).all()
                         + CheckpointFiles(folder, prefix).all())
    if latest is None:
        raise UserError(f"no checkpoint found: neither {path} nor {prefix}_*.pt in "
                        f"{run_folder} or {folder}; pass --chkpt-path FILE")
    log.info("using the checkpoint with the highest step, %s", latest)
    return latest


def config_checkpoint_path(config: SampleConfig) -> str:
    return checkpoint_path(config.checkpoint, config.chkpt_dir, config.dataset_or_default)


class SampleModel(NamedTuple):
    """The network of a sample run and what the manifest records about it."""
    model: Any            # nn.Module in eval mode on the run's device
    config: dict          # its resolved config (dataset / diffusion / model sections)
    path: str             # the checkpoint it came from
    weights: str          # "ema", "model" or "bare state dict" (`choose_weights`)
    dataset: str          # names the sample folder


def load_sample_model(config: SampleConfig, device) -> SampleModel:
    """The checkpoint's network with its own config, else --config-path's / the dataset's;
    the EMA weights when the file has them unless `use_ema` is False."""
    path = config_checkpoint_path(config)
    ckpt = load_checkpoint_any(path)
    has_config = checkpoint_config(ckpt) is not None
    fallback = None
    if has_config and config.config_path:
        log.warning("%s carries its own config; --config-path is not used", path)
    elif not has_config:
        if config.dataset is None and not config.config_path:
            log.info("the checkpoint has no config: assuming the %s architecture "
                     "(pass --dataset or --config-path otherwise)", config.dataset_or_default)
        fallback = architecture_config(config.dataset_or_default, config.config_path,
                                       config.config_dir)
    model, resolved, weights = load_model_dict(
        ckpt, fallback, config.use_ema, device, repr(path),
        group_norm_eps=config.group_norm_eps, action="sampling")
    dataset = (resolved.get("dataset") or {}).get("name") or config.dataset_or_default
    if has_config and config.dataset is not None and config.dataset != dataset:
        raise UserError(f"--dataset {config.dataset} but {path} was trained on {dataset}")
    return SampleModel(model, resolved, path, weights, dataset)


def class_guidance(config: SampleConfig, loaded: SampleModel, net, diffusion) -> Guidance | None:
    """The `Guidance` of a class-conditional model (labels from `class_labels`, scale from
    `guidance_scale`), or None for an unconditional one, which refuses both."""
    num_classes = getattr(loaded.model, "num_classes", None)
    if num_classes is None:
        given = [f for f, v in (("--class-label", config.class_labels),
                                ("--guidance-scale", config.guidance_scale)) if v is not None]
        if given:
            raise UserError(f"{' and '.join(given)} need a class-conditional model, but this "
                            "checkpoint is unconditional; drop them")
        return None
    names = (loaded.config.get("dataset") or {}).get("class_names")
    labels = class_labels(num_classes, config.class_labels, names)
    scale = DEFAULT_GUIDANCE_SCALE if config.guidance_scale is None else config.guidance_scale
    return Guidance(net, labels, float(scale), diffusion.model_var_type == "learned")
