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
