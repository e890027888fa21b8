"""Sampling throughput of DDPM, DDIM and DPM-Solver++: images/s, time per step, achieved FLOP/s,
fraction of the GPU's peak and peak memory, for a config's UNet with random weights.

    python benchmarks/sample_throughput.py --threads 1          # CIFAR-10 UNet, CPU-sized run
    python benchmarks/sample_throughput.py --device cuda --batch-size 500 \
        --samplers ddim:100 dpm-solver++:20 --modes fp32 bf16 bf16+graph bf16+compile

A sampler is `name` or `name:steps` (ddim and dpm-solver++; default --steps). A mode is
`+`-joined options, built exactly as `ddpmkit generate` builds them: fp32 | bf16 | fp16
(autocast network, float32 sampler), cl (channels_last), compile | compile-ro | compile-ma (torch.compile
of the network in mode default | reduce-overhead | max-autotune-no-cudagraphs), graph
(CUDA-graph replay of the network, `generate --cuda-graph`), freeze | nofreeze (compile with
or without the weights frozen in; `generate --compile` freezes on CPUs only), and `overhead`:
the network replaced by a zero output, which times what a step costs besides the network
(sampler arithmetic, noise, table lookups).
Every mode runs in one process, and the speed-up column is against the first mode. On CUDA,
"host ms" is the CPU time to issue one network call to an idle GPU (launch-bound when close to
"ms/step").

The timed loop is ddpmkit's own `sample` with the counter-based per-sample noise that
`generate` uses; PNG writing is not timed. DDPM times `--ddpm-steps` of its T steps and
extrapolates (each costs the same). One untimed warm-up step per row comes first (allocator,
cuDNN autotuning, compilation, graph capture). On a CPU shared with other work, pass
`--threads 1`: with several threads every parallel region waits for the slowest one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    COMPILE_OPTIONS,
    PRECISION_OPTIONS,
    count_flops,
    device_name,
    format_row,
    host_seconds,
    mode_precision,
    peak_flops,
    peak_memory_mb,
    reset_peak_memory,
    setup_run,
    synchronize,
)

from ddpmkit.diffusion.samplers import SAMPLERS, make_sampler  # noqa: E402
from ddpmkit.generation import make_denoise_fn, sample_indexed  # noqa: E402
from ddpmkit.models.loading import build_from_config, image_shape  # noqa: E402

MODE_OPTIONS = ({*PRECISION_OPTIONS, "cl", "graph", "overhead", "freeze", "nofreeze"}
                | set(COMPILE_OPTIONS))
DEFAULT_CPU_MODES = ["fp32", "bf16"]
DEFAULT_GPU_MODES = ["fp32", "bf16", "bf16+graph", "bf16+compile"]


def parse_mode(mode: str) -> dict:
    parts = set(mode.split("+"))
    unknown = parts - MODE_OPTIONS
    if unknown:
        raise SystemExit(f"unknown mode option(s) {sorted(unknown)} in {mode!r}; "
                         f"choose from {sorted(MODE_OPTIONS)}")
    compile_modes = [COMPILE_OPTIONS[p] for p in parts if p in COMPILE_OPTIONS]
    return {"precision": mode_precision(parts, mode), "channels_last": "cl" in parts,
            "compile": compile_modes[0] if compile_modes else None, "graph": "graph" in parts,
            "overhead": "overhead" in parts,
            "freeze": True if "freeze" in parts else False if "nofreeze" in parts else None}


def parse_sampler(spec: str, default_steps: int):
    name, _, steps = spec.partition(":")
    if name not in SAMPLERS:
        raise SystemExit(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return name, int(steps) if steps else default_steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cifar10",
                   help="a shipped config name (cifar10, celeba, celebahq, mnist) or a JSON path")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS),
                   help="name or name:steps, e.g. ddim:100 dpm-solver++:20")
    p.add_argument("--steps", type=int, default=10, help="default steps of ddim and dpm-solver++")
    p.add_argument("--ddpm-steps", type=int, default=None,
                   help="DDPM steps actually timed (default --steps), extrapolated to all T")
    p.add_argument("--timed-steps", type=int, default=None,
                   help="time at most this many steps of every sampler and extrapolate to its "
                        "full length (every step runs the same network)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--modes", nargs="+", default=None,
                   help=f"default {' '.join(DEFAULT_CPU_MODES)} on CPU, "
                        f"{' '.join(DEFAULT_GPU_MODES)} on CUDA")
    p.add_argument("--precision", nargs="+", choices=PRECISION_OPTIONS, default=None,
                   help="shorthand for --modes with these precisions (plus cl with "
                        "--channels-last)")
    p.add_argument("--channels-last", action="store_true", help="with --precision: add cl")
    p.add_argument("--num-images", type=int, default=50000,
                   help="report the minutes to make this many images")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def time_sampler(diffusion, denoise_fn, name, steps, batch_size, shape, device, timed_steps):
    """(full length of the sampler, steps timed, seconds per step)."""
    sampler = make_sampler(diffusion, name, steps=steps)
    full_steps = len(sampler.timesteps)
    sampler.timesteps = sampler.timesteps[:timed_steps]
    indices = list(range(batch_size))
    warm = make_sampler(diffusion, name, steps=steps)
    warm.timesteps = warm.timesteps[:1]
    sample_indexed(diffusion, denoise_fn, warm, indices, shape, 0, device)
    synchronize(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    sample_indexed(diffusion, denoise_fn, sampler, indices, shape, 0, device)
    synchronize(device)
    seconds = time.perf_counter() - start
    return full_steps, len(sampler.timesteps), seconds / len(sampler.timesteps)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, path, config = setup_run(args.threads, args.device, args.config)
    if args.precision:
        modes = [p + ("+cl" if args.channels_last else "") for p in args.precision]
    else:
        modes = args.modes or (DEFAULT_GPU_MODES if device.type == "cuda" else DEFAULT_CPU_MODES)
    samplers = [parse_sampler(s, args.steps) for s in args.samplers]
    for mode in modes:
        if parse_mode(mode)["graph"] and device.type != "cuda":
            raise SystemExit(f"mode {mode!r}: CUDA graphs need --device cuda")

    torch.manual_seed(0)
    model, diffusion = build_from_config(config)
    model = model.to(device).eval()
    shape = image_shape(config)
    x1, t1 = torch.zeros(1, *shape, device=device), torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        flops = count_flops(lambda: model(x1, t1))  # one image's forward (2 per multiply-add)
    params = sum(p.numel() for p in model.parameters())
    print(f"# sampling, config {os.path.basename(path)}: {params / 1e6:.1f}M parameters, "
          f"{flops / 1e9:.2f} GFLOP per {'x'.join(map(str, shape))} image forward; batch "
          f"{args.batch_size}; {device_name(device)}; torch {torch.__version__}")
    widths = {"sampler": 13, "mode": 20, "steps": 5, "timed": 5, "ms/step": 9, "host ms": 8,
              "img/s": 9, "speedup": 7, f"{args.num_images // 1000}k min": 8, "TFLOP/s": 8, "% peak": 6,
              "peak MiB": 8}
    print(format_row({k: k for k in widths}, widths))
    baseline = {}
    for mode in modes:
        opts = parse_mode(mode)
        if opts["overhead"]:
            def denoise_fn(x_t, t):
                return torch.zeros_like(x_t)
        else:
            torch._dynamo.reset()
            denoise_fn = make_denoise_fn(model, opts["precision"], device, opts["channels_last"],
                                         opts["compile"], cuda_graph=opts["graph"],
                                         freeze=opts["freeze"])
        peak = peak_flops(device, opts["precision"])
        x = torch.zeros(args.batch_size, *shape, device=device)
        t = torch.full((args.batch_size,), diffusion.T - 1, device=device)
        with torch.no_grad():
            denoise_fn(x, t)  # compile / capture before timing the host
            host = host_seconds(lambda fn=denoise_fn, x=x, t=t: fn(x, t), device)
        for name, steps in samplers:
            timed = (args.ddpm_steps or args.steps) if name == "ddpm" else steps
            timed = min(timed, args.timed_steps or timed)
            full, timed, per_step = time_sampler(diffusion, denoise_fn, name, steps,
                                                 args.batch_size, shape, device, timed)
            img_s = args.batch_size / (per_step * full)  # at the sampler's full length
            baseline.setdefault(name, img_s)
            achieved = 0.0 if opts["overhead"] else flops * args.batch_size / per_step
            print(format_row({
                "sampler": name, "mode": mode, "steps": full, "timed": timed,
                "ms/step": f"{per_step * 1e3:.2f}",
                "host ms": "-" if host is None else f"{host * 1e3:.2f}", "img/s": f"{img_s:.1f}",
                "speedup": "-" if opts["overhead"] else f"{img_s / baseline[name]:.2f}x",
                f"{args.num_images // 1000}k min": f"{args.num_images / img_s / 60:.1f}",
                "TFLOP/s": f"{achieved / 1e12:.2f}",
                "% peak": f"{100 * achieved / peak:.1f}" if peak and achieved else "-",
                "peak MiB": f"{peak_memory_mb(device):.0f}"}, widths), flush=True)
        model = model.to(memory_format=torch.contiguous_format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
