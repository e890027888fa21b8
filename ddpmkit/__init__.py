"""ddpmkit: train, sample and evaluate denoising diffusion models (DDPM, DDIM, DPM-Solver++).

Every public name loads on first use (PEP 562), so `import ddpmkit` and the `ddpmkit` command's
`--help` stay fast and never import torch until something needs it.
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "GaussianDiffusion": "ddpmkit.diffusion",
    "get_beta_schedule": "ddpmkit.diffusion",
    "rescale_zero_terminal_snr": "ddpmkit.diffusion",
    "ddim_timesteps": "ddpmkit.diffusion",
    "make_sampler": "ddpmkit.diffusion",
    "sample": "ddpmkit.diffusion",
    "UNet": "ddpmkit.models.unet",
    "ToyMLP": "ddpmkit.models.toy",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddpmkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = list(_LAZY)
