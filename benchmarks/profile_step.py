"""Where the time of a training step and of a sampling forward pass goes: the top operators
and kernels by device time (torch.profiler), for the CIFAR-10 UNet.

    python benchmarks/profile_step.py --device cuda --batch-size 128 --sample-batch-size 500
    python benchmarks/profile_step.py --threads 1 --batch-size 4 --sample-batch-size 4

Modes as in train_throughput.py (fp32 | bf16, cl). On CUDA only kernels are recorded (fast to
tabulate; --cpu-ops adds the operators) and a summary groups their time into matmul/conv, norm,
elementwise, reduction, attention, optimizer, layout-conversion and copy kernels; on the CPU
the table lists operators by self CPU time.
"""

import argparse
import os
import re
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import setup_run  # noqa: E402
from train_throughput import make_trainer, parse_mode  # noqa: E402

from ddpmkit.sampling import make_denoise_fn  # noqa: E402

# Kernel-name patterns, first match wins (cuDNN, cuBLAS/CUTLASS and ATen naming).
KERNEL_KINDS = [
    ("optimizer", r"multi_tensor|fused_adam|FusedAdam|_foreach"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("norm", r"group_norm|GroupNorm|layer_norm|batch_norm|RowwiseMoments|ComputeFusedParams|"
             r"Welford|norm_kernel"),
    ("layout", r"nchwToNhwc|nhwcToNchw|[Tt]ranspose"),  # cuDNN's NCHW <-> NHWC conversions
    ("matmul/conv", r"gemm|conv|cutlass|xmma|sm\d+_|implicit|wgrad|dgrad|fprop|cudnn|"
                    r"cublas|nvjet"),
    ("copy/cast", r"[Mm]emcpy|[Mm]emset|copy"),
    ("reduction", r"reduce|Reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|Elementwise|triton_poi|silu|dropout"),
]


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def report(prof, device, rows, title):
    print(f"\n## {title}")
    if device.type != "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                        max_name_column_width=60))
        return
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=rows,
                       max_name_column_width=60))
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = e.self_cuda_time_total
        if us > 0:
            entry = by_kind[kernel_kind(e.key)]
            entry[0] += us
            entry[1] += e.count
    total = sum(us for us, _ in by_kind.values()) or 1.0
    print(f"device time by kind (total {total / 1000:.2f} ms):")
    for kind, (us, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kind:12s} {us / 1000:8.2f} ms  {100 * us / total:5.1f}%  {count:6d} kernels")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cifar10", help="shipped config name or JSON path")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--sample-batch-size", type=int, default=500, help="0 skips the forward")
    p.add_argument("--mode", default="bf16", help="e.g. fp32, bf16, bf16+cl")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu-ops", action="store_true",
                   help="on CUDA, record the CPU-side operators too (slower to tabulate)")
    args = p.parse_args(argv)
    device, _, config = setup_run(args.threads, args.device, args.config)
    opts = parse_mode(args.mode)
    if device.type == "cuda":
        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.cpu_ops else [])
    else:
        activities = [ProfilerActivity.CPU]
    trainer, model, _ = make_trainer(config, args.batch_size, device, opts, 8)

    def step():
        trainer.train_epoch(max_steps=trainer.step + 1)

    for _ in range(3):
        step()
    # One step: building the table of a profile with many CUDA events takes long.
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    report(prof, device, args.rows, f"training step, {args.mode}, batch {args.batch_size}")

    if args.sample_batch_size:
        model.eval()
        fn = make_denoise_fn(model, opts["precision"], device, opts["channels_last"])
        x = torch.randn(args.sample_batch_size, 3, 32, 32, device=device)
        t = torch.full((args.sample_batch_size,), 500, device=device)
        with torch.no_grad():
            for _ in range(2):
                fn(x, t)
            with profile(activities=activities) as prof:
                fn(x, t)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        report(prof, device, args.rows,
               f"sampling forward, {args.mode}, batch {args.sample_batch_size}")


if __name__ == "__main__":
    main()
