"""Small things several test files share (plain values; fixtures live in conftest.py)."""

import copy

# A tiny image-model config (8x8 images, 16 channels, T = 10) for checkpoint and generation
# tests; use `tiny_config()` for a copy that a test may change.
_TINY_CONFIG = {
    "dataset": {"name": "cifar10", "resolution": 8, "channels": 3},
    "diffusion": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.2,
                  "timesteps": 10, "model_mean_type": "eps", "model_var_type": "fixed-large",
                  "loss_type": "mse"},
    "model": {"in_channels": 3, "hid_channels": 16, "ch_multipliers": [1, 2],
              "num_res_blocks": 1, "apply_attn": [False, True], "num_groups": 8},
}


def tiny_config():
    return copy.deepcopy(_TINY_CONFIG)


def randomize_(model, seed=0):
    """Redraw every parameter at a scale that keeps activations O(1), in place.

    Freshly built UNets start their residual branches and output layer near zero (scale
    1e-10), so their output is ~1e-5 and a comparison of two paths' outputs passes whatever
    the paths compute. Tests of fast paths (compile, bf16, channels_last, CUDA graphs) use
    this instead: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2).
    """
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() > 1:
                value = noise / math.sqrt(p[0].numel())
            elif name.endswith("weight"):  # GroupNorm scale
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))
    return model


def rel_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64 (one number for a whole output)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).norm() / expected.norm())
