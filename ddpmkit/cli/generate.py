"""`ddpmkit generate` (and `python generate.py`): sample images from a checkpoint into a folder.

Output (the reference's layout, `python eval.py --folder-name <dataset><suffix>` reads it):
    <save-dir>/<dataset><suffix>/000000.png ... (one uint8 PNG per sample, named by its index)
    <save-dir>/<dataset><suffix>/generation.json  (the settings that decide the images)
    <save-dir>/<dataset><suffix>_grid.png         (--grid)
    <save-dir>/<dataset><suffix>_denoise.webp     (--animate; or .gif)
Sample i is a pure function of (checkpoint, sampler settings, --seed, i): any batch size and
any number of processes give the same images, and a rerun only makes the missing files.

Processes: one; `torchrun --nproc_per_node N -m ddpmkit.cli generate ...` (rank r makes samples
r, r + N, ...; gloo is used only for a final barrier); or the reference's `--num-gpus N`, which
spawns N processes on cuda:0..N-1 (on a machine without CUDA, pass `--device cpu` to run N CPU
processes instead).

`--precision bf16` runs the network under bfloat16 autocast (the sampler's arithmetic stays
float32). It is allowed on CPU too: on processors with native bf16 (AVX512-BF16 / AMX) it is
faster (1.6x for the CIFAR-10 UNet on one AMD EPYC core), elsewhere slower than fp32.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch

from ddpmkit.cli import CLIParser, add_speed_flags, run_guarded, setup_logging
from ddpmkit.config import find_config_file, load_json, parse_with_explicit
from ddpmkit.devices import resolve_device
from ddpmkit.diffusion.samplers import SAMPLERS, make_sampler
from ddpmkit.diffusion.schedules import SKIP_SCHEDULES
from ddpmkit.errors import UserError
from ddpmkit.generation import (
    NOISE_VERSION,
    DistEnv,
    check_manifest,
    count_samples,
    dist_env_from_environ,
    existing_samples,
    first_samples,
    generate_to_folder,
    make_denoise_fn,
    sample_indexed,
)

log = logging.getLogger(__name__)

IMAGE_DATASETS = ("mnist", "cifar10", "celeba", "celebahq", "folder")
DEFAULT_DATASET = "cifar10"
# Steps when --steps / --subseq-size is not given (DDIM: the reference's --subseq-size default).
DEFAULT_STEPS = {"ddim": 50, "dpm-solver++": 20}
PRECISIONS = ("fp32", "bf16")
ANIMATION_FORMATS = ("webp", "gif")
# DDIM's switches (ddpmkit.diffusion.samplers.DDIM_EPS_SOURCES / DDIM_STEP_TARGETS, spelled out
# here so that --help needs no torch): "model" + "stride" reproduce diffusers' DDIMPipeline.
DDIM_EPS_SOURCES = ("clipped", "model")
DDIM_STEP_TARGETS = ("next", "stride")
# Frames kept in an animation at most (DDPM has 1000 steps; a few seconds of video is enough).
MAX_ANIMATION_FRAMES = 100
# Long enough for the slowest process to finish its share after a resume, however uneven.
BARRIER_TIMEOUT = timedelta(days=7)


def build_parser() -> argparse.ArgumentParser:
    p = CLIParser(prog="ddpmkit generate",
                description="Generate samples from a trained checkpoint (DDPM, DDIM or "
                            "DPM-Solver++), one PNG per sample.")
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
    p.add_argument("--chkpt-path", default="", help="checkpoint file")
    p.add_argument("--save-dir", default="./images/eval",
                   help="the sample folder <dataset><suffix> is created in here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--use-ema", action="store_true",
                   help="demand the EMA weights (an error if the checkpoint has none); without "
                        "it they are used whenever the checkpoint has them")
    p.add_argument("--no-ema", action="store_true",
                   help="use the raw weights even when the checkpoint has EMA weights")
    p.add_argument("--group-norm-eps", type=float, default=None,
                   help="GroupNorm epsilon of checkpoints without a config (the reference "
                        "project's files): 1e-5, the default, for its released checkpoints; "
                        "1e-6 for models trained with its code after 2023-07-16")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm: ancestral, all T steps; ddim: --steps of them, --eta noise; "
                        "dpm-solver++: 2nd-order multistep ODE solver for 10-25 steps")
    p.add_argument("--use-ddim", action="store_true", help="same as --sampler ddim")
    p.add_argument("--steps", "--subseq-size", dest="steps", type=int, default=None,
                   help="sampling steps for ddim (default 50) and dpm-solver++ (default 20); "
                        "--subseq-size is the reference's name")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM noise scale: 0 deterministic, 1 like DDPM")
    p.add_argument("--skip-schedule", choices=SKIP_SCHEDULES, default=None,
                   help="how ddim / dpm-solver++ space their steps: linear (0, T/S, 2T/S, ...) "
                   "and quadratic as the reference and the DDIM paper; linspace, leading, "
                   "trailing as diffusers (default: linear for ddim, quadratic for "
                   "dpm-solver++)")
    p.add_argument("--ddim-eps-from", choices=DDIM_EPS_SOURCES, default=None,
                   help="the eps a DDIM step uses once x_0 is clipped: re-derived from the "
                        "clipped x_0 (clipped, the default) or the network's own (model, as "
                        "diffusers' DDIMPipeline)")
    p.add_argument("--ddim-step-to", choices=DDIM_STEP_TARGETS, default=None,
                   help="where a DDIM step lands: the next evaluated timestep (next, the "
                        "default) or t - T // S (stride, as diffusers' DDIMScheduler)")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i's noise is a function of (seed, i)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="network precision (bf16: autocast; the sampler stays float32)")
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
            raise UserError("--steps / --subseq-size apply to ddim and dpm-solver++; ddpm uses "
                            "all T steps")
        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.eta < 0:
        raise UserError(f"--eta must be >= 0, got {args.eta}")
    if args.use_ema and args.no_ema:
        raise UserError("--use-ema and --no-ema contradict each other; give one")
    if args.group_norm_eps is not None and not args.group_norm_eps > 0:
        raise UserError(f"--group-norm-eps must be positive, got {args.group_norm_eps}")
    if "eta" in typed and args.sampler != "ddim" and args.eta != 0:
        raise UserError(f"--eta applies to ddim only, not to {args.sampler}")
    if (args.ddim_eps_from or args.ddim_step_to) and args.sampler != "ddim":
        raise UserError(f"--ddim-eps-from / --ddim-step-to apply to ddim only, not to "
                        f"{args.sampler}")


def checkpoint_path(args: argparse.Namespace) -> str:
    """--chkpt-path; else <chkpt-dir>/ddpm_<dataset>.pt (the reference's name), else the newest
    <chkpt-dir>/ddpm_<dataset>_<N>.pt (what `ddpmkit train` writes every --chkpt-intv)."""
    from ddpmkit.training.checkpoint import latest_checkpoint

    if args.chkpt_path:
        path = os.path.expanduser(args.chkpt_path)
        if not os.path.isfile(path):
            raise UserError(f"checkpoint {path!r} does not exist")
        return path
    folder = os.path.expanduser(args.chkpt_dir)
    path = os.path.join(folder, f"ddpm_{args.dataset}.pt")
    if os.path.isfile(path):
        return path
    latest = latest_checkpoint(folder, f"ddpm_{args.dataset}_*.pt") if os.path.isdir(folder) \
        else None
    if latest is None:
        raise UserError(f"checkpoint {path!r} does not exist (nor ddpm_{args.dataset}_*.pt "
                        f"there); pass --chkpt-path FILE")
    log.info("using the newest checkpoint %s", latest)
    return latest


def fallback_config(args: argparse.Namespace, typed: set[str]) -> dict[str, Any]:
    """The architecture for files that carry no config: --config-path, else <dataset>.json."""
    if "dataset" not in typed and not args.config_path:
        log.info("the checkpoint has no config: assuming the %s architecture "
                 "(pass --dataset or --config-path otherwise)", args.dataset)
    path = find_config_file(args.dataset, args.config_path or None,
                            os.path.expanduser(args.config_dir))
    return load_json(path)


def rank_device(spec: str, env: DistEnv) -> torch.device:
    """One process: --device as given. Several: each takes cuda:LOCAL_RANK (any CUDA --device is
    read as "use the GPUs"), or CPU."""
    if env.world_size == 1:
        return resolve_device(spec)
    spec = (spec or "auto").strip()
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return resolve_device(f"cuda:{env.local_rank}")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def output_paths(args: argparse.Namespace, dataset: str) -> dict[str, str]:
    name = f"{dataset}{args.suffix}"
    save_dir = os.path.expanduser(args.save_dir)
    return {
        "folder": os.path.join(save_dir, name),
        "grid": os.path.join(save_dir, f"{name}_grid.png"),
        "animation": os.path.join(save_dir, f"{name}_denoise.{args.animate_format}"),
    }


# ---- one process -------------------------------------------------------------------------
def run_process(args: argparse.Namespace, typed: set[str], env: DistEnv) -> dict[str, Any]:
    """This process's share of the samples (and, on rank 0, the animation)."""
    from ddpmkit.build import build_diffusion
    from ddpmkit.models.loading import (
        checkpoint_config,
        choose_weights,
        image_shape,
        model_from_checkpoint_dict,
    )
    from ddpmkit.training.checkpoint import load_checkpoint
    from ddpmkit.utils.images import FrameRecorder, save_animation

    device = rank_device(args.device, env)
    path = checkpoint_path(args)
    ckpt = load_checkpoint(path, map_location="cpu", allow_numpy_scalars=True)
    has_config = checkpoint_config(ckpt) is not None
    config = None if has_config else fallback_config(args, typed)
    if has_config and args.config_path:
        log.warning("%s carries its own config; --config-path is not used", path)
    use_ema = True if args.use_ema else False if args.no_ema else None  # None: EMA if present
    weights = choose_weights(ckpt, use_ema, repr(path))
    model, config = model_from_checkpoint_dict(ckpt, config, use_ema, device, repr(path),
                                               group_norm_eps=args.group_norm_eps)
    del ckpt
    dataset = (config.get("dataset") or {}).get("name") or args.dataset
    if has_config and "dataset" in typed and args.dataset != dataset:
        raise UserError(f"--dataset {args.dataset} but {path} was trained on {dataset}")

    diffusion = build_diffusion(config.get("diffusion") or {})
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
    if args.precision == "bf16" and device.type == "cpu":
        log.info("bf16 autocast on CPU: faster than fp32 only with native bf16 (AVX512-BF16, AMX)")
    channels_last = bool(args.channels_last)
    denoise_fn = make_denoise_fn(model, args.precision, device, channels_last, args.compile,
                                 cuda_graph=args.cuda_graph)
    shape = image_shape(config)
    paths = output_paths(args, dataset)
    settings = {
        "checkpoint_sha256": file_sha256(path), "use_ema": weights == "ema",
        "sampler": args.sampler, "steps": len(sampler.timesteps), "eta": args.eta,
        "skip_schedule": args.skip_schedule, "seed": args.seed, "precision": args.precision,
        "image_shape": list(shape), "noise": NOISE_VERSION,
    }
    if args.sampler == "ddim":  # what `linear` means changed once: record the steps themselves
        settings.update(timesteps=sampler.timesteps.tolist(), ddim_eps_from=sampler.eps_from,
                        ddim_step_to=sampler.step_to)
    check_manifest(paths["folder"], settings, write=env.is_main)
    if env.is_main:
        log.info("%s sampler, %d steps, %d samples of %s -> %s (%d process(es), %s)",
                 args.sampler, len(sampler.timesteps), args.total_size, "x".join(map(str, shape)),
                 paths["folder"], env.world_size, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    result = generate_to_folder(
        diffusion, denoise_fn, sampler, shape, paths["folder"], args.total_size,
        args.batch_size, args.seed, device, env, max_workers=args.max_workers,
        progress=env.is_main and not args.no_progress)

    if args.animate and env.is_main:
        count = min(args.animate_count, args.total_size)
        recorder = FrameRecorder(len(sampler.timesteps), count, args.animate_target,
                                 MAX_ANIMATION_FRAMES)
        sample_indexed(diffusion, denoise_fn, sampler, range(count), shape, args.seed, device,
                       callback=recorder)
        save_animation(paths["animation"], recorder.frames)
        log.info("wrote %s (%d frames)", paths["animation"], len(recorder.frames))
    return {"written": result.written, "skipped": result.skipped, "seconds": result.seconds,
            "dataset": dataset}


def finish(args: argparse.Namespace, dataset: str, written: int, seconds: float) -> None:
    """After every process is done: the grid and a one-line summary (main process only)."""
    import numpy as np

    from ddpmkit.utils.images import read_image_uint8, save_grid

    paths = output_paths(args, dataset)
    present = count_samples(paths["folder"], args.total_size)
    extra = len(existing_samples(paths["folder"])) - present
    if extra:
        log.warning("%s also holds %d samples numbered >= --total-size (an earlier, larger run); "
                    "`eval` reads every image in the folder", paths["folder"], extra)
    if args.grid:
        files = first_samples(paths["folder"], min(args.grid_size, args.total_size))
        save_grid(paths["grid"], np.stack([read_image_uint8(f) for f in files]))
        log.info("wrote %s", paths["grid"])
    rate = f" ({written / seconds:.2f} img/s)" if written and seconds > 0 else ""
    print(f"{present} of {args.total_size} samples in {paths['folder']}; "
          f"{written} new in {seconds:.1f} s{rate}")
    if present != args.total_size:
        raise UserError(f"only {present} of {args.total_size} samples exist in "
                        f"{paths['folder']}; run the same command again to finish")


# ---- process layouts ---------------------------------------------------------------------
def _spawned(index: int, args: argparse.Namespace, typed: set[str], world: int, queue) -> None:
    """Body of one `--num-gpus` process; a UserError becomes one line and exit status 2."""
    setup_logging()
    if index != 0:
        logging.getLogger().setLevel(logging.WARNING)
    env = DistEnv(index, world, index)
    if rank_device(args.device, env).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        queue.put(run_process(args, typed, env))
    except UserError as exc:  # the parent reports it, once
        queue.put({"error": str(exc)})
        sys.exit(2)


def _drain(queue) -> list[dict[str, Any]]:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def _spawn(args: argparse.Namespace, typed: set[str]) -> None:
    import torch.multiprocessing as mp

    n = args.num_gpus
    if args.device.strip() != "cpu":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < n:
            raise UserError(f"--num-gpus {n} needs {n} CUDA devices, found {available}; pass "
                            f"--device cpu to run {n} CPU processes instead")
    checkpoint_path(args)  # fail here, once, rather than in every process
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    start = time.perf_counter()
    try:
        mp.spawn(_spawned, args=(args, typed, n, queue), nprocs=n, join=True)
    except mp.ProcessExitedException as exc:
        reported = [r["error"] for r in _drain(queue) if "error" in r]
        raise UserError(reported[0] if reported else
                        f"generation process {exc.error_index} failed (exit code "
                        f"{exc.exit_code})") from exc
    except mp.ProcessRaisedException as exc:
        raise UserError(f"a generation process crashed: "
                        f"{str(exc).strip().splitlines()[-1]}") from exc
    results = _drain(queue)
    finish(args, results[0]["dataset"], sum(r["written"] for r in results),
           time.perf_counter() - start)


def _torchrun(args: argparse.Namespace, typed: set[str], env: DistEnv) -> None:
    import torch.distributed as dist

    if args.num_gpus > 1:
        raise UserError("--num-gpus spawns processes itself; under torchrun leave it at 1 and "
                        "use --nproc_per_node")
    if env.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)  # only for the final barrier
    try:
        start = time.perf_counter()
        result = run_process(args, typed, env)
        written = torch.tensor([result["written"]], dtype=torch.long)
        dist.all_reduce(written)  # also the barrier: every process has finished its share
        if env.is_main:
            finish(args, result["dataset"], int(written), time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


def generate(argv: list[str] | None = None) -> int:
    args, typed = parse_with_explicit(build_parser(), argv)
    check_args(args, typed)
    env = dist_env_from_environ()
    if env.world_size > 1:
        _torchrun(args, typed, env)
    elif args.num_gpus > 1:
        _spawn(args, typed)
    else:
        result = run_process(args, typed, env)
        finish(args, result["dataset"], result["written"], result["seconds"])
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_guarded(lambda: generate(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
