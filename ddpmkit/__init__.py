"""ddpmkit: train, sample and evaluate denoising diffusion models (DDPM, DDIM, DPM-Solver++).

The diffusion math is imported eagerly; networks, data and metrics load on first use so that
`import ddpmkit` stays light.
"""

import importlib

from ddpmkit.diffusion import (
    GaussianDiffusion,
    ddim_timesteps,
    get_beta_schedule,
    make_sampler,
    sample,
)

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily, PEP 562)
_LAZY = {
    "UNet": "ddpmkit.models.unet",
    "ToyMLP": "ddpmkit.models.toy",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddpmkit' has no attribute {name!r}")


__all__ = ["GaussianDiffusion", "get_beta_schedule", "ddim_timesteps", "make_sampler", "sample",
           *_LAZY]
