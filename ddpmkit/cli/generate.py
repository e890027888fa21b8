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
import sys

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
from ddpmkit.config import parse_with_explicit
from ddpmkit.config.sample import ANIMATE_TARGETS, DEFAULT_DATASET, SampleConfig
from ddpmkit.errors import UserError

# torch and the sampling code are imported after the flags are checked, so that `--help` and
# flag errors need no torch.


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
    p.add_argument("--animate-target", choices=ANIMATE_TARGETS, default="x_0",
                   help="show the predicted clean image (x_0) or the noisy state (x_t)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ---- flags -> SampleConfig ---------------------------------------------------------------
# Config fields whose flag is not `--` + the field with dashes.
FLAG_NAMES = {"checkpoint": "--chkpt-path", "steps": "--steps / --subseq-size",
              "class_labels": "--class-label", "progress": "--no-progress"}


def flag_name(field: str) -> str:
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def sample_config(args: argparse.Namespace, typed: set[str]) -> SampleConfig:
    """The run the flags ask for, checked (errors name the flags); the Namespace stops here."""
    if args.use_ddim and "sampler" in typed and args.sampler != "ddim":
        raise UserError(f"--use-ddim contradicts --sampler {args.sampler}")
    labels = args.class_label.split(",") if args.class_label is not None else None
    config = SampleConfig(
        checkpoint=args.chkpt_path, chkpt_dir=args.chkpt_dir,
        dataset=args.dataset if "dataset" in typed else None, config_path=args.config_path,
        config_dir=args.config_dir, use_ema=weights_choice(args),
        group_norm_eps=args.group_norm_eps, sampler="ddim" if args.use_ddim else args.sampler,
        steps=args.steps, eta=args.eta, skip_schedule=args.skip_schedule,
        ddim_eps_from=args.ddim_eps_from,
        ddim_step_to=args.ddim_step_to, seed=args.seed, precision=args.precision,
        class_labels=tuple(labels) if labels is not None else None,
        guidance_scale=args.guidance_scale, total_size=args.total_size,
        batch_size=args.batch_size, save_dir=args.save_dir, suffix=args.suffix,
        device=args.device, num_gpus=args.num_gpus, max_workers=args.max_workers,
        channels_last=bool(args.channels_last), compile=args.compile,
        cuda_graph=args.cuda_graph, progress=not args.no_progress, grid=args.grid,
        grid_size=args.grid_size, animate=args.animate, animate_format=args.animate_format,
        animate_count=args.animate_count, animate_target=args.animate_target)
    config.check(flag_name)
    return config


def generate(argv: list[str] | None = None) -> int:
    args, typed = parse_with_explicit(build_parser(), argv)
    config = sample_config(args, typed)
    from ddpmkit.sampling.launch import run  # torch loads here

    summary = run(config)
    if not summary.is_main:
        return summary.exit_code or 0
    print(summary.message())
    if summary.exit_code is None:
        raise UserError(f"only {summary.present} of {summary.total} samples exist in "
                        f"{summary.folder}; run the same command again to finish")
    return summary.exit_code


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_guarded(lambda: generate(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
