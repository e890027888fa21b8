"""Which training objectives are defined, and the min-SNR loss weights over t.

References:
- Ho, Jain, Abbeel (2020), DDPM: eq. 12/14 (MSE losses), eq. 5 (the variational bound).
- Hang et al. (2023), "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 7-9:
  the `min-snr` loss weights.
- Lin et al. (2024), "Common Diffusion Noise Schedules and Sampling Steps Are Flawed": zero
  terminal SNR (alphas_bar_{T-1} = 0, the last beta 1).

Symbols (float64, shape (T,)): `snr` SNR_t = alphas_bar / (1 - alphas_bar); `coef1` the
posterior mean's coefficient of x_0 (DDPM eq. 7); `gamma` the min-SNR cap.

`min_snr_weight` weights the MSE at step t by w_t = min(SNR_t, gamma) / f_t, where f_t
(`x_0_loss_factor`) turns the mean type's MSE into the MSE of x_0: every mean type then
minimises min(SNR_t, gamma) |x_0 - x_0^|^2 (Hang et al. 2023: eps min(SNR, g) / SNR,
x_0 min(SNR, g), v min(SNR, g) / (SNR + 1); for `mean`, min(SNR, g) / coef1^2).
"""

import math
from typing import Tuple

import numpy as np


def check_choice(value: str, allowed: Tuple[str, ...], what: str) -> str:
    """`value` if it is one of `allowed`, else a ValueError listing them."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
    return value


def check_objective(betas: np.ndarray, model_mean_type: str, model_var_type: str,
                    loss_type: str, loss_weight: str, min_snr_gamma: float) -> None:
    """ValueError for the betas and the combinations of settings that are not defined."""
    if betas.ndim != 1 or len(betas) < 2:
        raise ValueError("betas must be a 1-D array of at least 2 diffusion steps")
    # Only the last beta may be 1: zero terminal SNR (x_{T-1} is pure noise).
    if not (np.all((betas[:-1] > 0) & (betas[:-1] < 1)) and 0 < betas[-1] <= 1):
        raise ValueError("every beta must lie in (0, 1) (the last may be 1: zero terminal SNR)")
    if loss_type == "mse" and model_var_type == "learned":
        raise ValueError(
            "loss type 'mse' trains only the mean, so a 'learned' variance would never be "
            "trained; use loss type 'kl' with 'learned', or model variance type "
            "'fixed-small' / 'fixed-large' with 'mse'"
        )
    if loss_weight == "min-snr" and loss_type != "mse":
        raise ValueError("loss weight 'min-snr' weights the MSE over t; loss type 'kl' is the "
                         "variational bound, which a weighting would no longer be: use "
                         "loss weight 'uniform' with 'kl'")
    if not (math.isfinite(min_snr_gamma) and min_snr_gamma > 0):
        raise ValueError(f"min-SNR gamma must be a positive number, got {min_snr_gamma}")
    if betas[-1] == 1 and model_mean_type == "eps":
        raise ValueError("zero terminal SNR leaves no signal at t = T-1, where x_0 cannot be "
                         "recovered from eps (it divides by sqrt(alphas_bar) = 0); use model "
                         "mean type 'v' (Lin et al. 2024) or 'x_0'")


def x_0_loss_factor(model_mean_type: str, snr: np.ndarray, coef1: np.ndarray) -> np.ndarray:
    """f_t with |target - output|^2 = f_t |x_0 - x_0^|^2 for the mean type's MSE: eps: SNR;
    x_0: 1; v: SNR + 1; mean: coef1^2 (mu~ is coef1 x_0 plus a term in x_t)."""
    return {"eps": snr, "x_0": np.ones_like(snr), "v": snr + 1.0,
            "mean": coef1 ** 2}[model_mean_type]


def min_snr_weight(model_mean_type: str, snr: np.ndarray, coef1: np.ndarray,
                   gamma: float) -> np.ndarray:
    """w_t = min(SNR_t, gamma) / f_t (Hang et al. 2023, eq. 7-9), float64 (T,)."""
    return np.minimum(snr, gamma) / x_0_loss_factor(model_mean_type, snr, coef1)
