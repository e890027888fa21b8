"""Config sections -> library objects, in one place (diffusion now; networks via their modules).

The `diffusion` section uses the reference's keys: beta_schedule, beta_start, beta_end,
timesteps, model_mean_type, model_var_type, loss_type.
"""

from typing import Any, Dict

from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule
from ddpmkit.errors import UserError

DIFFUSION_DEFAULTS: Dict[str, Any] = {
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "timesteps": 1000,
    "model_mean_type": "eps",
    "model_var_type": "fixed-large",
    "loss_type": "mse",
}


def build_diffusion(cfg: Dict[str, Any], decoder: str = "discretized") -> GaussianDiffusion:
    """A GaussianDiffusion from a `diffusion` config section; bad values become UserError."""
    cfg = {**DIFFUSION_DEFAULTS, **(cfg or {})}
    try:
        betas = get_beta_schedule(cfg["beta_schedule"], cfg["timesteps"],
                                  beta_start=cfg["beta_start"], beta_end=cfg["beta_end"])
        return GaussianDiffusion(betas, model_mean_type=cfg["model_mean_type"],
                                 model_var_type=cfg["model_var_type"],
                                 loss_type=cfg["loss_type"], decoder=decoder)
    except ValueError as exc:
        raise UserError(f"invalid diffusion settings: {exc}") from exc
