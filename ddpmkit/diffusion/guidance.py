"""Classifier-free guidance: a class-conditional network as a plain `denoise_fn(x_t, t)`.

Reference: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6:

    eps~(x_t, y) = (1 + w) eps(x_t, y) - w eps(x_t, no class)

w = 0 is the conditional model itself; w > 0 trades diversity for samples more typical of the
class. Both predictions come from one network call on the batch doubled (labels y, then the
"no class" label K).

Mean types: the network's mean channels predict eps, x_0, the posterior mean mu~ or v. At
fixed (x_t, t) each is an affine function of eps with the same x_t term (x_0 = a x_t - b eps,
mu~ = c_1 x_0 + c_2 x_t, v = (eps - sqrt(1 - alphas_bar) x_t) / sqrt(alphas_bar)), and
an affine combination whose weights sum to one ((1 + w) - w = 1) commutes with such maps:
guiding the raw x_0, mu~ or v output is exactly guiding the eps it implies (at zero terminal
SNR, where eps says nothing about x_0, v is still affine in x_0 and the same holds there), so
the formula is applied to the raw output for every mean type. It is applied
before any clipping of x_0 (clipping is not affine; the sampler clips the guided prediction).
Learned variance: the log-variance channels (second half of dim 1) are the conditional
prediction's, unguided (as in GLIDE's guided sampler, Nichol et al. 2022).

Shapes: x_t (B, *S); y int64 (B,) in [0, K); network output (B, C_out, ...).
"""

from typing import Callable

import torch

from ddpmkit.diffusion.gaussian import DenoiseFn

# net(x_t, t, y) -> output
ConditionalNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guidance_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float,
                     learned_variance: bool = False) -> torch.Tensor:
    """(1 + w) cond - w uncond on the mean channels (eq. 6); with `learned_variance` the
    second half of dim 1 (log-variance) is `cond`'s. cond, uncond: (B, C_out, ...)."""
    if learned_variance:
        cond_mean, cond_logvar = cond.chunk(2, dim=1)
        uncond_mean, _ = uncond.chunk(2, dim=1)
        return torch.cat([guidance_combine(cond_mean, uncond_mean, scale), cond_logvar], dim=1)
    # cond + w (cond - uncond): the same value, and no cancellation of two large terms.
    return cond + scale * (cond - uncond)


def classifier_free_guidance(net: ConditionalNet, y: torch.Tensor, num_classes: int,
                             scale: float, learned_variance: bool = False) -> DenoiseFn:
    """`denoise_fn(x_t, t)` for `sample`: the guided prediction for labels y (B,).

    One call of `net` per step on (2B, ...): rows 0..B-1 with y, rows B..2B-1 with the "no
    class" label `num_classes`. With w = 0 the conditional call alone (the same result at half
    the cost).
    """
    if not scale >= 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    if scale == 0:
        return lambda x_t, t: net(x_t, t, y)
    y_both = torch.cat([y, torch.full_like(y, num_classes)])  # (2B,)

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x_t.shape[0]
        out = net(torch.cat([x_t, x_t]), torch.cat([t, t]), y_both)  # (2B, C_out, ...)
        return guidance_combine(out[:B], out[B:], scale, learned_variance)

    return guided
