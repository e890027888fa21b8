"""The toy run's configuration: `ToyRunConfig`, frozen, one field per `train-toy` flag (the
reference project's spellings), holding the one copy of their defaults; `to_dict()` is the flat
dict every toy checkpoint stores. No torch.

Build one in Python with keyword arguments (`ToyRunConfig(dataset="gaussian25", epochs=20)`),
or from a dict with `from_dict`; either way the values are checked (`check_toy`) and a bad one
is a one-line `UserError` naming its flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ddpmkit.errors import UserError

# Guidance scale of a class-conditional run's evaluations when none is given.
DEFAULT_TOY_GUIDANCE_SCALE = 1.0


@dataclass(frozen=True)
class ToyRunConfig:
    # ---- the reference project's settings (names, defaults) ----
    dataset: str = "gaussian8"
    size: int = 100_000
    root: str = "~/datasets"
    epochs: int = 100
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    lr_warmup: int = 0
    batch_size: int = 1000
    timesteps: int = 100
    beta_schedule: str = "linear"
    beta_start: float = 0.001
    beta_end: float = 0.2
    model_mean_type: str = "eps"
    model_var_type: str = "fixed-large"
    loss_type: str = "mse"
    image_dir: str = "./images/train"
    chkpt_dir: str = "./chkpts"
    chkpt_intv: int = 100
    eval_intv: int = 10
    seed: int = 1234
    resume: bool = False
    device: str = "auto"
    mid_features: int = 128
    num_temporal_layers: int = 3
    # ---- beyond the reference (defaults keep its behaviour) ----
    recipe: str = "reference"
    chkpt_path: Optional[str] = None
    overwrite: bool = False
    chkpt_every_minutes: float = 10.0
    lr_decay: str = "none"
    grad_clip: float = 0.0
    ema_decay: float = 0.0
    fourier_features: int = 0
    fourier_scale: float = 1.0
    num_eval_samples: int = 50_000
    num_interim_samples: int = 5_000
    sampler: str = "ddpm"
    steps: Optional[int] = None
    eta: float = 0.0
    animation_format: str = "gif"
    class_cond: bool = False
    class_dropout: float = 0.1
    guidance_scale: Optional[float] = None
    loss_weight: str = "uniform"
    min_snr_gamma: float = 5.0
    zero_terminal_snr: bool = False
    log_every: int = 100
    no_progress: bool = False
    # Written by the run: the device `device` resolved to (stored in checkpoints).
    device_resolved: Optional[str] = None

    def __post_init__(self):
        values = self.to_dict()
        check_toy(values)
        if values["guidance_scale"] != self.guidance_scale:  # frozen: set once, here
            object.__setattr__(self, "guidance_scale", values["guidance_scale"])

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ToyRunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown toy setting(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["device_resolved"] is None:
            del out["device_resolved"]
        return out

    def replace(self, **changes: Any) -> "ToyRunConfig":
        return dataclasses.replace(self, **changes)


def default(name: str) -> Any:
    """The default of a toy setting (for the flags of `ddpmkit train-toy`)."""
    return ToyRunConfig.__dataclass_fields__[name].default


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_toy(c: dict[str, Any]) -> None:
    """Every value in range before anything runs (NaN and inf are out of every range); fills
    in a class-conditional run's guidance scale."""
    for name, value in c.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{_flag(name)} must be a finite number, got {value}")
    for name in ("size", "epochs", "lr", "batch_size", "timesteps", "mid_features",
                 "eval_intv", "chkpt_intv", "num_eval_samples", "num_interim_samples",
                 "log_every", "min_snr_gamma"):
        if c[name] is None or c[name] <= 0:
            raise UserError(f"{_flag(name)} must be positive, got {c[name]}")
    for name in ("num_temporal_layers", "lr_warmup", "grad_clip", "fourier_features",
                 "chkpt_every_minutes"):
        if c[name] < 0:
            raise UserError(f"{_flag(name)} must be >= 0, got {c[name]}")
    if c["timesteps"] < 2:
        raise UserError("--timesteps must be at least 2")
    if c["batch_size"] > c["size"]:
        raise UserError(f"--batch-size {c['batch_size']} is larger than --size {c['size']}")
    for name in ("beta1", "beta2", "ema_decay"):
        if not 0 <= c[name] < 1:
            raise UserError(f"{_flag(name)} must be in [0, 1), got {c[name]}")
    if c["steps"] is not None and c["steps"] <= 0:
        raise UserError(f"--steps must be positive, got {c['steps']}")
    if c["eta"] != 0 and c["sampler"] != "ddim":
        raise UserError(f"--eta applies to ddim only, not to {c['sampler']}")
    _check_classes(c)
    if c["chkpt_path"] and not c["resume"]:
        raise UserError("--chkpt-path names the checkpoint to resume from: add --resume, or "
                        "drop --chkpt-path to start a new run")


def _check_classes(c: dict[str, Any]) -> None:
    """Class conditioning needs labels (the mixtures' modes); guidance needs conditioning."""
    if not 0 <= c["class_dropout"] < 1:
        raise UserError(f"--class-dropout must be in [0, 1), got {c['class_dropout']}")
    if c["class_cond"] and c["dataset"] == "swissroll":
        raise UserError("--class-cond needs labels, and swissroll has none: use gaussian8 or "
                        "gaussian25 (labels are the mode index)")
    if c["guidance_scale"] is not None:
        if not c["class_cond"]:
            raise UserError("--guidance-scale needs --class-cond (an unconditional model has "
                            "nothing to guide)")
        if not 0 <= c["guidance_scale"] < math.inf:
            raise UserError(f"--guidance-scale must be a finite number >= 0, got "
                            f"{c['guidance_scale']}")
    elif c["class_cond"]:
        c["guidance_scale"] = DEFAULT_TOY_GUIDANCE_SCALE
