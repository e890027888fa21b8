"""Training throughput of the DDPM UNet: images/s, peak memory, achieved FLOP/s.

Runs the project's own training step (ImageTrainer: loss, backward, clipping, Adam, EMA) on
synthetic batches, once per configuration, so the eager fp32 baseline and the fast paths are
measured in the same process at the same time:

    python benchmarks/train_throughput.py                       # CIFAR-10 config, batch 8, CPU
    python benchmarks/train_throughput.py --device cuda --batch-size 128 \
        --modes fp32 bf16+fused bf16+fused+compile bf16+fused+compile-ro

On CUDA, "host ms" is the time the CPU takes to issue one step to an idle GPU: when it is close
to "ms/step", the step is launch-bound (the GPU waits for Python and the kernel launches).

A mode is `+`-joined options: fp32 | bf16 | fp16 (autocast, fp32 master weights; fp16 with
dynamic loss scaling, as `train --precision fp16`), cl (channels_last),
fused (fused Adam), compile | compile-ro | compile-ma (torch.compile of the model in mode
default | reduce-overhead, i.e. with CUDA graphs | max-autotune-no-cudagraphs).
"""

import argparse
import os
import sys

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
    time_calls,
)

from ddpmkit.build import build_diffusion  # noqa: E402
from ddpmkit.models import build_model  # noqa: E402
from ddpmkit.runtime.devices import autocast_dtype, compile_module  # noqa: E402
from ddpmkit.training.images import ImageTrainer  # noqa: E402

HOST_ITERS = 3  # steps timed for the host's share (CUDA only)
DEFAULT_CPU_MODES = ["fp32", "fp32+fused", "bf16", "bf16+fused"]
DEFAULT_GPU_MODES = ["fp32", "bf16+fused", "bf16+fused+compile", "bf16+fused+compile-ro"]


def parse_mode(mode: str):
    parts = set(mode.split("+"))
    unknown = parts - {*PRECISION_OPTIONS, "cl", "fused"} - set(COMPILE_OPTIONS)
    if unknown:
        raise SystemExit(f"unknown mode option(s) {sorted(unknown)} in {mode!r}")
    compile_modes = [COMPILE_OPTIONS[p] for p in parts if p in COMPILE_OPTIONS]
    return {"precision": mode_precision(parts, mode), "channels_last": "cl" in parts,
            "fused": "fused" in parts, "compile": compile_modes[0] if compile_modes else None}


def make_trainer(config, batch_size, device, opts, steps):
    diffusion = build_diffusion(config["diffusion"])
    channels, res = config["dataset"]["channels"], config["dataset"]["resolution"]
    torch.manual_seed(0)
    model = build_model(config["model"], diffusion.model_out_channels(channels)).to(device)
    if opts["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    net = compile_module(model, opts["compile"])
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(batch_size, channels, res, res, generator=g) * 2 - 1).to(device)
            for _ in range(2)] * (steps // 2 + 1)
    trainer = ImageTrainer(
        net, diffusion, data, epochs=10**6, lr=2e-4, warmup_steps=0, grad_clip=1.0,
        ema_decay=0.9999, device=device, seed=0, progress=False, log_every=10**9,
        fused=True if opts["fused"] else None,
        amp_dtype=autocast_dtype(opts["precision"]),
        random_flip=True, global_batch=batch_size, micro_batch=batch_size,
        channels_last=opts["channels_last"])
    return trainer, model, data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cifar10", help="shipped config name or JSON path")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--modes", nargs="+", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives stable numbers on a shared machine)")
    args = p.parse_args(argv)
    device, path, config = setup_run(args.threads, args.device, args.config)
    modes = args.modes or (DEFAULT_GPU_MODES if device.type == "cuda" else DEFAULT_CPU_MODES)
    print(f"# training step, config {os.path.basename(path)}, batch {args.batch_size}, "
          f"{device_name(device)}, torch {torch.__version__}")

    trainer, model, data = make_trainer(config, args.batch_size, device, parse_mode("fp32"), 2)
    x = data[0]
    flops_per_image = count_flops(lambda: trainer.compute_loss(x).backward()) / args.batch_size
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {n_params / 1e6:.2f}M parameters; {flops_per_image / 1e9:.2f} GFLOP per training "
          "image (forward + backward, counted)")
    widths = {"mode": 24, "img/s": 9, "ms/step": 9, "host ms": 8, "speedup": 8, "peak MB": 9,
              "TFLOP/s": 8, "% peak": 7}
    print(format_row({k: k for k in widths}, widths))
    baseline = None
    for mode in modes:
        opts = parse_mode(mode)
        trainer, _, data = make_trainer(config, args.batch_size, device, opts,
                                        args.steps + args.warmup + HOST_ITERS)
        reset_peak_memory(device)

        def step(trainer=trainer):
            trainer.train_epoch(max_steps=trainer.step + 1)

        seconds = time_calls(step, device, args.warmup, args.steps)
        host = host_seconds(step, device, HOST_ITERS)
        ips = args.batch_size / seconds
        baseline = baseline or ips
        achieved = ips * flops_per_image
        peak = peak_flops(device, opts["precision"])
        print(format_row({
            "mode": mode, "img/s": f"{ips:.1f}", "ms/step": f"{seconds * 1e3:.0f}",
            "host ms": "-" if host is None else f"{host * 1e3:.0f}",
            "speedup": f"{ips / baseline:.2f}x", "peak MB": f"{peak_memory_mb(device):.0f}",
            "TFLOP/s": f"{achieved / 1e12:.3f}",
            "% peak": f"{100 * achieved / peak:.1f}" if peak else "-"}, widths))


if __name__ == "__main__":
    main()
