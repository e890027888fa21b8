"""What the samplers share: the timesteps they evaluate, the VP noise levels there, x_0.

Symbols (DPM-Solver's VP notation): alpha_t = sqrt(alphas_bar_t), sigma_t = sqrt(1 - alphas_bar_t),
lambda_t = log(alpha_t / sigma_t); Karras et al.'s sigma is sigma_t / alpha_t. A timestep of
-1 stands for clean data (alphas_bar = 1: alpha 1, sigma 0, lambda +inf). With zero terminal SNR
alphas_bar_{T-1} = 0: alpha 0, sigma 1, lambda -inf (Karras' sigma +inf); every sampler's step
from there is its first-order one, which stays finite.
"""

import math
from typing import Optional

import numpy as np
import torch

from ddpmkit.diffusion.gaussian import GaussianDiffusion, Prediction
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


def half_log_snr(alpha_bar: float) -> float:
    """lambda = log(alpha / sigma) = (log(alphas_bar) - log(1 - alphas_bar)) / 2; -inf at zero
    SNR, where a step of size h = +inf lands on the first-order (DDIM) update."""
    return -math.inf if alpha_bar == 0 else 0.5 * (math.log(alpha_bar) - math.log(1 - alpha_bar))


def vp_lambda(diffusion: GaussianDiffusion, step: int) -> float:
    """lambda_t at one step (-inf at zero SNR)."""
    return half_log_snr(float(diffusion.alphas_bar[step]))


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


def sampler_points(points: Optional[np.ndarray], T: int, steps: int, kind: str,
                   alphas_bar: Optional[np.ndarray] = None) -> np.ndarray:
    """A solver's points: the explicit `points` (int64) when given, else `solver_points`."""
    if points is not None:
        return np.asarray(points, dtype=np.int64)
    return solver_points(T, steps, kind, alphas_bar)


def full_t(x: torch.Tensor, step: int) -> torch.Tensor:
    """t as the network takes it: (B,) int64, all `step`."""
    return torch.full((x.shape[0],), int(step), dtype=torch.long, device=x.device)


def predict(diffusion: GaussianDiffusion, model_output: torch.Tensor, x_t: torch.Tensor,
            step: int, clip: Optional[bool]) -> Prediction:
    """(x_0, eps) the network output implies at (x_t, t), x_0 clipped as `clip` / the diffusion
    says (any mean type: `GaussianDiffusion.predict`). Learned-variance channels are not used."""
    return diffusion.predict(model_output, x_t, full_t(x_t, step), clip_denoised=clip)
