"""Networks: the DDPM UNet for images (and the toy MLP for 2-D data)."""

from ddpmkit.models.unet import UNet, build_model, count_parameters

__all__ = [
    "UNet",
    "build_model",
    "count_parameters",
]

from ddpmkit.models.toy import ToyMLP  # the 2-D toy network

__all__ += ["ToyMLP"]
