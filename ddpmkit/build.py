"""Config sections -> library objects, in one place (diffusion now; networks via their modules).

The `diffusion` section uses the reference's keys: beta_schedule, beta_start, beta_end,
timesteps, model_mean_type, model_var_type, loss_type; and two of ddpmkit's own, both optional:
- `beta_schedule: "custom"` with `betas`, a list of `timesteps` values in (0, 1) (what a
  diffusers scheduler's `trained_betas` or `sigmoid` schedule becomes);
- `clip_denoised`: whether samplers clip the predicted x_0 to [-1, 1] (default: yes for images;
  a diffusers scheduler's `clip_sample`).
The objective keys `loss_weight`, `min_snr_gamma` and `zero_terminal_snr` (rescale the betas,
whatever their schedule, to zero terminal SNR) are absent from older checkpoints: their defaults
reproduce what those trained.
"""

from typing import Any, Dict

from ddpmkit.config import schema
from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule, rescale_zero_terminal_snr
from ddpmkit.errors import UserError

# The diffusion section's built-in values: the schema's (its one source of defaults).
DIFFUSION_DEFAULTS: Dict[str, Any] = schema.defaults()["diffusion"]
CUSTOM_SCHEDULE = "custom"


def _betas(cfg: Dict[str, Any]):
    """betas (T,) named by the section, rescaled to zero terminal SNR when it asks."""
    betas = schedule_betas(cfg)
    return rescale_zero_terminal_snr(betas) if cfg["zero_terminal_snr"] is True else betas


def schedule_betas(cfg: Dict[str, Any]):
    """betas (T,) of the section's schedule, or the explicit `betas` list of `custom` (before
    any zero-terminal-SNR rescaling)."""
    cfg = {**DIFFUSION_DEFAULTS, **(cfg or {})}
    if cfg["beta_schedule"] != CUSTOM_SCHEDULE:
        return get_beta_schedule(cfg["beta_schedule"], cfg["timesteps"],
                                 beta_start=cfg["beta_start"], beta_end=cfg["beta_end"])
    betas = cfg.get("betas")
    if not isinstance(betas, (list, tuple)) or len(betas) != cfg["timesteps"]:
        raise ValueError(f"beta_schedule \"{CUSTOM_SCHEDULE}\" needs \"betas\", a list of "
                         f"\"timesteps\" ({cfg['timesteps']}) numbers")
    return [float(b) for b in betas]


def build_diffusion(cfg: Dict[str, Any], decoder: str = "discretized") -> GaussianDiffusion:
    """A GaussianDiffusion from a `diffusion` config section; bad values become UserError."""
    cfg = {**DIFFUSION_DEFAULTS, **(cfg or {})}
    clip = cfg.get("clip_denoised")
    for name in ("clip_denoised", "zero_terminal_snr"):
        if cfg.get(name) is not None and not isinstance(cfg[name], bool):
            raise UserError(f"invalid diffusion settings: {name} must be true or false, "
                            f"got {cfg[name]!r}")
    try:
        return GaussianDiffusion(_betas(cfg), model_mean_type=cfg["model_mean_type"],
                                 model_var_type=cfg["model_var_type"],
                                 loss_type=cfg["loss_type"], decoder=decoder, clip_denoised=clip,
                                 loss_weight=cfg["loss_weight"],
                                 min_snr_gamma=cfg["min_snr_gamma"])
    except (ValueError, TypeError) as exc:
        raise UserError(f"invalid diffusion settings: {exc}") from exc
