"""Frozen run configurations: one dataclass per config section, and the image run (all
sections) built from them. No torch.

`from_dict` takes a resolved config (the nested dict every checkpoint stores, see
`config.resolve`) and `to_dict` gives it back unchanged, so checkpoints keep their format. A key
whose value is null and that the section does not always write (`ALWAYS_WRITTEN`) is left out of
`to_dict`, as it is from today's resolved configs: null means "decide for me" (see the schema),
the same as a missing key. Lists are held as tuples (the objects are immutable) and written back
as lists. Every default is read from the schema, the one place defaults are written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Union

from ddpmkit.config.schema import SCHEMA, eval_sampler_name
from ddpmkit.errors import UserError

Size = Union[int, tuple]


def _default(section: str, name: str):
    return field(default=SCHEMA[section][name].default)


def frozen_value(value: Any) -> Any:
    return tuple(frozen_value(v) for v in value) if isinstance(value, (list, tuple)) else value


def plain_value(value: Any) -> Any:
    return [plain_value(v) for v in value] if isinstance(value, (list, tuple)) else value


class Section:
    """from_dict / to_dict for a section dataclass whose fields are its schema keys."""

    SECTION: ClassVar[str] = ""
    ALWAYS_WRITTEN: ClassVar[tuple] = ()

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]):
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown key(s) {', '.join(unknown)} in the config's "
                            f"{cls.SECTION!r} section (see the README's config keys)")
        return cls(**{k: frozen_value(v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain_value(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None or f.name in self.ALWAYS_WRITTEN}


@dataclass(frozen=True)
class DatasetCfg(Section):
    SECTION: ClassVar[str] = "dataset"
    name: str = _default("dataset", "name")
    root: str = _default("dataset", "root")
    split: Optional[str] = None
    resolution: Optional[Size] = None
    channels: Optional[int] = None
    resize_mode: str = _default("dataset", "resize_mode")
    strict_images: bool = _default("dataset", "strict_images")
    random_flip: Optional[bool] = None
    download: bool = _default("dataset", "download")
    num_workers: Optional[int] = None
    class_names: Optional[tuple] = None


@dataclass(frozen=True)
class DiffusionCfg(Section):
    SECTION: ClassVar[str] = "diffusion"
    timesteps: int = _default("diffusion", "timesteps")
    beta_schedule: str = _default("diffusion", "beta_schedule")
    beta_start: float = _default("diffusion", "beta_start")
    beta_end: float = _default("diffusion", "beta_end")
    model_mean_type: str = _default("diffusion", "model_mean_type")
    model_var_type: str = _default("diffusion", "model_var_type")
    loss_type: str = _default("diffusion", "loss_type")
    loss_weight: str = _default("diffusion", "loss_weight")
    min_snr_gamma: float = _default("diffusion", "min_snr_gamma")
    zero_terminal_snr: bool = _default("diffusion", "zero_terminal_snr")


@dataclass(frozen=True)
class ModelCfg(Section):
    """The UNet; the four `schema.MODEL_REQUIRED` keys have no built-in value (a config file
    names them)."""

    SECTION: ClassVar[str] = "model"
    in_channels: Optional[int] = None
    hid_channels: Optional[int] = None
    ch_multipliers: Optional[tuple] = None
    num_res_blocks: Optional[int] = None
    apply_attn: Union[bool, tuple, None] = None
    drop_rate: float = _default("model", "drop_rate")
    group_norm_eps: float = _default("model", "group_norm_eps")
    block_size: int = _default("model", "block_size")
    time_embedding_dim: Optional[int] = None
    num_groups: int = _default("model", "num_groups")
    num_classes: Optional[int] = None


@dataclass(frozen=True)
class TrainCfg(Section):
    SECTION: ClassVar[str] = "train"
    epochs: int = _default("train", "epochs")
    max_steps: Optional[int] = None
    lr: float = _default("train", "lr")
    beta1: float = _default("train", "beta1")
    beta2: float = _default("train", "beta2")
    weight_decay: float = _default("train", "weight_decay")
    batch_size: int = _default("train", "batch_size")
    num_accum: int = _default("train", "num_accum")
    grad_norm: float = _default("train", "grad_norm")
    warmup: int = _default("train", "warmup")
    use_ema: bool = _default("train", "use_ema")
    ema_decay: float = _default("train", "ema_decay")
    image_intv: int = _default("train", "image_intv")
    num_samples: int = _default("train", "num_samples")
    chkpt_intv: int = _default("train", "chkpt_intv")
    chkpt_every_minutes: float = _default("train", "chkpt_every_minutes")
    chkpt_every_steps: int = _default("train", "chkpt_every_steps")
    log_intv: int = _default("train", "log_intv")
    seed: int = _default("train", "seed")
    precision: str = _default("train", "precision")
    channels_last: Optional[bool] = None
    compile: Union[bool, str, None] = None
    class_cond: bool = _default("train", "class_cond")
    class_dropout: float = _default("train", "class_dropout")


@dataclass(frozen=True)
class EvalCfg(Section):
    SECTION: ClassVar[str] = "eval"
    ALWAYS_WRITTEN: ClassVar[tuple] = ("intv",)  # null: no evaluations (chkpt_intv is 0)
    enabled: bool = _default("eval", "enabled")
    intv: Optional[int] = None
    total_size: int = _default("eval", "total_size")
    batch_size: int = _default("eval", "batch_size")
    use_ddim: bool = _default("eval", "use_ddim")
    sampler: Optional[str] = None
    skip_schedule: str = _default("eval", "skip_schedule")
    subseq_size: int = _default("eval", "subseq_size")
    guidance_scale: float = _default("eval", "guidance_scale")

    @property
    def sampler_name(self) -> str:
        return eval_sampler_name(self.to_dict())


@dataclass(frozen=True)
class RunPaths(Section):
    """Where a run writes: `<chkpt_dir>/<exp_name>/<chkpt_name>_*.pt` and
    `<image_dir>/<exp_name>/` (the config's `run` entry)."""

    SECTION: ClassVar[str] = "run"
    exp_name: str = "cifar10"
    chkpt_name: str = "ddpm_cifar10"
    image_dir: str = "./images/train"
    chkpt_dir: str = "./chkpts"


SECTIONS = {"dataset": DatasetCfg, "diffusion": DiffusionCfg, "model": ModelCfg,
            "train": TrainCfg, "eval": EvalCfg, "run": RunPaths}


@dataclass(frozen=True)
class ImageRunConfig:
    """A resolved image-training run: what `ddpmkit train` trains and every checkpoint stores
    (as `to_dict()`); `config_file` is the JSON file it was resolved from."""

    dataset: DatasetCfg = field(default_factory=DatasetCfg)
    diffusion: DiffusionCfg = field(default_factory=DiffusionCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    run: RunPaths = field(default_factory=RunPaths)
    config_file: Optional[str] = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "ImageRunConfig":
        unknown = sorted(set(config) - set(SECTIONS) - {"config_file"})
        if unknown:
            raise UserError(f"unknown section(s) {', '.join(unknown)} in the run config")
        return cls(**{name: kind.from_dict(config.get(name)) for name, kind in SECTIONS.items()},
                   config_file=config.get("config_file"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name).to_dict() for name in SECTIONS}
        if self.config_file is not None:
            out["config_file"] = self.config_file
        return out

    def replace(self, section: str, **changes: Any) -> "ImageRunConfig":
        """A copy with keys of one section changed (`config.replace("train", precision="bf16")`)."""
        return dataclasses.replace(self, **{
            section: dataclasses.replace(getattr(self, section), **changes)})
