"""Shared helpers for the benchmark scripts: timing, peak memory, FLOP counting, peak tables,
the toy benchmarks' training."""

import contextlib
import platform
import resource
import time
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

# Dense peak throughput (FLOP/s) of known GPUs, by a substring of the device name and dtype.
# Vendor datasheets, without sparsity: H100/H200 SXM 989 TFLOP/s bf16, 495 TF32, 67 plain
# fp32; A100 312 bf16, 156 TF32, 19.5 fp32. "fp32" rows use the TF32 peak: PyTorch runs fp32
# convolutions on TF32 tensor cores by default (torch.backends.cudnn.allow_tf32), and the
# convolutions are the FLOPs. "fp32-strict" is for work that turns TF32 off (Inception).
GPU_PEAKS = {
    "H100": {"bf16": 989e12, "fp32": 495e12, "fp32-strict": 67e12},
    "H200": {"bf16": 989e12, "fp32": 495e12, "fp32-strict": 67e12},
    "A100": {"bf16": 312e12, "fp32": 156e12, "fp32-strict": 19.5e12},
}
for _peaks in GPU_PEAKS.values():
    _peaks["fp16"] = _peaks["bf16"]  # the same tensor-core rate on these cards

# Mode options that name the network's precision (`+`-joined with the others).
PRECISION_OPTIONS = ("fp32", "bf16", "fp16")


def mode_precision(parts: set, mode: str) -> str:
    """The precision a benchmark mode's options name (fp32 when none)."""
    named = [p for p in PRECISION_OPTIONS if p in parts]
    if len(named) > 1:
        raise SystemExit(f"mode {mode!r} names {' and '.join(named)}: choose one precision")
    return named[0] if named else "fp32"


# `+`-joined mode option -> torch.compile mode, shared by the training and sampling benchmarks.
COMPILE_OPTIONS = {"compile": "default", "compile-ro": "reduce-overhead",
                   "compile-ma": "max-autotune-no-cudagraphs"}


def setup_run(threads: Optional[int], device_spec: str, config: str):
    """What every UNet benchmark does first: CPU threads, the device (cuDNN autotuning on
    CUDA, as `ddpmkit train` and `generate` do) and the config (a shipped name or a JSON path).
    Returns (device, config path, config dict)."""
    from ddpmkit.config import find_config_file, load_json
    from ddpmkit.runtime.devices import resolve_device

    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device_spec)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    path = config if config.endswith(".json") else find_config_file(config)
    return device, path, load_json(path)


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name; for a CPU its model, what it offers the fast paths (AVX2, AVX512,
    AVX512_BF16, AMX: bf16 is emulated, and slow, without the last two) and the threads."""
    from ddpmkit.runtime.devices import cpu_capability

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU {cpu_model()} [{cpu_capability()}], {torch.get_num_threads()} threads")


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks.get(precision)
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def time_calls(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def host_seconds(fn: Callable[[], None], device: torch.device, iters: int = 3) -> Optional[float]:
    """On CUDA: seconds the host spends issuing one call of `fn` from an idle GPU (synchronized
    before, not after). Close to the call's full time means launch-bound: the GPU waits for
    the CPU. None on the CPU, where host and device time are the same."""
    if device.type != "cuda":
        return None
    total = 0.0
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    synchronize(device)
    return total / iters


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call, counted by torch's FlopCounterMode (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def format_row(values: Dict[str, object], widths: Dict[str, int]) -> str:
    return "  ".join(str(values.get(k, "")).rjust(w) for k, w in widths.items())


def toy_updates(diffusion, net: torch.nn.Module, dataset: str, batch_size: int, lr: float,
                steps: int, seed: int) -> Iterator[Tuple[int, float]]:
    """The toy benchmarks' training: `steps` Adam updates of `net` with cosine LR decay to 0,
    each on a fresh batch of `dataset` with its x_0, t and noise drawn in that order from one
    generator seeded with `seed` (the same draws for every network). Yields (step from 1,
    loss) after each update; the caller may evaluate `net` in between."""
    from ddpmkit.data.toy import make_toy_data, toy_generator

    g = toy_generator(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(1, steps + 1):
        x_0 = make_toy_data(dataset, batch_size, g)
        t = torch.randint(diffusion.T, (batch_size,), generator=g)
        noise = torch.randn(x_0.shape, generator=g)
        loss = diffusion.training_losses(net, x_0, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        yield step, loss.item()
