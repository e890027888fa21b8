"""Diffusion math: schedules, the Gaussian diffusion process, samplers."""

from ddpmkit.diffusion.gaussian import (
    DECODERS,
    LOSS_TYPES,
    MODEL_MEAN_TYPES,
    MODEL_VAR_TYPES,
    BPDResult,
    GaussianDiffusion,
    PMeanVar,
    Prediction,
)
from ddpmkit.diffusion.guidance import classifier_free_guidance, guidance_combine
from ddpmkit.diffusion.multistep import UniPCSampler
from ddpmkit.diffusion.samplers import (
    DDIM_EPS_SOURCES,
    DDIM_STEP_TARGETS,
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    StepInfo,
    make_sampler,
    sample,
)
from ddpmkit.diffusion.schedules import (
    BETA_SCHEDULES,
    SKIP_SCHEDULES,
    ddim_timesteps,
    get_beta_schedule,
    karras_timesteps,
    rescale_zero_terminal_snr,
    solver_timesteps,
)
from ddpmkit.diffusion.sigma_samplers import EulerAncestralSampler, HeunSampler

__all__ = [
    "BETA_SCHEDULES", "DDIM_EPS_SOURCES", "DDIM_STEP_TARGETS", "DECODERS", "LOSS_TYPES",
    "MODEL_MEAN_TYPES", "MODEL_VAR_TYPES",
    "SAMPLERS", "SKIP_SCHEDULES", "BPDResult", "DDIMSampler", "DDPMSampler",
    "DPMSolverPPSampler", "EulerAncestralSampler", "HeunSampler", "UniPCSampler",
    "GaussianDiffusion", "PMeanVar", "Prediction", "StepInfo", "ddim_timesteps",
    "classifier_free_guidance", "get_beta_schedule", "guidance_combine", "make_sampler",
    "karras_timesteps", "rescale_zero_terminal_snr", "sample", "solver_timesteps",
]
