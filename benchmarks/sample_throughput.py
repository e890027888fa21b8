"""Sampling throughput of DDPM, DDIM and DPM-Solver++: images/s, time per step, achieved FLOP/s
and peak memory, for a config's UNet with random weights.

    python benchmarks/sample_throughput.py                       # CIFAR-10 UNet, CPU-sized run
    python benchmarks/sample_throughput.py --device cuda --batch-size 256 --steps 100 \
        --precision fp32 bf16 --ddpm-steps 100

Each sampler runs `--steps` network evaluations on a batch (DDPM: `--ddpm-steps` of its T steps,
timed and extrapolated to all T, since every DDPM step costs the same). The timed loop is
ddpmkit's own `sample` with the counter-based per-sample noise `ddpmkit generate` uses, so the
numbers include the sampler arithmetic and noise, not PNG writing. One untimed warm-up step
per configuration comes first (allocator, cuDNN autotuning, lazy initialization).
On a CPU shared with other work, pass `--threads 1`: with several threads, every parallel
region waits for the slowest (descheduled) thread and the timings swing by 10x or more.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

from ddpmkit.config import find_config_file, load_json
from ddpmkit.devices import resolve_device
from ddpmkit.diffusion.samplers import SAMPLERS, make_sampler
from ddpmkit.generation import sample_indexed
from ddpmkit.models.loading import build_from_config, image_shape


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cifar10",
                   help="a shipped config name (cifar10, celeba, celebahq, mnist) or a JSON path")
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    p.add_argument("--steps", type=int, default=10, help="steps of ddim and dpm-solver++")
    p.add_argument("--ddpm-steps", type=int, default=None,
                   help="DDPM steps actually timed (default --steps), extrapolated to all T")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and activations")
    return p.parse_args(argv)


def forward_flops(model: torch.nn.Module, shape, device) -> float:
    """FLOPs of one forward pass for one image (2 per multiply-add), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *shape, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return float(counter.get_total_flops())


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB


def run_one(diffusion, model, name, steps, batch_size, shape, device, precision, timed_steps):
    sampler = make_sampler(diffusion, name, steps=steps)
    full_steps = len(sampler.timesteps)
    # DDPM: time only the first `timed_steps` of its T steps; each costs the same.
    sampler.timesteps = sampler.timesteps[:timed_steps]
    dtype = torch.bfloat16 if precision == "bf16" else None

    def denoise_fn(x_t, t):
        if dtype is None:
            return model(x_t, t)
        with torch.autocast(device.type, dtype=dtype):
            return model(x_t, t).float()

    indices = list(range(batch_size))
    warm = make_sampler(diffusion, name, steps=steps)
    warm.timesteps = warm.timesteps[:1]
    sample_indexed(diffusion, denoise_fn, warm, indices, shape, 0, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    sample_indexed(diffusion, denoise_fn, sampler, indices, shape, 0, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    per_step = seconds / len(sampler.timesteps)
    return full_steps, len(sampler.timesteps), per_step


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    path = args.config if args.config.endswith(".json") else find_config_file(args.config)
    config = load_json(path)
    torch.manual_seed(0)
    model, diffusion = build_from_config(config)
    model = model.to(device).eval()
    shape = image_shape(config)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    flops = forward_flops(model, shape, device)
    params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"config {os.path.basename(path)}: {params / 1e6:.1f}M parameters, "
          f"{flops / 1e9:.2f} GFLOP per {'x'.join(map(str, shape))} image forward; "
          f"device {device} (threads {threads}), batch {args.batch_size}, "
          f"torch {torch.__version__}")
    header = (f"{'sampler':<13} {'prec':<5} {'steps':>6} {'timed':>6} {'s/step':>8} "
              f"{'img/s':>9} {'TFLOP/s':>8} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for precision in args.precision:
        for name in args.samplers:
            timed = (args.ddpm_steps or args.steps) if name == "ddpm" else args.steps
            full, timed, per_step = run_one(diffusion, model, name, args.steps, args.batch_size,
                                            shape, device, precision, timed)
            img_s = args.batch_size / (per_step * full)  # at the sampler's full length
            tflops = flops * args.batch_size / per_step / 1e12
            print(f"{name:<13} {precision:<5} {full:>6} {timed:>6} {per_step:>8.3f} "
                  f"{img_s:>9.3f} {tflops:>8.3f} {peak_memory_mib(device):>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
