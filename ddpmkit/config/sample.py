"""What a sample run is asked to do, as one frozen dataclass of plain values (no torch).

`ddpmkit generate` builds a `SampleConfig` from its flags; Python code builds one directly (or
passes a dict of its fields to `from_dict`). `check` refuses bad values with one-line
`UserError`s that name each value as the caller knows it: the CLI passes its flag spellings.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

from ddpmkit.choices import (
    ANIMATION_FORMATS,
    COMPILE_MODES,
    DDIM_EPS_SOURCES,
    DDIM_STEP_TARGETS,
    PRECISIONS,
    SAMPLERS,
    SKIP_SCHEDULES,
)
from ddpmkit.errors import UserError

# The dataset a checkpoint without a config is assumed to be, when none is named.
DEFAULT_DATASET = "cifar10"
# Steps when none are given (DDIM: the reference's --subseq-size default).
# The other solvers take make_sampler's: 20 steps, heun 10 (19 network evaluations).
DEFAULT_STEPS = {"ddim": 50, "dpm-solver++": 20}
ANIMATE_TARGETS = ("x_0", "x_t")


@dataclass(frozen=True)
class SampleConfig:
    """One sample run. `checkpoint`: a file, a diffusers folder or a Hub id; empty: the newest
    of `chkpt_dir` for `dataset`. `dataset` None: the checkpoint's own (else DEFAULT_DATASET).
    `use_ema` None: the EMA weights when the checkpoint has them. `class_labels` None: every
    class in turn. Samples go to `<save_dir>/<dataset><suffix>/`."""
    checkpoint: str = ""
    chkpt_dir: str = "./chkpts"
    dataset: str | None = None
    config_path: str = ""
    config_dir: str = "./configs"
    use_ema: bool | None = None
    group_norm_eps: float | None = None
    # what decides the images
    sampler: str = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    skip_schedule: str | None = None
    ddim_eps_from: str | None = None
    ddim_step_to: str | None = None
    seed: int = 0
    precision: str = "auto"
    class_labels: tuple[str, ...] | None = None
    guidance_scale: float | None = None
    # how much, where and how fast
    total_size: int = 50000
    batch_size: int = 128
    save_dir: str = "./images/eval"
    suffix: str = ""
    device: str = "auto"
    num_gpus: int = 1
    max_workers: int = 8
    channels_last: bool = False
    compile: str | None = None
    cuda_graph: bool = False
    progress: bool = True
    # extras beside the folder
    grid: bool = False
    grid_size: int = 64
    animate: bool = False
    animate_format: str = "webp"
    animate_count: int = 8
    animate_target: str = "x_0"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SampleConfig:
        """A config from plain values; an unknown key is a UserError naming the closest one."""
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UserError(f"unknown sample setting {key!r}{hint}")
        values = dict(values)
        if values.get("class_labels") is not None:
            values["class_labels"] = tuple(str(v) for v in values["class_labels"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def sampler_steps(self) -> int | None:
        """The steps asked for, or the sampler's default (None: ddpm, all T steps)."""
        return self.steps or DEFAULT_STEPS.get(self.sampler)

    @property
    def dataset_or_default(self) -> str:
        return self.dataset or DEFAULT_DATASET

    def check(self, spell: Callable[[str], str] = str) -> None:
        """Every value checked before any work; `spell(field)` names a field in messages."""
        for key, low in (("total_size", 1), ("batch_size", 1), ("num_gpus", 1),
                         ("max_workers", 0), ("grid_size", 1), ("animate_count", 1)):
            if getattr(self, key) < low:
                raise UserError(f"{spell(key)} must be at least {low}, got {getattr(self, key)}")
        for key, allowed in (("sampler", SAMPLERS), ("precision", PRECISIONS),
                             ("animate_format", ANIMATION_FORMATS),
                             ("animate_target", ANIMATE_TARGETS)):
            if getattr(self, key) not in allowed:
                raise UserError(f"{spell(key)} must be one of {', '.join(allowed)}, got "
                                f"{getattr(self, key)!r}")
        for key, allowed in (("skip_schedule", SKIP_SCHEDULES), ("compile", COMPILE_MODES),
                             ("ddim_eps_from", DDIM_EPS_SOURCES),
                             ("ddim_step_to", DDIM_STEP_TARGETS)):
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise UserError(f"{spell(key)} must be one of {', '.join(allowed)}, got "
                                f"{value!r}")
        self._check_sampler(spell)
        if self.group_norm_eps is not None and not self.group_norm_eps > 0:
            raise UserError(f"{spell('group_norm_eps')} must be positive, got "
                            f"{self.group_norm_eps}")
        if self.guidance_scale is not None and not 0 <= self.guidance_scale < math.inf:
            raise UserError(f"{spell('guidance_scale')} must be a finite number >= 0, got "
                            f"{self.guidance_scale}")
        if self.class_labels is not None and not [v for v in self.class_labels if v.strip()]:
            raise UserError(f"{spell('class_labels')} needs a class number or name, or a comma "
                            "list of them")

    def _check_sampler(self, spell: Callable[[str], str]) -> None:
        if self.steps is not None:
            if self.sampler == "ddpm":
                raise UserError(f"{spell('steps')} apply to every sampler but ddpm, which "
                                "uses all T steps")
            if self.steps < 1:
                raise UserError(f"{spell('steps').split(' ')[0]} must be at least 1, got "
                                f"{self.steps}")
        if not 0 <= self.eta < math.inf:
            raise UserError(f"{spell('eta')} must be a finite number >= 0, got {self.eta}")
        if self.sampler != "ddim" and self.eta != 0:
            raise UserError(f"{spell('eta')} applies to ddim only, not to {self.sampler}")
        if (self.ddim_eps_from or self.ddim_step_to) and self.sampler != "ddim":
            raise UserError(f"{spell('ddim_eps_from')} / {spell('ddim_step_to')} apply to ddim "
                            f"only, not to {self.sampler}")
