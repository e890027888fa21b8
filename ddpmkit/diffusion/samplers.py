"""Samplers: DDPM ancestral, DDIM, DPM-Solver++(2M), all driven by one loop, `sample`.

References:
- DDPM (Ho et al. 2020), Algorithm 2: ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t).
- DDIM (Song et al. 2021), eq. 12 (the update) and eq. 16 (sigma_t(eta)).
- DPM-Solver++ (Lu et al. 2022), Algorithm 2 (multistep, second order, data prediction),
  with a first-order first step and a first-order final step to t = 0 (lambda = +inf).

Symbols: alpha_t = sqrt(alphas_bar_t), sigma_t = sqrt(1 - alphas_bar_t) (DPM-Solver's VP
notation), lambda_t = log(alpha_t / sigma_t); S sampling steps; x: (B, *S).
Every sampler lists the timesteps it evaluates (descending) and a `step` that maps x_t and the
network output to the next x; `sample` is the only loop.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from ddpmkit.choices import DDIM_EPS_SOURCES, DDIM_STEP_TARGETS, SAMPLERS
from ddpmkit.diffusion.gaussian import DenoiseFn, GaussianDiffusion
from ddpmkit.diffusion.schedules import ddim_timesteps, solver_timesteps

NoiseFn = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class StepInfo:
    """What the loop reports after each step (for progress bars and animations)."""
    i: int                  # step index, 0 .. S-1
    t: int                  # the timestep the network was evaluated at
    x: torch.Tensor         # the new sample (x at the next, smaller timestep)
    pred_x_0: torch.Tensor  # the network's x_0 prediction at this step


@dataclass
class DDPMSampler:
    """Ancestral sampling over all T steps (any variance type)."""
    T: int
    timesteps: np.ndarray = field(init=False)

    def __post_init__(self):
        self.timesteps = np.arange(self.T - 1, -1, -1, dtype=np.int64)

    def needs_noise(self, i: int) -> bool:
        return self.timesteps[i] > 0  # no noise is added on the last step (Algorithm 2)

    def new_state(self) -> Any:
        return None

    def step(self, diffusion, model_output, x_t, i, noise, clip, state):
        t = torch.full((x_t.shape[0],), int(self.timesteps[i]), dtype=torch.long,
                       device=x_t.device)
        p = diffusion.p_mean_var(model_output, x_t, t, clip_denoised=clip)
        x = p.mean if noise is None else p.mean + torch.exp(0.5 * p.logvar) * noise
        return x, p.pred_x_0


def _alphas_bar_at(diffusion: GaussianDiffusion, steps: np.ndarray) -> np.ndarray:
    """alphas_bar at each step, with step -1 meaning clean data (alphas_bar = 1)."""
    return np.where(steps >= 0, diffusion.alphas_bar[np.maximum(steps, 0)], 1.0)


def _model_eps(diffusion: GaussianDiffusion, model_output: torch.Tensor, x_t: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
    """eps as the network predicts it, before any clipping of x_0: (B, *S)."""
    return diffusion.predict(model_output, x_t, t, clip_denoised=False).eps


def _half_log_snr(alpha_bar: float) -> float:
    """lambda = log(alpha / sigma) = (log(alphas_bar) - log(1 - alphas_bar)) / 2; -inf at zero
    SNR, where a step of size h = +inf lands on the first-order (DDIM) update."""
    return -math.inf if alpha_bar == 0 else 0.5 * (math.log(alpha_bar) - math.log(1 - alpha_bar))


@dataclass
class DDIMSampler:
    """DDIM over S of the T steps; eta = 0 is deterministic, eta = 1 matches DDPM fixed-small.

    `eps_from` and `step_to` (see DDIM_EPS_SOURCES, DDIM_STEP_TARGETS) reproduce diffusers'
    DDIMScheduler / DDIMPipeline with ("model", "stride"); the defaults are ddpmkit's.
    """
    T: int
    steps: int
    eta: float = 0.0
    skip_schedule: str = "linear"
    eps_from: str = "clipped"
    step_to: str = "next"
    timesteps: np.ndarray = field(init=False)
    targets: np.ndarray = field(init=False)  # where each step lands; -1 is clean data

    def __post_init__(self):
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        for value, allowed, what in ((self.eps_from, DDIM_EPS_SOURCES, "DDIM eps source"),
                                     (self.step_to, DDIM_STEP_TARGETS, "DDIM step target")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        self.timesteps = ddim_timesteps(self.T, self.steps, self.skip_schedule)[::-1].copy()
        if self.step_to == "next":
            self.targets = np.append(self.timesteps[1:], -1)
        else:
            self.targets = np.maximum(self.timesteps - self.T // self.steps, -1)

    def needs_noise(self, i: int) -> bool:
        return self.eta > 0 and self.targets[i] >= 0

    def new_state(self) -> Any:
        return None

    def step(self, diffusion, model_output, x_t, i, noise, clip, state):
        t_now, t_next = int(self.timesteps[i]), int(self.targets[i])
        t = torch.full((x_t.shape[0],), t_now, dtype=torch.long, device=x_t.device)
        # pred_x_0 (clipped for images) and the eps consistent with it, for any mean type.
        p = diffusion.p_mean_var(model_output, x_t, t, clip_denoised=clip)
        eps = p.pred_eps if self.eps_from == "clipped" else _model_eps(diffusion, model_output,
                                                                       x_t, t)
        ab_now, ab_next = _alphas_bar_at(diffusion, np.array([t_now, t_next]))
        # (1) eq. 16: sigma_t(eta) = eta sqrt((1 - ab_next) / (1 - ab_now)) sqrt(1 - ab_now / ab_next)
        sigma = self.eta * math.sqrt((1 - ab_next) / (1 - ab_now)) * math.sqrt(1 - ab_now / ab_next)
        # (2) eq. 12: x_next = sqrt(ab_next) x_0 + sqrt(1 - ab_next - sigma^2) eps + sigma z
        x = (math.sqrt(ab_next) * p.pred_x_0
             + math.sqrt(max(1 - ab_next - sigma ** 2, 0.0)) * eps)
        if noise is not None and sigma > 0:
            x = x + sigma * noise
        return x, p.pred_x_0


@dataclass
class _DPMState:
    prev_x_0: Optional[torch.Tensor] = None
    prev_h: Optional[float] = None


@dataclass
class DPMSolverPPSampler:
    """DPM-Solver++(2M): S network evaluations at S timesteps spread from T-1 down (t = 0 is not
    evaluated), then a first-order final step to clean data."""
    T: int
    steps: int
    skip_schedule: str = "quadratic"
    timesteps: np.ndarray = field(init=False)

    def __post_init__(self):
        if not 1 <= self.steps <= self.T - 1:
            raise ValueError(f"DPM-Solver++ steps must be in [1, {self.T - 1}], got {self.steps}")
        # S + 1 distinct points in [0, T), drop t = 0: the last step jumps to clean data.
        # Quadratic spacing here spans all of [0, T-1] (the DPM-Solver paper's time-quadratic
        # steps), not DDIM's [0, 0.8 T]: the solver starts from x_T at T-1.
        self.timesteps = solver_timesteps(self.T, self.steps, self.skip_schedule)[:0:-1].copy()

    def needs_noise(self, i: int) -> bool:
        return False

    def new_state(self) -> Any:
        return _DPMState()

    def step(self, diffusion, model_output, x_t, i, noise, clip, state: _DPMState):
        t_now = int(self.timesteps[i])
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        t = torch.full((x_t.shape[0],), t_now, dtype=torch.long, device=x_t.device)
        x_0 = diffusion.predict(model_output, x_t, t, clip_denoised=clip).x_0
        if t_next < 0:
            return x_0, x_0  # lambda = +inf: the first-order step lands exactly on x_0
        ab_now, ab_next = _alphas_bar_at(diffusion, np.array([t_now, t_next]))
        h = _half_log_snr(ab_next) - _half_log_snr(ab_now)
        if state.prev_x_0 is None:
            d = x_0  # (1) first step: first order (DDIM)
        else:
            # (2) second order: D = (1 + 1/(2r)) x_0 - 1/(2r) x_0_prev, r = h_prev / h
            r = state.prev_h / h
            d = (1 + 1 / (2 * r)) * x_0 - (1 / (2 * r)) * state.prev_x_0
        # (3) x_next = (sigma_next / sigma_now) x_t - alpha_next (e^{-h} - 1) D
        x = (math.sqrt((1 - ab_next) / (1 - ab_now)) * x_t
             - math.sqrt(ab_next) * math.expm1(-h) * d)
        state.prev_x_0, state.prev_h = x_0, h
        return x, x_0


# Step spacing when none is asked for. DDIM: the reference's and the DDIM paper's. DPM-Solver++
# ends with a first-order jump from its smallest timestep to clean data; with evenly spread
# steps that timestep is ~T/S, and the jump squeezes narrow modes (toy data: to 0.2-0.4 of
# their width at 50-100 steps); quadratic spacing puts it near t = 0 (measured in the README's
# sampler comparison).
DEFAULT_SKIP_SCHEDULE = {"ddim": "linear", "dpm-solver++": "quadratic"}


def make_sampler(diffusion: GaussianDiffusion, name: str = "ddpm", steps: Optional[int] = None,
                 eta: float = 0.0, skip_schedule: Optional[str] = None,
                 eps_from: Optional[str] = None, step_to: Optional[str] = None):
    """Build a sampler by name. `steps` defaults to T for ddim and 20 for dpm-solver++;
    `skip_schedule` to linear for ddim and quadratic for dpm-solver++. `eps_from` and
    `step_to` are DDIM's (default "clipped", "next"); other samplers refuse them."""
    skip_schedule = skip_schedule or DEFAULT_SKIP_SCHEDULE.get(name, "linear")
    if name != "ddim" and (eps_from is not None or step_to is not None):
        raise ValueError(f"eps_from and step_to are DDIM settings; the {name} sampler has none")
    if name == "ddpm":
        return DDPMSampler(diffusion.T)
    if name == "ddim":
        return DDIMSampler(diffusion.T, diffusion.T if steps is None else steps, eta,
                           skip_schedule, eps_from or "clipped", step_to or "next")
    if name == "dpm-solver++":
        return DPMSolverPPSampler(diffusion.T, min(20, diffusion.T - 1) if steps is None
                                  else steps, skip_schedule)
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def sample(diffusion: GaussianDiffusion, denoise_fn: DenoiseFn, sampler, x_T: torch.Tensor, *,
           clip_denoised: Optional[bool] = None, noise_fn: Optional[NoiseFn] = None,
           generator: Optional[torch.Generator] = None,
           callback: Optional[Callable[[StepInfo], None]] = None,
           progress: bool = False) -> torch.Tensor:
    """Run `sampler` from x_T (B, *S) to x_0. The one sampling loop of the project.

    Noise for stochastic steps comes from `noise_fn(i, x)` if given (e.g. per-sample seeded
    noise), else `torch.randn` with `generator`. `callback(StepInfo)` is called after each step.
    """
    if noise_fn is None:
        def noise_fn(i: int, x: torch.Tensor) -> torch.Tensor:
            return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    x = x_T
    state = sampler.new_state()
    steps: List[int] = [int(t) for t in sampler.timesteps]
    iterator = enumerate(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(steps), desc="sampling", leave=False)
    with torch.no_grad():
        for i, t_now in iterator:
            t = torch.full((x.shape[0],), t_now, dtype=torch.long, device=x.device)
            model_output = denoise_fn(x, t).to(x.dtype)
            noise = noise_fn(i, x) if sampler.needs_noise(i) else None
            x, pred_x_0 = sampler.step(diffusion, model_output, x, i, noise, clip_denoised, state)
            if callback is not None:
                callback(StepInfo(i, t_now, x, pred_x_0))
    return x
