"""Samplers: DDPM ancestral, DDIM, and (in multistep.py, sigma_samplers.py) DPM-Solver++ 2M /
3M / 2M SDE, UniPC, Heun, Euler ancestral, all driven by one loop, `sample`.

References:
- DDPM (Ho et al. 2020), Algorithm 2: ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t).
- DDIM (Song et al. 2021), eq. 12 (the update) and eq. 16 (sigma_t(eta)).
- The ODE / SDE solvers: see multistep.py and sigma_samplers.py.

Symbols: alpha_t = sqrt(alphas_bar_t), sigma_t = sqrt(1 - alphas_bar_t) (DPM-Solver's VP
notation), lambda_t = log(alpha_t / sigma_t); S sampling steps; x: (B, *S).
Every sampler lists the timesteps it evaluates (descending; one network evaluation each, so
len(timesteps) is the NFE) and a `step` that maps x_t and the network output to the next x;
`sample` is the only loop.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from ddpmkit.choices import DDIM_EPS_SOURCES, DDIM_STEP_TARGETS, SAMPLERS
from ddpmkit.diffusion.gaussian import DenoiseFn, GaussianDiffusion
from ddpmkit.diffusion.multistep import DPMSolverPPSampler, UniPCSampler
from ddpmkit.diffusion.sampler_utils import alphas_bar_at
from ddpmkit.diffusion.schedules import ddim_timesteps, karras_timesteps
from ddpmkit.diffusion.sigma_samplers import EulerAncestralSampler, HeunSampler

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


def _model_eps(diffusion: GaussianDiffusion, model_output: torch.Tensor, x_t: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
    """eps as the network predicts it, before any clipping of x_0: (B, *S)."""
    return diffusion.predict(model_output, x_t, t, clip_denoised=False).eps


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
    alphas_bar: Optional[np.ndarray] = field(default=None, repr=False)  # for karras spacing
    timesteps: np.ndarray = field(init=False)
    targets: np.ndarray = field(init=False)  # where each step lands; -1 is clean data

    def __post_init__(self):
        if not 0 <= self.eta < math.inf:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        for value, allowed, what in ((self.eps_from, DDIM_EPS_SOURCES, "DDIM eps source"),
                                     (self.step_to, DDIM_STEP_TARGETS, "DDIM step target")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        if self.skip_schedule == "karras":
            steps = karras_timesteps(self.alphas_bar, self.steps)
        else:
            steps = ddim_timesteps(self.T, self.steps, self.skip_schedule)
        self.timesteps = steps[::-1].copy()
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
        ab_now, ab_next = alphas_bar_at(diffusion, np.array([t_now, t_next]))
        # (1) eq. 16: sigma_t(eta) = eta sqrt((1 - ab_next) / (1 - ab_now)) sqrt(1 - ab_now / ab_next)
        sigma = self.eta * math.sqrt((1 - ab_next) / (1 - ab_now)) * math.sqrt(1 - ab_now / ab_next)
        # (2) eq. 12: x_next = sqrt(ab_next) x_0 + sqrt(1 - ab_next - sigma^2) eps + sigma z
        x = (math.sqrt(ab_next) * p.pred_x_0
             + math.sqrt(max(1 - ab_next - sigma ** 2, 0.0)) * eps)
        if noise is not None and sigma > 0:
            x = x + sigma * noise
        return x, p.pred_x_0


# Step spacing when none is asked for. DDIM: the reference's and the DDIM paper's. The solvers
# end with a first-order jump from their smallest timestep to clean data; with evenly spread
# steps that timestep is ~T/S, and the jump squeezes narrow modes (toy data: to 0.2-0.4 of
# their width at 50-100 steps); quadratic spacing puts it near t = 0 (measured in the README's
# sampler comparison).
DEFAULT_SKIP_SCHEDULE = {"ddim": "linear"}
SOLVER_DEFAULT_STEPS = 20
HEUN_DEFAULT_STEPS = 10  # 19 network evaluations
# name -> (class, keyword arguments)
SOLVERS = {
    "dpm-solver++": (DPMSolverPPSampler, {"order": 2}),
    "dpm-solver++3m": (DPMSolverPPSampler, {"order": 3}),
    "dpm-solver++2m-sde": (DPMSolverPPSampler, {"order": 2, "sde": True}),
    "unipc2": (UniPCSampler, {"order": 2}),
    "unipc3": (UniPCSampler, {"order": 3}),
    "heun": (HeunSampler, {}),
    "euler-ancestral": (EulerAncestralSampler, {}),
}


def make_sampler(diffusion: GaussianDiffusion, name: str = "ddpm", steps: Optional[int] = None,
                 eta: float = 0.0, skip_schedule: Optional[str] = None,
                 eps_from: Optional[str] = None, step_to: Optional[str] = None):
    """Build a sampler by name (SAMPLERS). `steps` defaults to T for ddim, 10 for heun and 20
    for the other solvers; `skip_schedule` to linear for ddim and quadratic for the solvers.
    `eta`, `eps_from` and `step_to` are DDIM's (default 0, "clipped", "next"); other samplers
    ignore `eta` and refuse the other two. The solvers use the network's mean prediction only:
    a learned variance is well defined but unused (their paths fix the noise they add; DDPM is
    the sampler that uses it)."""
    skip_schedule = skip_schedule or DEFAULT_SKIP_SCHEDULE.get(name, "quadratic")
    if not 0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if name != "ddim" and (eps_from is not None or step_to is not None):
        raise ValueError(f"eps_from and step_to are DDIM settings; the {name} sampler has none")
    if name == "ddpm":
        return DDPMSampler(diffusion.T)
    if name == "ddim":
        return DDIMSampler(diffusion.T, diffusion.T if steps is None else steps, eta,
                           skip_schedule, eps_from or "clipped", step_to or "next",
                           diffusion.alphas_bar)
    if name not in SOLVERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    cls, kwargs = SOLVERS[name]
    if steps is None:
        steps = min(HEUN_DEFAULT_STEPS if name == "heun" else SOLVER_DEFAULT_STEPS,
                    diffusion.T - 1)
    return cls(diffusion.T, steps, skip_schedule, alphas_bar=diffusion.alphas_bar, **kwargs)


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
