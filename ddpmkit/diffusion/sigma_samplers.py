"""Samplers in Karras et al.'s sigma space on the VP (DDPM) discretisation: Heun, Euler ancestral.

References:
- Karras, Aittala, Aila, Laine (2022), "Elucidating the Design Space of Diffusion-Based
  Generative Models" (EDM), Algorithm 1: Heun's second-order method on the probability-flow
  ODE dx/dsigma = (x - D(x; sigma)) / sigma, with an Euler last step to sigma = 0 (no S_churn).
- The Euler ancestral sampler of k-diffusion (Crowson), as diffusers'
  EulerAncestralDiscreteScheduler: an Euler step to sigma_down, then fresh noise of std sigma_up,
  sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
  sigma_down = sqrt(sigma_next^2 - sigma_up^2).

A VP sample x_t is x = x_t / alpha_t in sigma space, sigma = sigma_t / alpha_t =
sqrt((1 - alphas_bar) / alphas_bar); D(x; sigma) is the network's x_0 at t (the timesteps are the
table's, so the network is always evaluated at the noise level it was trained for). The loop
works on VP samples: each step maps back with x_t = alpha_t x. At zero SNR (t = T-1 with zero
terminal SNR: alpha 0, sigma +inf) both take their sigma -> inf limit, written in VP terms: Heun
an Euler step alone, x_next = alpha_next x_0 + sigma_next eps (DDIM's; the correction evaluation
that follows keeps its sample, so the NFE stays 2 S - 1), Euler ancestral sigma_down -> 0 and
sigma_up -> sigma_next, x_next = alpha_next x_0 + sigma_next z.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ddpmkit.diffusion.sampler_utils import predict, sampler_points, vp_alpha_sigma


def _edm_sigma(diffusion, step: int) -> tuple[float, float]:
    """(alpha_t, sigma_t / alpha_t) at a step; (1, 0) for clean data."""
    alpha, sigma = vp_alpha_sigma(diffusion, step)
    return alpha, sigma / alpha


@dataclass
class _HeunState:
    x: Any = None            # the sample (sigma space) the pending Heun step started from
    slope: Any = None        # its Euler slope dx/dsigma
    d_sigma: float = 0.0     # sigma_next - sigma of that step


@dataclass
class HeunSampler:
    """Heun (EDM Algorithm 1) over S points and clean data: each step evaluates the network at
    its start and at its Euler end point; the last step (to sigma = 0) is Euler alone. The loop's
    timesteps list every evaluation: p_0, p_1, p_1, ..., p_{S-1}, p_{S-1}: 2 S - 1 in all."""
    T: int
    steps: int
    skip_schedule: str = "quadratic"
    alphas_bar: Optional[np.ndarray] = field(default=None, repr=False)
    points: Optional[np.ndarray] = None
    timesteps: np.ndarray = field(init=False)

    def __post_init__(self):
        self.points = sampler_points(self.points, self.T, self.steps, self.skip_schedule,
                                     self.alphas_bar)
        self.steps = len(self.points)
        # evaluation i = 0, 2, 4, ...: an Euler step from p_{i/2}; i odd: Heun's correction
        self.timesteps = np.concatenate([self.points[:1], np.repeat(self.points[1:], 2)])

    def needs_noise(self, i: int) -> bool:
        return False

    def new_state(self) -> Any:
        return _HeunState()

    def step(self, diffusion, model_output, x_t, i, noise, clip, state: _HeunState):
        t_now = int(self.timesteps[i])
        pred = predict(diffusion, model_output, x_t, t_now, clip)
        x_0 = pred.x_0
        if i % 2 == 1 and state.x is None:
            return x_t, x_0  # (4) after a zero-SNR start: no correction, keep the Euler point
        k = i // 2
        t_next = int(self.points[k + 1]) if i % 2 == 0 and k + 1 < len(self.points) else -1
        if i % 2 == 0 and t_next < 0:
            return x_0, x_0  # (3) the last step: Euler to sigma = 0 lands on x_0
        if i % 2 == 0 and diffusion.alphas_bar[t_now] == 0:
            # (0) zero SNR: the Euler step's sigma -> inf limit, x_next = alpha_next x_0 +
            # sigma_next eps (eps is the slope dx/dsigma); nothing to correct from
            state.x = None
            alpha_next, s_next = vp_alpha_sigma(diffusion, t_next)
            return alpha_next * x_0 + s_next * pred.eps, x_0
        alpha, sigma = _edm_sigma(diffusion, t_now)
        x = x_t / alpha
        slope = (x - x_0) / sigma  # dx/dsigma = (x - D(x; sigma)) / sigma
        if i % 2 == 1:
            # (2) correction at the Euler end point: the average of both slopes, from the start
            x_next = state.x + (0.5 * state.d_sigma) * (state.slope + slope)
            return alpha * x_next, x_0
        # (1) Euler step to sigma_next; kept for the correction at the next evaluation
        alpha_next, sigma_next = _edm_sigma(diffusion, t_next)
        state.x, state.slope, state.d_sigma = x, slope, sigma_next - sigma
        return alpha_next * (x + (sigma_next - sigma) * slope), x_0


@dataclass
class EulerAncestralSampler:
    """Euler ancestral over S points and clean data: one evaluation per step, fresh noise on
    every step but the last."""
    T: int
    steps: int
    skip_schedule: str = "quadratic"
    alphas_bar: Optional[np.ndarray] = field(default=None, repr=False)
    points: Optional[np.ndarray] = None
    timesteps: np.ndarray = field(init=False)

    def __post_init__(self):
        self.timesteps = sampler_points(self.points, self.T, self.steps, self.skip_schedule,
                                        self.alphas_bar)
        self.steps = len(self.timesteps)

    def needs_noise(self, i: int) -> bool:
        return i + 1 < len(self.timesteps)

    def new_state(self) -> Any:
        return None

    def step(self, diffusion, model_output, x_t, i, noise, clip, state):
        t_now = int(self.timesteps[i])
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        x_0 = predict(diffusion, model_output, x_t, t_now, clip).x_0
        if t_next < 0:
            return x_0, x_0  # sigma_next = 0: no noise, the Euler step lands on x_0
        if diffusion.alphas_bar[t_now] == 0:
            # zero SNR (sigma = +inf): sigma_down -> 0, sigma_up -> sigma_next
            alpha_next, s_next = vp_alpha_sigma(diffusion, t_next)
            return alpha_next * x_0 + s_next * noise, x_0
        alpha, sigma = _edm_sigma(diffusion, t_now)
        alpha_next, sigma_next = _edm_sigma(diffusion, t_next)
        sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        x = x_t / alpha
        x = x + ((sigma_down - sigma) / sigma) * (x - x_0) + sigma_up * noise
        return alpha_next * x, x_0
