"""The toy run's configuration: `ToyRunConfig`, frozen, one field per `train-toy` flag (the
reference project's spellings), each defaulting to its key in the toy section of the schema
(`config.toy_schema`); `to_dict()` is the flat dict every toy checkpoint stores. No torch.

Build one in Python with keyword arguments (`ToyRunConfig(dataset="gaussian25", epochs=20)`),
or from a dict with `from_dict`; either way the values are checked against the schema
(`check_toy`) and a bad one is a one-line `UserError` naming its flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ddpmkit.config.toy_schema import check_toy
from ddpmkit.config.toy_schema import toy_default as _d
from ddpmkit.errors import UserError


@dataclass(frozen=True)
class ToyRunConfig:
    # ---- the reference project's settings (names, defaults) ----
    dataset: str = _d("dataset")
    size: int = _d("size")
    root: str = _d("root")
    epochs: int = _d("epochs")
    lr: float = _d("lr")
    beta1: float = _d("beta1")
    beta2: float = _d("beta2")
    lr_warmup: int = _d("lr_warmup")
    batch_size: int = _d("batch_size")
    timesteps: int = _d("timesteps")
    beta_schedule: str = _d("beta_schedule")
    beta_start: float = _d("beta_start")
    beta_end: float = _d("beta_end")
    model_mean_type: str = _d("model_mean_type")
    model_var_type: str = _d("model_var_type")
    loss_type: str = _d("loss_type")
    image_dir: str = _d("image_dir")
    chkpt_dir: str = _d("chkpt_dir")
    chkpt_intv: int = _d("chkpt_intv")
    eval_intv: int = _d("eval_intv")
    seed: int = _d("seed")
    resume: bool = _d("resume")
    device: str = _d("device")
    mid_features: int = _d("mid_features")
    num_temporal_layers: int = _d("num_temporal_layers")
    # ---- beyond the reference (defaults keep its behaviour) ----
    recipe: str = _d("recipe")
    chkpt_path: Optional[str] = _d("chkpt_path")
    overwrite: bool = _d("overwrite")
    chkpt_every_minutes: float = _d("chkpt_every_minutes")
    lr_decay: str = _d("lr_decay")
    grad_clip: float = _d("grad_clip")
    ema_decay: float = _d("ema_decay")
    fourier_features: int = _d("fourier_features")
    fourier_scale: float = _d("fourier_scale")
    num_eval_samples: int = _d("num_eval_samples")
    num_interim_samples: int = _d("num_interim_samples")
    sampler: str = _d("sampler")
    steps: Optional[int] = _d("steps")
    eta: float = _d("eta")
    animation_format: str = _d("animation_format")
    class_cond: bool = _d("class_cond")
    class_dropout: float = _d("class_dropout")
    guidance_scale: Optional[float] = _d("guidance_scale")
    loss_weight: str = _d("loss_weight")
    min_snr_gamma: float = _d("min_snr_gamma")
    zero_terminal_snr: bool = _d("zero_terminal_snr")
    log_every: int = _d("log_every")
    no_progress: bool = _d("no_progress")
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
