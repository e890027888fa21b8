"""diffusers scheduler configs <-> ddpmkit's `diffusion` config section.

A scheduler config (DDPMScheduler's, or DDIMScheduler's and the like) says what the network
was trained for: the forward process (num_train_timesteps, beta_schedule, beta_start,
beta_end, trained_betas), the parameterization (prediction_type), the variance of the reverse
steps (variance_type) and whether sampling clips the predicted x_0 (clip_sample). Sampling
itself is done by ddpmkit's samplers; their step-spacing keys (timestep_spacing,
steps_offset, set_alpha_to_one) are not part of the model and are not read.

Correspondences, all exact:
    linear              betas = linspace(beta_start, beta_end, T)          ddpmkit `linear`
    scaled_linear       betas = linspace(sqrt(start), sqrt(end), T)^2      ddpmkit `quad`
    squaredcos_cap_v2   Improved DDPM's cosine, betas capped at 0.999      ddpmkit `cosine`
    sigmoid, trained_betas                                                 ddpmkit `custom`
    fixed_small(_log)   posterior variance beta~_t                          `fixed-small`
    fixed_large(_log)   beta_t                                              `fixed-large`
    epsilon / sample / v_prediction                                         `eps` / `x_0` / `v`
    rescale_betas_zero_snr (applied after the schedule)                     `zero_terminal_snr`
At t = 0 diffusers' `fixed_large` would use beta_0 where ddpmkit (like the official DDPM code)
uses beta~_1; samplers add no noise at t = 0, so samples do not see the difference (the
decoder term of bits/dim does).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ddpmkit.errors import UserError
from ddpmkit.interop.diffusers_format import DIFFUSERS_VERSION

SCHEDULER_CLASS = "DDPMScheduler"
# DDPMScheduler's defaults (diffusers 0.42) for the keys read here.
SCHEDULER_DEFAULTS: Mapping[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "variance_type": "fixed_small",
    "clip_sample": True, "clip_sample_range": 1.0, "prediction_type": "epsilon",
    "thresholding": False, "rescale_betas_zero_snr": False,
}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine"}
VARIANCE_TYPES = {"fixed_small": "fixed-small", "fixed_small_log": "fixed-small",
                  "fixed_large": "fixed-large", "fixed_large_log": "fixed-large"}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x_0", "v_prediction": "v"}
# The GeoDiff sigmoid schedule's range of the sigmoid's argument.
SIGMOID_RANGE = 6.0


def _refuse(source: str, message: str) -> UserError:
    return UserError(f"{source}: {message}")


def _sigmoid_betas(T: int, beta_start: float, beta_end: float) -> list[float]:
    """diffusers' `sigmoid` schedule: sigmoid(linspace(-6, 6, T)) (end - start) + start."""
    xs = [-SIGMOID_RANGE + 2 * SIGMOID_RANGE * i / (T - 1) for i in range(T)] if T > 1 else [0.0]
    return [beta_start + (beta_end - beta_start) / (1.0 + math.exp(-x)) for x in xs]


