"""Device selection shared by every command: the device, the precision, compile modes."""

import contextlib
import functools
import logging
import platform
from typing import NamedTuple, Optional

import torch

from ddpmkit.choices import COMPILE_MODES
from ddpmkit.errors import UserError


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a `--device` value into a torch.device.

    `auto` picks `cuda` when CUDA is available, else `cpu`. An explicit CUDA device on a machine
    without CUDA (or with fewer GPUs) is a UserError, not a crash deep inside torch.
    """
    spec = (spec or "auto").strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UserError(f"invalid device {spec!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device {spec!r} was requested but CUDA is not available on this machine; "
                "use --device cpu (or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"device {spec!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return device




logger = logging.getLogger(__name__)

# CPU feature flags (Linux /proc/cpuinfo names) that give bfloat16 arithmetic in hardware.
# Without them oneDNN emulates bf16 with conversions around fp32 math: measured 3.3x slower
# than fp32 for a 128-channel 3x3 convolution on an Intel Xeon with AVX512 but no BF16, and
# 87x slower on an AMD EPYC with AVX2 only (torch 2.14.1, one thread).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # bf16: aarch64's FEAT_BF16
EMULATED_BF16 = "emulated, typically 3-100x slower than fp32"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (empty where the OS does not list them)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def cpu_capability() -> str:
    """What the CPU offers the fast paths, e.g. "AVX512 + AVX512_BF16 + AMX", "AVX2": torch's
    vector capability plus the bf16 instructions it does not report."""
    parts = [torch.backends.cpu.get_cpu_capability()]
    flags = cpu_flags()
    parts += [name.upper() for name in ("avx512_bf16", "amx_bf16") if name in flags]
    if platform.machine() in ("aarch64", "arm64") and "bf16" in flags:
        parts.append("BF16")
    return " + ".join(parts)


class Precision(NamedTuple):
    name: str    # "fp32", "bf16" or "fp16"
    reason: str  # why, for the log


# Autocast dtype of each `--precision` (fp32: no autocast). fp16 also scales the loss
# (torch.amp.GradScaler) when training; weights, EMA and optimizer state stay float32.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 tensor cores arrived with Ampere (compute capability 8.0); older GPUs (V100, T4,
# RTX 20xx) have fp16 tensor cores only, and `torch.cuda.is_bf16_supported()` may still say
# yes for them (emulated), so `auto` reads the capability.
BF16_MIN_CAPABILITY = (8, 0)


def autocast_dtype(precision: str) -> "torch.dtype | None":
    """The autocast dtype of a resolved precision name (None: float32, no autocast)."""
    return AUTOCAST_DTYPES[precision]


def resolve_precision(requested: Optional[str], device: torch.device) -> Precision:
    """`auto` (or None): bf16 on CUDA devices with bf16 tensor cores (capability >= 8.0), fp16
    on older CUDA devices, bf16 on CPUs with native bf16, else fp32 (never fp16 on a CPU).
    An explicit bf16 or fp16 on a CPU is kept (a user may want it for parity) with a one-line
    warning where it is emulated."""
    requested = requested or "auto"
    if device.type == "cuda":
        capability = tuple(torch.cuda.get_device_capability(device))
        native = capability >= BF16_MIN_CAPABILITY
        where = (f"{torch.cuda.get_device_name(device)} (compute capability "
                 f"{capability[0]}.{capability[1]}): bf16 "
                 + ("supported" if native else "not supported, fp16 tensor cores"))
    elif device.type == "cpu":
        native = cpu_has_native_bf16()
        where = f"CPU {cpu_capability()}: " + ("native bf16" if native else
                                                f"no native bf16 ({EMULATED_BF16})")
    else:
        native, where = False, f"{device.type}: bf16 untested"
    if requested == "auto":
        fallback = "fp16" if device.type == "cuda" else "fp32"
        return Precision("bf16" if native else fallback, f"auto on {where}")
    if requested == "bf16" and not native and device.type == "cpu":
        logger.warning("--precision bf16 on a CPU without native bf16 (%s): bf16 is %s; "
                       "--precision auto picks fp32 here", cpu_capability(), EMULATED_BF16)
    if requested == "fp16" and device.type == "cpu":
        logger.warning("--precision fp16 on a CPU (%s): fp16 is slower than fp32 on CPUs "
                       "(sampling 0.7x, training 36-90x slower: convolution backward has no "
                       "fast fp16 CPU kernel); --precision auto picks %s here",
                       cpu_capability(), "bf16" if native else "fp32")
    return Precision(requested, f"as asked ({where})")


def compile_mode(value) -> "str | None":
    """The torch.compile mode of a `--compile` value (False/None/"": no compile; True: default),
    or a UserError naming the choices."""
    if value is None or value is False or value == "":
        return None
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise UserError(f"--compile {value!r}: choose one of {', '.join(COMPILE_MODES)}")
    return str(value)


def compile_module(module, mode: "str | None"):
    """torch.compile(module) in `mode` (None: the module itself)."""
    if mode is None:
        return module
    return torch.compile(module, mode=None if mode == "default" else mode)


def inductor_freezing(enabled: bool):
    """A context in which torch.compile's inductor freezes weights into what it compiles:
    they become constants, so autocast's weight casts and BatchNorm are folded into them and,
    on CPUs, convolution weights are prepacked for oneDNN. Inductor reads the setting when it
    compiles, which happens inside a call (again for each new input shape), and torch.compile's
    own `options` do not reach it, so the calls of a frozen network run inside this context.
    For networks whose weights no longer change, called without gradients."""
    if not enabled:
        return contextlib.nullcontext()
    from torch._inductor import config as inductor_config

    return inductor_config.patch(freezing=True)
