"""One process's share of a sample run: load the network, check the folder's manifest, write
its samples (and, on the main process, the animation)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ddpmkit.build import build_diffusion
from ddpmkit.config.sample import SampleConfig
from ddpmkit.diffusion.samplers import make_sampler
from ddpmkit.errors import UserError
from ddpmkit.interop.sources import checkpoint_digest
from ddpmkit.models.loading import image_shape
from ddpmkit.runtime.devices import resolve_precision
from ddpmkit.runtime.distributed import process_device
from ddpmkit.sampling.denoiser import make_denoise_fn
from ddpmkit.sampling.folder import (
    MANIFEST_NAME,
    check_manifest,
    existing_samples,
    generate_to_folder,
    write_labels_file,
)
from ddpmkit.sampling.noise import NOISE_VERSION, DistEnv, sample_indexed
from ddpmkit.sampling.source import SampleModel, class_guidance, load_sample_model
from ddpmkit.utils.images import FrameRecorder, save_animation
from ddpmkit.utils.io import check_replaceable_file, check_writable_folder

log = logging.getLogger(__name__)

# Frames kept in an animation at most (DDPM has 1000 steps; a few seconds of video is enough).
MAX_ANIMATION_FRAMES = 100


@dataclass(frozen=True)
class OutputPaths:
    folder: str      # <save_dir>/<dataset><suffix>: the PNGs, manifest and labels
    grid: str
    animation: str


def output_paths(config: SampleConfig, dataset: str) -> OutputPaths:
    name = f"{dataset}{config.suffix}"
    save_dir = os.path.expanduser(config.save_dir)
    return OutputPaths(os.path.join(save_dir, name), os.path.join(save_dir, f"{name}_grid.png"),
                       os.path.join(save_dir, f"{name}_denoise.{config.animate_format}"))


@dataclass(frozen=True)
class ShareResult:
    written: int
    skipped: int
    seconds: float
    dataset: str
    stopped: bool
    signum: int | None = None  # the stop signal that ended it early


def check_side_files(config: SampleConfig, paths: OutputPaths) -> None:
    """The grid and animation files beside the sample folder are replaced only when an earlier
    run of this command wrote them: its sample folder holds the manifest."""
    ours = os.path.isfile(os.path.join(paths.folder, MANIFEST_NAME))
    for flag, wanted, path in (("grid", config.grid, paths.grid),
                               ("animate", config.animate, paths.animation)):
        if wanted:
            check_replaceable_file(path, f"--{flag} output", lambda _: ours)


def build_sampler(config: SampleConfig, diffusion, device):
    """The sampler the config asks for, after the checks that need the device."""
    try:
        sampler = make_sampler(diffusion, config.sampler, steps=config.sampler_steps,
                               eta=config.eta, skip_schedule=config.skip_schedule,
                               eps_from=config.ddim_eps_from, step_to=config.ddim_step_to)
    except ValueError as exc:
        raise UserError(f"--sampler {config.sampler}: {exc}") from exc
    first = int(max(sampler.timesteps))
    if diffusion.zero_terminal_snr and first < diffusion.T - 1:
        log.warning("this model has zero terminal SNR (x_T is pure noise), but --skip-schedule "
                    "%s starts at t = %d, where it was trained on images with signal left; "
                    "--skip-schedule trailing starts at t = %d (Lin et al. 2024)",
                    config.skip_schedule, first, diffusion.T - 1)
    if config.cuda_graph and config.compile == "reduce-overhead":
        raise UserError("--cuda-graph and --compile reduce-overhead both replay CUDA graphs; "
                        "use one of them")
    if config.cuda_graph and device.type != "cuda":
        raise UserError(f"--cuda-graph needs a CUDA device, but this run uses {device}; "
                        "drop --cuda-graph or pass --device cuda")
    return sampler


def manifest_settings(config: SampleConfig, loaded: SampleModel, sampler, precision: str,
                      shape, guidance) -> dict[str, Any]:
    """What decides the images, recorded in the folder's manifest (generation.json)."""
    settings = {
        "checkpoint_sha256": checkpoint_digest(loaded.path), "use_ema": loaded.weights == "ema",
        "sampler": config.sampler, "steps": getattr(sampler, "steps", len(sampler.timesteps)),
        "eta": config.eta,
        "skip_schedule": config.skip_schedule, "seed": config.seed, "precision": precision,
        "image_shape": list(shape), "noise": NOISE_VERSION,
    }
    if config.sampler == "ddim":  # what `linear` means changed once: record the steps themselves
        settings.update(timesteps=sampler.timesteps.tolist(), ddim_eps_from=sampler.eps_from,
                        ddim_step_to=sampler.step_to)
    elif config.sampler not in ("ddpm", "dpm-solver++"):  # (those two keep their old manifests)
        settings.update(timesteps=sampler.timesteps.tolist())
    if guidance is not None:  # only then: unconditional folders keep their manifests
        settings.update({"class_labels": list(guidance.labels.classes),
                         "labels": guidance.labels.rule, "guidance_scale": guidance.scale})
    return settings


