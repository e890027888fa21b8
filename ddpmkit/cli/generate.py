"""`ddpmkit generate` (and `python generate.py`): sample images from a checkpoint into a folder.

Output (the reference's layout, `python eval.py --folder-name <dataset><suffix>` reads it):
    <save-dir>/<dataset><suffix>/000000.png ... (one uint8 PNG per sample, named by its index)
    <save-dir>/<dataset><suffix>/generation.json  (the settings that decide the images)
    <save-dir>/<dataset><suffix>_grid.png         (--grid)
    <save-dir>/<dataset><suffix>_denoise.webp     (--animate; or .gif)
Sample i is a pure function of (checkpoint, sampler settings, --seed, i): any batch size and
any number of processes give the same images, and a rerun only makes the missing files.

Class-conditional checkpoints: sample i asks for class `--class-label`'s entry i mod n (by
default every class in turn), sampled with classifier-free guidance of scale
`--guidance-scale`; `<dataset><suffix>/labels.csv` lists each file's label, and `--grid` puts
one class per row.

Processes: one; `torchrun --nproc_per_node N -m ddpmkit.cli generate ...` (rank r makes samples
r, r + N, ...; gloo is used only for a final barrier); or the reference's `--num-gpus N`, which
spawns N processes on cuda:0..N-1 (on a machine without CUDA, pass `--device cpu` to run N CPU
processes instead).

`--precision` (default auto) picks bf16 autocast (the sampler's arithmetic stays float32) on
GPUs that support it and on CPUs with native bf16 (AVX512-BF16 / AMX), fp16 autocast on older
GPUs (compute capability below 8.0), else fp32: CPUs without native bf16 emulate it, 3-100x
slower than fp32. What the default costs (measured on a CPU with native bf16, where auto is
bf16): with the reference's CIFAR-10 checkpoint, `--precision fp32` writes the reference's PNGs
bit for bit, while bf16 changes DDIM-5 samples on 7.8% of pixels by up to 41 levels and
DDPM-1000 samples on 27% by up to 6; quality is the same (a conditional MNIST model's 1,000
DDIM-50 samples show the requested digit 96.8% of the time in bf16, 97.0% in fp32) and bf16 is
2.3x faster. Use fp32 to reproduce another tool's images exactly.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import timedelta
from typing import Any

from ddpmkit.choices import (
    ANIMATION_FORMATS,
    DDIM_EPS_SOURCES,
    DDIM_STEP_TARGETS,
    IMAGE_DATASETS,
    PRECISIONS,
    SAMPLERS,
    SKIP_SCHEDULES,
)
from ddpmkit.cli import (
    CLIParser,
    add_speed_flags,
    add_weights_flags,
    run_guarded,
    setup_logging,
    weights_choice,
)
from ddpmkit.config import architecture_config, parse_with_explicit
from ddpmkit.errors import UserError, signal_name

# torch and the sampling code are imported inside the functions that use them, so that
# `--help` and flag errors need no torch.

log = logging.getLogger(__name__)

DEFAULT_DATASET = "cifar10"
# Steps when --steps / --subseq-size is not given (DDIM: the reference's --subseq-size default).
# The other solvers take make_sampler's: 20 steps, heun 10 (19 network evaluations).
DEFAULT_STEPS = {"ddim": 50, "dpm-solver++": 20}
# Frames kept in an animation at most (DDPM has 1000 steps; a few seconds of video is enough).
MAX_ANIMATION_FRAMES = 100
# Long enough for the slowest process to finish its share after a resume, however uneven.
BARRIER_TIMEOUT = timedelta(days=7)


def build_parser() -> argparse.ArgumentParser:
    p = CLIParser(prog="ddpmkit generate",
                description="Generate samples from a trained checkpoint (DDPM, DDIM, "
                            "DPM-Solver++, UniPC, Heun, Euler ancestral), one PNG per sample.")
    p.add_argument("--dataset", choices=IMAGE_DATASETS, default=DEFAULT_DATASET,
                   help="dataset the model was trained on: names the output folder, and picks "
                        "configs/<dataset>.json for checkpoints without a config")
    p.add_argument("--batch-size", type=int, default=128, help="samples per batch and process")
    p.add_argument("--total-size", type=int, default=50000, help="number of samples")
    p.add_argument("--config-dir", default="./configs",
                   help="folder of <dataset>.json configs (falls back to the shipped ones)")
    p.add_argument("--config-path", default="",
                   help="config file giving the architecture of a checkpoint without a config")
    p.add_argument("--chkpt-dir", default="./chkpts",
                   help="folder of ddpm_<dataset>.pt, used when --chkpt-path is not given")
    p.add_argument("--chkpt-path", default="",
                   help="checkpoint file (ddpmkit's, the reference's, .safetensors), diffusers "
                        "model or pipeline folder, or Hugging Face Hub id (needs "
                        "huggingface_hub)")
    p.add_argument("--save-dir", default="./images/eval",
                   help="the sample folder <dataset><suffix> is created in here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_weights_flags(p, "use")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm: ancestral, all T steps; ddim: --steps of them, --eta noise; "
                        "dpm-solver++ (2M), dpm-solver++3m, unipc2, unipc3: multistep ODE "
                        "solvers for 10-25 steps; dpm-solver++2m-sde, euler-ancestral: "
                        "stochastic; heun: 2nd order, 2 network calls per step (1 on the last)")
    p.add_argument("--use-ddim", action="store_true", help="same as --sampler ddim")
    p.add_argument("--steps", "--subseq-size", dest="steps", type=int, default=None,
                   help="sampling steps of every sampler but ddpm (default 50 for ddim, 10 "
                        "for heun, 20 for the others); --subseq-size is the reference's name")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM noise scale: 0 deterministic, 1 like DDPM")
    p.add_argument("--skip-schedule", choices=SKIP_SCHEDULES, default=None,
                   help="how ddim and the solvers space their steps: linear (0, T/S, 2T/S, ...) "
                   "and quadratic as the reference and the DDIM paper; linspace, leading, "
                   "trailing as diffusers; karras: Karras et al.'s rho = 7 (default: linear "
                   "for ddim, quadratic over [0, T-1] for the solvers)")
    p.add_argument("--ddim-eps-from", choices=DDIM_EPS_SOURCES, default=None,
                   help="the eps a DDIM step uses once x_0 is clipped: re-derived from the "
                        "clipped x_0 (clipped, the default) or the network's own (model, as "
                        "diffusers' DDIMPipeline)")
    p.add_argument("--ddim-step-to", choices=DDIM_STEP_TARGETS, default=None,
                   help="where a DDIM step lands: the next evaluated timestep (next, the "
                        "default) or t - T // S (stride, as diffusers' DDIMScheduler)")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i's noise is a function of (seed, i)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="class-conditional models: classifier-free guidance scale w, "
                        "eps = (1 + w) eps(x_t, y) - w eps(x_t, no class); 0 is the plain "
                        "conditional model (default 1)")
    p.add_argument("--class-label", default=None, metavar="N[,N...]",
                   help="class-conditional models: the class to sample, or a comma list "
                        "(sample i takes entry i mod n); numbers or class names (default: "
                        "every class in turn)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="network precision (bf16, fp16: autocast, the sampler stays float32; "
                        "auto: bf16 on GPUs that support it and on CPUs with native bf16, fp16 "
                        "on older GPUs, else fp32). Only fp32 reproduces another tool's images "
                        "bit for bit: on the reference's CIFAR-10 model bf16 changes DDIM-5 "
                        "samples on 7.8%% of pixels by up to 41 levels (DDPM-1000: 27%%, up to "
                        "6), at the same quality and 2.3x the speed on a CPU with native bf16")
    add_speed_flags(p, "network (on CPUs with its weights frozen in: 1.2-1.3x there)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the network as a CUDA graph (CUDA only; pays off for small "
                        "batches, where launching kernels is the bottleneck)")
    p.add_argument("--suffix", default="", help="appended to the dataset name in the folder name")
    p.add_argument("--max-workers", type=int, default=8,
                   help="threads encoding and writing PNGs (0: write inline)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="spawn this many processes, one per GPU (or per CPU share with "
                        "--device cpu); with torchrun leave it at 1")
    p.add_argument("--grid", action="store_true",
                   help="also write <save-dir>/<dataset><suffix>_grid.png")
    p.add_argument("--grid-size", type=int, default=64, help="samples in the grid")
    p.add_argument("--animate", action="store_true",
                   help="also write an animation of the denoising of the first samples")
    p.add_argument("--animate-format", choices=ANIMATION_FORMATS, default="webp",
                   help="animation file type (webp: lossless and small; gif: 256 colours)")
    p.add_argument("--animate-count", type=int, default=8, help="samples in the animation")
    p.add_argument("--animate-target", choices=("x_0", "x_t"), default="x_0",
                   help="show the predicted clean image (x_0) or the noisy state (x_t)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ---- checks and resolution ---------------------------------------------------------------
def check_args(args: argparse.Namespace, typed: set[str]) -> None:
    """Every flag value is checked before any work starts; errors name the flag."""
    for flag, value, low in (("--total-size", args.total_size, 1),
                             ("--batch-size", args.batch_size, 1),
                             ("--num-gpus", args.num_gpus, 1),
                             ("--max-workers", args.max_workers, 0),
                             ("--grid-size", args.grid_size, 1),
                             ("--animate-count", args.animate_count, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.use_ddim:
        if "sampler" in typed and args.sampler != "ddim":
            raise UserError(f"--use-ddim contradicts --sampler {args.sampler}")
        args.sampler = "ddim"
    if args.steps is not None:
        if args.sampler == "ddpm":
            raise UserError("--steps / --subseq-size apply to every sampler but ddpm, which "
                            "uses all T steps")
        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
    if not 0 <= args.eta < float("inf"):
        raise UserError(f"--eta must be a finite number >= 0, got {args.eta}")
    weights_choice(args)
    if "eta" in typed and args.sampler != "ddim" and args.eta != 0:
        raise UserError(f"--eta applies to ddim only, not to {args.sampler}")
    if (args.ddim_eps_from or args.ddim_step_to) and args.sampler != "ddim":
        raise UserError(f"--ddim-eps-from / --ddim-step-to apply to ddim only, not to "
                        f"{args.sampler}")
    if args.guidance_scale is not None and not 0 <= args.guidance_scale < float("inf"):
        raise UserError(f"--guidance-scale must be a finite number >= 0, got "
                        f"{args.guidance_scale}")
    if args.class_label is not None and not [v for v in args.class_label.split(",") if v.strip()]:
        raise UserError("--class-label needs a class number or name, or a comma list of them")


def checkpoint_path(args: argparse.Namespace) -> str:
    """--chkpt-path (a file, a diffusers folder, or a Hub id: see ddpmkit.interop.sources);
    else <chkpt-dir>/ddpm_<dataset>.pt (the reference's name), else the checkpoint holding the
    highest training step among <chkpt-dir>/<dataset>/ddpm_<dataset>_*.pt (what a default
    `ddpmkit train` writes) and <chkpt-dir>/ddpm_<dataset>_*.pt."""
    from ddpmkit.checkpoints.files import CheckpointFiles, newest_file
    from ddpmkit.interop.sources import resolve_checkpoint

    if args.chkpt_path:
        return resolve_checkpoint(args.chkpt_path)
    folder = os.path.expanduser(args.chkpt_dir)
    path = os.path.join(folder, f"ddpm_{args.dataset}.pt")
    if os.path.isfile(path):
        return path
    prefix = f"ddpm_{args.dataset}"
    run_folder = os.path.join(folder, args.dataset)
    latest = newest_file(CheckpointFiles(run_folder, prefix).all()
                         + CheckpointFiles(folder, prefix).all())
    if latest is None:
        raise UserError(f"no checkpoint found: neither {path} nor {prefix}_*.pt in "
                        f"{run_folder} or {folder}; pass --chkpt-path FILE")
    log.info("using the checkpoint with the highest step, %s", latest)
    return latest


def fallback_config(args: argparse.Namespace, typed: set[str]) -> dict[str, Any]:
    """The architecture for files that carry no config: --config-path, else <dataset>.json."""
    if "dataset" not in typed and not args.config_path:
        log.info("the checkpoint has no config: assuming the %s architecture "
                 "(pass --dataset or --config-path otherwise)", args.dataset)
    return architecture_config(args.dataset, args.config_path, args.config_dir)


def class_guidance(args: argparse.Namespace, model, config: dict[str, Any], net, diffusion):
    """The `Guidance` of a class-conditional model (labels from --class-label, scale from
    --guidance-scale), or None for an unconditional one, which refuses both flags."""
    from ddpmkit.generation import DEFAULT_GUIDANCE_SCALE, Guidance, class_labels

    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        given = [f for f, v in (("--class-label", args.class_label),
                                ("--guidance-scale", args.guidance_scale)) if v is not None]
        if given:
            raise UserError(f"{' and '.join(given)} need a class-conditional model, but this "
                            "checkpoint is unconditional; drop them")
        return None
    names = (config.get("dataset") or {}).get("class_names")
    requested = args.class_label.split(",") if args.class_label is not None else None
    labels = class_labels(num_classes, requested, names)
    scale = DEFAULT_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale
    return Guidance(net, labels, float(scale), diffusion.model_var_type == "learned")


def output_paths(args: argparse.Namespace, dataset: str) -> dict[str, str]:
    name = f"{dataset}{args.suffix}"
    save_dir = os.path.expanduser(args.save_dir)
    return {
        "folder": os.path.join(save_dir, name),
        "grid": os.path.join(save_dir, f"{name}_grid.png"),
        "animation": os.path.join(save_dir, f"{name}_denoise.{args.animate_format}"),
    }


# ---- one process -------------------------------------------------------------------------
def check_side_files(args: argparse.Namespace, paths: dict[str, str]) -> None:
    """The grid and animation files beside the sample folder are replaced only when an earlier
    run of this command wrote them: its sample folder holds the manifest."""
    from ddpmkit.generation import MANIFEST_NAME
    from ddpmkit.utils.io import check_replaceable_file

    ours = os.path.isfile(os.path.join(paths["folder"], MANIFEST_NAME))
    for flag, key in (("grid", "grid"), ("animate", "animation")):
        if getattr(args, flag):
            check_replaceable_file(paths[key], f"--{flag} output", lambda _: ours)


def _load_model(args: argparse.Namespace, typed: set[str], device):
    """(model, config, checkpoint path, which weights) for this run: the checkpoint's own
    config, else --config-path / the dataset's; EMA weights when the file has them unless
    --no-ema."""
    from ddpmkit.interop.sources import load_checkpoint_any
    from ddpmkit.models.loading import checkpoint_config, choose_weights, model_from_checkpoint_dict

    path = checkpoint_path(args)
    ckpt = load_checkpoint_any(path)
    has_config = checkpoint_config(ckpt) is not None
    config = None if has_config else fallback_config(args, typed)
    if has_config and args.config_path:
        log.warning("%s carries its own config; --config-path is not used", path)
    use_ema = weights_choice(args)
    weights = choose_weights(ckpt, use_ema, repr(path))
    model, config = model_from_checkpoint_dict(ckpt, config, use_ema, device, repr(path),
                                               group_norm_eps=args.group_norm_eps,
                                               action="sampling")
    dataset = (config.get("dataset") or {}).get("name") or args.dataset
    if has_config and "dataset" in typed and args.dataset != dataset:
        raise UserError(f"--dataset {args.dataset} but {path} was trained on {dataset}")
    return model, config, path, weights


def _sampler(args: argparse.Namespace, diffusion, device):
    """The sampler the flags ask for, after the checks that need the device."""
    from ddpmkit.diffusion.samplers import make_sampler

    steps = args.steps or DEFAULT_STEPS.get(args.sampler)
    try:
        sampler = make_sampler(diffusion, args.sampler, steps=steps, eta=args.eta,
                               skip_schedule=args.skip_schedule, eps_from=args.ddim_eps_from,
                               step_to=args.ddim_step_to)
    except ValueError as exc:
        raise UserError(f"--sampler {args.sampler}: {exc}") from exc
    if args.cuda_graph and args.compile == "reduce-overhead":
        raise UserError("--cuda-graph and --compile reduce-overhead both replay CUDA graphs; "
                        "use one of them")
    if args.cuda_graph and device.type != "cuda":
        raise UserError(f"--cuda-graph needs a CUDA device, but this run uses {device}; "
                        "drop --cuda-graph or pass --device cuda")
    return sampler


def _settings(args, path, weights, sampler, precision: str, shape) -> dict[str, Any]:
    """What decides the images, recorded in the folder's manifest (generation.json)."""
    from ddpmkit.generation import NOISE_VERSION
    from ddpmkit.interop.sources import checkpoint_digest

    settings = {
        "checkpoint_sha256": checkpoint_digest(path), "use_ema": weights == "ema",
        "sampler": args.sampler, "steps": getattr(sampler, "steps", len(sampler.timesteps)),
        "eta": args.eta,
        "skip_schedule": args.skip_schedule, "seed": args.seed, "precision": precision,
        "image_shape": list(shape), "noise": NOISE_VERSION,
    }
    if args.sampler == "ddim":  # what `linear` means changed once: record the steps themselves
        settings.update(timesteps=sampler.timesteps.tolist(), ddim_eps_from=sampler.eps_from,
                        ddim_step_to=sampler.step_to)
    elif args.sampler not in ("ddpm", "dpm-solver++"):  # (those two keep their old manifests)
        settings.update(timesteps=sampler.timesteps.tolist())
    return settings


def run_process(args: argparse.Namespace, typed: set[str], env,
                should_stop=None) -> dict[str, Any]:
    """This process's share of the samples (and, on rank 0, the animation); `should_stop()`
    ends it after the current batch (a stop signal)."""
    import torch

    from ddpmkit.build import build_diffusion
    from ddpmkit.generation import (
        check_manifest,
        existing_samples,
        generate_to_folder,
        make_denoise_fn,
        write_labels_file,
    )
    from ddpmkit.models.loading import image_shape
    from ddpmkit.runtime.devices import resolve_precision
    from ddpmkit.runtime.distributed import process_device
    from ddpmkit.utils.io import check_writable_folder

    check_writable_folder(args.save_dir, "--save-dir")
    device = process_device(args.device, env)
    model, config, path, weights = _load_model(args, typed, device)
    dataset = (config.get("dataset") or {}).get("name") or args.dataset
    diffusion = build_diffusion(config.get("diffusion") or {})
    sampler = _sampler(args, diffusion, device)
    precision = resolve_precision(args.precision, device)
    if env.is_main:
        log.info("precision %s (%s)", precision.name, precision.reason)
    denoise_fn = make_denoise_fn(model, precision.name, device, bool(args.channels_last),
                                 args.compile, cuda_graph=args.cuda_graph)
    guidance = class_guidance(args, model, config, denoise_fn, diffusion)
    if guidance is not None:
        denoise_fn = guidance
    shape = image_shape(config)
    paths = output_paths(args, dataset)
    settings = _settings(args, path, weights, sampler, precision.name, shape)
    if guidance is not None:  # only then: unconditional folders keep their manifests
        settings.update({"class_labels": list(guidance.labels.classes),
                         "labels": guidance.labels.rule, "guidance_scale": guidance.scale})
    check_side_files(args, paths)
    check_manifest(paths["folder"], settings, write=env.is_main)
    if guidance is not None and env.is_main:
        count = max([args.total_size, *(i + 1 for i in existing_samples(paths["folder"]))])
        write_labels_file(paths["folder"], guidance.labels, count,
                          (config.get("dataset") or {}).get("class_names"))
    if env.is_main:
        log.info("%s sampler, %d steps, %d samples of %s -> %s (%d process(es), %s)",
                 args.sampler, len(sampler.timesteps), args.total_size, "x".join(map(str, shape)),
                 paths["folder"], env.world_size, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = generate_to_folder(
        diffusion, denoise_fn, sampler, shape, paths["folder"], args.total_size,
        args.batch_size, args.seed, device, env, max_workers=args.max_workers,
        progress=env.is_main and not args.no_progress, should_stop=should_stop)
    if args.animate and env.is_main and not result.stopped:
        _animate(args, diffusion, denoise_fn, sampler, shape, device, paths["animation"])
    return {"written": result.written, "skipped": result.skipped, "seconds": result.seconds,
            "dataset": dataset, "stopped": result.stopped}


def _animate(args, diffusion, denoise_fn, sampler, shape, device, path: str) -> None:
    """The denoising of the first samples as an animation (main process)."""
    from ddpmkit.generation import sample_indexed
    from ddpmkit.utils.images import FrameRecorder, save_animation

    count = min(args.animate_count, args.total_size)
    recorder = FrameRecorder(len(sampler.timesteps), count, args.animate_target,
                             MAX_ANIMATION_FRAMES)
    sample_indexed(diffusion, denoise_fn, sampler, range(count), shape, args.seed, device,
                   callback=recorder)
    save_animation(path, recorder.frames)
    log.info("wrote %s (%d frames)", path, len(recorder.frames))


def finish(args: argparse.Namespace, dataset: str, written: int, seconds: float) -> None:
    """After every process is done: the grid and a one-line summary (main process only)."""
    import numpy as np

    from ddpmkit.generation import (
        class_grid_indices,
        count_samples,
        existing_samples,
        first_samples,
        sample_path,
    )
    from ddpmkit.utils.images import read_image_uint8, save_grid

    paths = output_paths(args, dataset)
    present = count_samples(paths["folder"], args.total_size)
    extra = len(existing_samples(paths["folder"])) - present
    if extra:
        log.warning("%s also holds %d samples numbered >= --total-size (an earlier, larger run); "
                    "`eval` reads every image in the folder", paths["folder"], extra)
    if args.grid:
        rows = _class_rows(paths["folder"])
        if rows > 1:  # one class per row
            indices, cols = class_grid_indices(rows, args.grid_size, args.total_size)
            files = [sample_path(paths["folder"], i) for i in indices]
        else:
            files, cols = first_samples(paths["folder"], min(args.grid_size, args.total_size)), None
        save_grid(paths["grid"], np.stack([read_image_uint8(f) for f in files]), nrow=cols)
        log.info("wrote %s", paths["grid"])
    rate = f" ({written / seconds:.2f} img/s)" if written and seconds > 0 else ""
    print(f"{present} of {args.total_size} samples in {paths['folder']}; "
          f"{written} new in {seconds:.1f} s{rate}")
    if present != args.total_size:
        raise UserError(f"only {present} of {args.total_size} samples exist in "
                        f"{paths['folder']}; run the same command again to finish")


def _class_rows(folder: str) -> int:
    """Entries of the class-labels plan recorded in the folder's manifest (0: unconditional)."""
    import json

    from ddpmkit.generation import MANIFEST_NAME

    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as f:
            return len(json.load(f).get("class_labels") or [])
    except (OSError, ValueError):
        return 0


# ---- process layouts ---------------------------------------------------------------------
def _process(args: argparse.Namespace, typed: set[str], env) -> dict[str, Any]:
    """This process's share, ended after the current batch by a SIGTERM or Ctrl-C (a second
    Ctrl-C aborts at once; finished files are whole, and a rerun makes the rest)."""
    from ddpmkit.runtime.stops import StopFlag

    with StopFlag(announce=env.is_main) as stop:
        result = run_process(args, typed, env, should_stop=lambda: stop.signum is not None)
    result["signum"] = stop.signum if result["stopped"] else None
    return result


def _spawned_share(args: argparse.Namespace, typed: set[str], world: int) -> dict[str, Any]:
    """Body of one `--num-gpus` process (its RANK etc. are set by the spawn)."""
    import torch

    from ddpmkit.generation import dist_env_from_environ
    from ddpmkit.runtime.distributed import process_device

    env = dist_env_from_environ()
    if process_device(args.device, env).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return _process(args, typed, env)


def _conclude(args: argparse.Namespace, dataset: str, written: int, seconds: float,
              signum: int | None) -> int:
    """The summary (main process): the grid and totals, or how to finish a stopped run."""
    if signum:
        from ddpmkit.generation import count_samples
        from ddpmkit.runtime.stops import exit_code

        folder = output_paths(args, dataset)["folder"]
        print(f"stopped by {signal_name(signum)}: {count_samples(folder, args.total_size)} of "
              f"{args.total_size} samples in {folder}; run the same command again to finish")
        return exit_code(signum)
    finish(args, dataset, written, seconds)
    return 0


def _spawn(args: argparse.Namespace, typed: set[str]) -> int:
    from ddpmkit.runtime.distributed import check_spawn_devices, spawn

    check_spawn_devices(args.num_gpus, args.device, "--device")
    checkpoint_path(args)  # fail here, once, rather than in every process
    start = time.perf_counter()
    results = spawn(_spawned_share, args.num_gpus, (args, typed, args.num_gpus))
    signum = next((r["signum"] for r in results if r["signum"]), None)
    return _conclude(args, results[0]["dataset"], sum(r["written"] for r in results),
                     time.perf_counter() - start, signum)


def _torchrun(args: argparse.Namespace, typed: set[str], env) -> int:
    import torch
    import torch.distributed as dist

    from ddpmkit.runtime.stops import exit_code

    if args.num_gpus > 1:
        raise UserError("--num-gpus spawns processes itself; under torchrun leave it at 1 and "
                        "use --nproc_per_node")
    if env.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)  # only for the final barrier
    try:
        start = time.perf_counter()
        result = _process(args, typed, env)
        totals = torch.tensor([result["written"], result["signum"] or 0], dtype=torch.long)
        # Also the barrier: every process has finished (or stopped) its share.
        dist.all_reduce(totals[:1])
        dist.all_reduce(totals[1:], op=dist.ReduceOp.MAX)
        if env.is_main:
            return _conclude(args, result["dataset"], int(totals[0]),
                             time.perf_counter() - start, int(totals[1]) or None)
        return exit_code(int(totals[1])) if int(totals[1]) else 0
    finally:
        dist.destroy_process_group()


def generate(argv: list[str] | None = None) -> int:
    args, typed = parse_with_explicit(build_parser(), argv)
    check_args(args, typed)
    from ddpmkit.generation import dist_env_from_environ  # torch loads here

    env = dist_env_from_environ()
    if env.world_size > 1:
        return _torchrun(args, typed, env)
    if args.num_gpus > 1:
        return _spawn(args, typed)
    result = _process(args, typed, env)
    return _conclude(args, result["dataset"], result["written"], result["seconds"],
                     result["signum"])


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_guarded(lambda: generate(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
