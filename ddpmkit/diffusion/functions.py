"""Log-likelihoods and KL divergences of Gaussians, elementwise.

References: DDPM (Ho et al. 2020) section 3.3 (discretized decoder, eq. 13); the official DDPM
code's `normal_kl` and `discretized_gaussian_log_likelihood`; the erf-free normal CDF
approximation of Page (1977) used there.

All functions are elementwise over broadcastable tensors and return natural-log (nats) values.
"""

import math

import torch

# Data in [-1, 1] quantized to 256 levels: bin half-width 1/255.
PIXEL_HALF_BIN = 1.0 / 255.0
# Below this probability a bin is treated as empty (log clamp), as in the official code.
MIN_PROB = 1e-12
# The edge bins take all the mass below -1 + 1/255 and above 1 - 1/255.
EDGE = 0.999


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, *S) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) via tanh (Page 1977); the official DDPM decoder uses this, so bits/dim match."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log P(x) of pixels x in [-1, 1] (256 levels) under N(means, exp(log_scales)^2) binned.

    DDPM eq. 13: the integral of the Gaussian over [x - 1/255, x + 1/255], with the edge bins
    extended to -inf and +inf.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + PIXEL_HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - PIXEL_HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=MIN_PROB))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=MIN_PROB))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=MIN_PROB))
    return torch.where(
        x < -EDGE, log_cdf_plus,
        torch.where(x > EDGE, log_one_minus_cdf_min, log_cdf_delta),
    )


def continuous_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log N(x; means, exp(log_scales)^2), the density for continuous (toy) data."""
    z = (x - means) * torch.exp(-log_scales)
    return -0.5 * (math.log(2 * math.pi) + z ** 2) - log_scales