def run_share(config: SampleConfig, env: DistEnv,
              should_stop: Callable[[], bool] | None = None) -> ShareResult:
    """This process's share of the samples (and, on the main process, the animation);
    `should_stop()` ends it after the current batch (a stop signal)."""
    check_writable_folder(config.save_dir, "--save-dir")
    device = process_device(config.device, env)
    loaded = load_sample_model(config, device)
    diffusion = build_diffusion(loaded.config.get("diffusion") or {})
    sampler = build_sampler(config, diffusion, device)
    precision = resolve_precision(config.precision, device)
    if env.is_main:
        log.info("precision %s (%s)", precision.name, precision.reason)
    denoise_fn = make_denoise_fn(loaded.model, precision.name, device, config.channels_last,
                                 config.compile, cuda_graph=config.cuda_graph)
    guidance = class_guidance(config, loaded, denoise_fn, diffusion)
    shape = image_shape(loaded.config)
    paths = output_paths(config, loaded.dataset)
    settings = manifest_settings(config, loaded, sampler, precision.name, shape, guidance)
    check_side_files(config, paths)
    check_manifest(paths.folder, settings, write=env.is_main)
    if guidance is not None and env.is_main:
        count = max([config.total_size, *(i + 1 for i in existing_samples(paths.folder))])
        write_labels_file(paths.folder, guidance.labels, count,
                          (loaded.config.get("dataset") or {}).get("class_names"))
    if env.is_main:
        log.info("%s sampler, %d steps, %d samples of %s -> %s (%d process(es), %s)",
                 config.sampler, len(sampler.timesteps), config.total_size,
                 "x".join(map(str, shape)), paths.folder, env.world_size, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net = guidance if guidance is not None else denoise_fn
    result = generate_to_folder(
        diffusion, net, sampler, shape, paths.folder, config.total_size, config.batch_size,
        config.seed, device, env, max_workers=config.max_workers,
        progress=env.is_main and config.progress, should_stop=should_stop)
    if config.animate and env.is_main and not result.stopped:
        animate(config, diffusion, net, sampler, shape, device, paths.animation)
    return ShareResult(result.written, result.skipped, result.seconds, loaded.dataset,
                       result.stopped)


def animate(config: SampleConfig, diffusion, denoise_fn, sampler, shape, device,
            path: str) -> None:
    """The denoising of the first samples as an animation (main process)."""
    count = min(config.animate_count, config.total_size)
    recorder = FrameRecorder(len(sampler.timesteps), count, config.animate_target,
                             MAX_ANIMATION_FRAMES)
    sample_indexed(diffusion, denoise_fn, sampler, range(count), shape, config.seed, device,
                   callback=recorder)
    save_animation(path, recorder.frames)
    log.info("wrote %s (%d frames)", path, len(recorder.frames))
