"""Device selection shared by every command."""

import contextlib

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