def _betas_section(c: Mapping[str, Any], source: str) -> dict[str, Any]:
    T = c["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise _refuse(source, f"num_train_timesteps {T!r} is not an integer >= 2")
    if c["trained_betas"] is not None:
        betas = [float(b) for b in c["trained_betas"]]
        if len(betas) != T:
            raise _refuse(source, f"trained_betas has {len(betas)} values for "
                                  f"num_train_timesteps {T}")
        return {"beta_schedule": "custom", "betas": betas, "timesteps": T}
    name = c["beta_schedule"]
    if name == "sigmoid":
        return {"beta_schedule": "custom", "timesteps": T,
                "betas": _sigmoid_betas(T, float(c["beta_start"]), float(c["beta_end"]))}
    if name not in BETA_SCHEDULES:
        raise _refuse(source, f"beta_schedule {name!r} has no ddpmkit equivalent (mapped: "
                              f"{', '.join([*BETA_SCHEDULES, 'sigmoid'])}, trained_betas)")
    return {"beta_schedule": BETA_SCHEDULES[name], "beta_start": float(c["beta_start"]),
            "beta_end": float(c["beta_end"]), "timesteps": T}


def diffusion_config_from_scheduler(config: Mapping[str, Any] | None,
                                    source: str = "scheduler_config.json") -> dict[str, Any]:
    """ddpmkit's `diffusion` section for a diffusers scheduler config (None: DDPMScheduler's
    defaults). Keys the config omits take DDPMScheduler's defaults."""
    c = {**SCHEDULER_DEFAULTS, **(config or {})}
    variance = c["variance_type"]
    if variance not in VARIANCE_TYPES:
        raise _refuse(source, f"variance_type {variance!r} is a learned variance in diffusers' "
                              "form, which ddpmkit's samplers cannot use (mapped: "
                              f"{', '.join(VARIANCE_TYPES)})")
    if c["prediction_type"] not in PREDICTION_TYPES:
        raise _refuse(source, f"prediction_type {c['prediction_type']!r} has no ddpmkit "
                              f"equivalent (mapped: {', '.join(PREDICTION_TYPES)})")
    if c["thresholding"]:
        raise _refuse(source, "thresholding (dynamic thresholding of x_0) has no ddpmkit "
                              "equivalent; set it to false to sample with plain clipping")
    clip = bool(c["clip_sample"])
    if clip and float(c["clip_sample_range"]) != 1.0:
        raise _refuse(source, f"clip_sample_range {c['clip_sample_range']} is not 1: ddpmkit "
                              "clips x_0 to [-1, 1]")
    if c["rescale_betas_zero_snr"] and c["prediction_type"] == "epsilon":
        raise _refuse(source, "rescale_betas_zero_snr makes the last beta 1 (x_T pure noise "
                              "with alphas_bar 0), where an epsilon prediction cannot give x_0; "
                              "ddpmkit samples such models only with v_prediction or sample")
    return {**_betas_section(c, source), "model_mean_type": PREDICTION_TYPES[c["prediction_type"]],
            "model_var_type": VARIANCE_TYPES[variance], "loss_type": "mse",
            "clip_denoised": clip, "zero_terminal_snr": bool(c["rescale_betas_zero_snr"])}


def scheduler_config_from_diffusion(diffusion_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A DDPMScheduler config for a ddpmkit `diffusion` section (the inverse of the above).

    Schedules diffusers has no name for (warmup10, warmup50, jsd, custom) are written as
    `trained_betas`, the exact float64 values rounded to JSON's shortest repr.
    """
    from ddpmkit.build import DIFFUSION_DEFAULTS, build_diffusion, schedule_betas

    d = {**DIFFUSION_DEFAULTS, **diffusion_cfg}
    if d["model_var_type"] == "learned":
        raise UserError("model_var_type 'learned' (a log-variance output channel set) has no "
                        "diffusers equivalent (diffusers' 'learned' predicts the variance "
                        "itself); only fixed-small / fixed-large models export")
    if d["model_mean_type"] == "mean":
        raise UserError("model_mean_type 'mean' (the network predicts the posterior mean) has "
                        "no diffusers prediction_type; only eps, x_0 and v models export")
    diffusion = build_diffusion(dict(d))  # validates and gives the exact betas
    by_name = {v: k for k, v in BETA_SCHEDULES.items()}
    config = {"_class_name": SCHEDULER_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
              **SCHEDULER_DEFAULTS, "num_train_timesteps": diffusion.T}
    if d["beta_schedule"] in by_name:
        config.update(beta_schedule=by_name[d["beta_schedule"]],
                      beta_start=float(d["beta_start"]), beta_end=float(d["beta_end"]))
    else:  # diffusers rescales trained_betas too: write the betas before any rescaling
        config.update(trained_betas=[float(b) for b in schedule_betas(d)])
    config.update(
        variance_type=d["model_var_type"].replace("-", "_"),
        prediction_type={v: k for k, v in PREDICTION_TYPES.items()}[d["model_mean_type"]],
        clip_sample=bool(diffusion.clip_denoised),
        rescale_betas_zero_snr=diffusion.zero_terminal_snr)
    return config
