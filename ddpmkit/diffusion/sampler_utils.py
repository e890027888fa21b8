"""What the samplers share: the timesteps they evaluate, the VP noise levels there, x_0.

Symbols (DPM-Solver's VP notation): alpha_t = sqrt(alphas_bar_t), sigma_t = sqrt(1 - alphas_bar_t),
lambda_t = log(alpha_t / sigma_t); Karras et al.'s sigma is sigma_t / alpha_t. A timestep of
-1 stands for clean data (alphas_bar = 1: alpha 1, sigma 0, lambda +inf).
"""

import math
from typing import Optional

import numpy as np
import torch

from ddpmkit.diffusion.gaussian import GaussianDiffusion
from ddpmkit.diffusion.schedules import karras_timesteps, solver_timesteps


def alphas_bar_at(diffusion: GaussianDiffusion, steps: np.ndarray) -> np.ndarray:
    """alphas_bar at each step, with step -1 meaning clean data (alphas_bar = 1)."""
    return np.where(steps >= 0, diffusion.alphas_bar[np.maximum(steps, 0)], 1.0)


def vp_alpha_sigma(diffusion: GaussianDiffusion, step: int) -> tuple[float, float]:
    """(alpha_t, sigma_t) at one step; (1, 0) for clean data (step -1)."""
    if step < 0:
        return 1.0, 0.0
    ab = float(diffusion.alphas_bar[step])
    return math.sqrt(ab), math.sqrt(1.0 - ab)


def vp_lambda(diffusion: GaussianDiffusion, step: int) -> float:
    """lambda_t = log(alpha_t / sigma_t) = (log alphas_bar - log(1 - alphas_bar)) / 2."""
    ab = float(diffusion.alphas_bar[step])
    return 0.5 * (math.log(ab) - math.log(1 - ab))


def solver_points(T: int, steps: int, kind: str,
                  alphas_bar: Optional[np.ndarray] = None) -> np.ndarray:
    """The S timesteps (int64, descending) an S-step ODE/SDE solver evaluates; its last step
    then lands on clean data. `karras`: S Karras steps from T-1 down to 0 (diffusers' points);
    other kinds: solver_timesteps(T, S, kind) without its first point, 0."""
    if not 1 <= steps <= T - 1:
        raise ValueError(f"the number of steps must be in [1, {T - 1}], got {steps}")
    if kind == "karras":
        return karras_timesteps(alphas_bar, steps)[::-1].copy()
    return solver_timesteps(T, steps, kind)[:0:-1].copy()


def full_t(x: torch.Tensor, step: int) -> torch.Tensor:
    """t as the network takes it: (B,) int64, all `step`."""
    return torch.full((x.shape[0],), int(step), dtype=torch.long, device=x.device)


def pred_x_0(diffusion: GaussianDiffusion, model_output: torch.Tensor, x_t: torch.Tensor,
             step: int, clip: Optional[bool]) -> torch.Tensor:
    """The x_0 the network output implies at (x_t, t), clipped as `clip` / the diffusion says
    (any mean type: GaussianDiffusion's conversion). Learned-variance channels are not used."""
    return diffusion.p_mean_var(model_output, x_t, full_t(x_t, step), clip_denoised=clip).pred_x_0
