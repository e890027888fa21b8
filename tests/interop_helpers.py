"""diffusers configs and models shared by the interop tests (diffusers is imported lazily)."""

import copy

import torch
from helpers import randomize_

# The UNet2DModel config of google/ddpm-cifar10-32 (the DDPM paper's CIFAR-10 network).
CIFAR10_32 = {
    "_class_name": "UNet2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2, "attention_head_dim": None, "norm_eps": 1e-6, "norm_num_groups": 32,
    "freq_shift": 1, "flip_sin_to_cos": False, "downsample_padding": 0,
    "center_input_sample": False, "act_fn": "silu", "time_embedding_type": "positional",
    "mid_block_scale_factor": 1,
}
# The layout of google/ddpm-celebahq-256, -church-256, -bedroom-256, -cat-256.
LAYOUT_256 = {
    **CIFAR10_32, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}
# google/ddpm-cifar10-32's scheduler_config.json.
SCHEDULER_CIFAR10 = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
    "beta_start": 0.0001, "beta_end": 0.02, "variance_type": "fixed_large",
    "clip_sample": True, "trained_betas": None,
}
# Tiny versions of both layouts (same block pattern, few channels) for the default suite.
TINY_32 = {**CIFAR10_32, "sample_size": 16, "block_out_channels": [16, 32, 32, 32],
           "norm_num_groups": 8}
TINY_256 = {**LAYOUT_256, "sample_size": 32, "block_out_channels": [16, 16, 32, 32, 64, 64],
            "norm_num_groups": 8}
# Smallest useful: 2 levels, attention at the second, 8x8 images.
TINY = {**CIFAR10_32, "sample_size": 8, "block_out_channels": [16, 32], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8}


def unet_kwargs(config):
    """The constructor arguments of a config.json (without its `_` entries)."""
    return {k: copy.deepcopy(v) for k, v in config.items() if not k.startswith("_")}


def random_unet(config, seed=0):
    """A diffusers UNet2DModel with O(1) random weights (see helpers.randomize_), in eval mode."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return randomize_(UNet2DModel(**unet_kwargs(config)), seed).eval()


def save_model_folder(folder, unet_config=TINY, scheduler=None, seed=0, **save_kwargs):
    """A diffusers model folder as google/ddpm-* have it: config.json, weights,
    scheduler_config.json and model_index.json side by side. Returns the diffusers model."""
    import json
    import os

    from diffusers import DDPMScheduler

    unet = random_unet(unet_config, seed)
    unet.save_pretrained(str(folder), **save_kwargs)
    sched = scheduler if scheduler is not None else SCHEDULER_CIFAR10
    DDPMScheduler(**unet_kwargs(sched)).save_pretrained(str(folder))
    with open(os.path.join(str(folder), "model_index.json"), "w") as f:
        json.dump({"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
                   "unet": ["diffusers", "UNet2DModel"]}, f)
    return unet


def ddpm_pipeline_gap(folder, model, diffusion, batch=2):
    """Largest pixel difference (in [0, 1]) between diffusers' DDPMPipeline loaded from
    `folder` and ddpmkit's DDPM sampler on `model`, one generator for x_T and every step's
    noise (both draw x_T first, then one normal tensor per step t > 0)."""
    import numpy as np
    from diffusers import DDPMPipeline

    from ddpmkit import make_sampler, sample

    pipe = DDPMPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=batch, generator=torch.Generator().manual_seed(0),
                  num_inference_steps=diffusion.T, output_type="np").images
    g = torch.Generator().manual_seed(0)
    _, height, width, channels = theirs.shape
    x_T = torch.randn((batch, channels, height, width), generator=g)
    x_0 = sample(diffusion, model, make_sampler(diffusion, "ddpm"), x_T, generator=g)
    ours = (x_0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert theirs.std() > 0.05  # a real image, not a constant
    return np.abs(ours - theirs).max()
