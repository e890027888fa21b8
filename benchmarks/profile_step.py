"""Where the time of a training step and of a sampling forward pass goes: the top operators
and kernels by device time (torch.profiler), for the CIFAR-10 UNet.

    python benchmarks/profile_step.py --device cuda --batch-size 128 --sample-batch-size 500
    python benchmarks/profile_step.py --threads 1 --batch-size 4 --sample-batch-size 4

Modes as in train_throughput.py (fp32 | bf16, cl); the table lists operators (autograd and
aten level, self device time) so their sum is the step's time.
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import make_trainer, parse_mode  # noqa: E402

from ddpmkit.config import find_config_file, load_json  # noqa: E402
from ddpmkit.devices import resolve_device  # noqa: E402
from ddpmkit.generation import make_denoise_fn  # noqa: E402


def report(prof, device, rows, title):
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n## {title}")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cifar10")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--sample-batch-size", type=int, default=500, help="0 skips the forward")
    p.add_argument("--mode", default="bf16", help="e.g. fp32, bf16, bf16+cl")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    config = load_json(find_config_file(args.config))
    opts = parse_mode(args.mode)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
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
