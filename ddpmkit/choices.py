"""The string values that flags and config files accept, in one module that imports nothing.

`ddpmkit --help` and the config checks read these without loading torch; the library modules
that implement each choice take their tuple from here, so the two cannot drift apart.
"""

# diffusion (ddpmkit.diffusion)
BETA_SCHEDULES = ("linear", "quad", "warmup10", "warmup50", "jsd", "cosine", "const")
# DDIM step spacing. linear / quadratic: the reference's and the DDIM paper's; linspace /
# leading / trailing: diffusers' `timestep_spacing` values (linspace is what ddpmkit called
# linear until it took the reference's meaning). karras: Karras et al. 2022's rho = 7 spacing in
# sigma = sqrt((1 - alphas_bar) / alphas_bar), rounded to timesteps (as diffusers'
# use_karras_sigmas).
SKIP_SCHEDULES = ("linear", "quadratic", "linspace", "leading", "trailing", "karras")
MODEL_MEAN_TYPES = ("eps", "x_0", "mean", "v")
MODEL_VAR_TYPES = ("fixed-small", "fixed-large", "learned")
LOSS_TYPES = ("mse", "kl")
# How the MSE is weighted over t: "uniform" (DDPM eq. 14) or "min-snr" (Hang et al. 2023).
LOSS_WEIGHTS = ("uniform", "min-snr")
DECODERS = ("discretized", "continuous")
# dpm-solver++ is the 2M solver; unipc2 / unipc3 are UniPC bh2 of order 2 / 3; heun costs two
# network evaluations per step (one on its last step).
SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "dpm-solver++3m", "dpm-solver++2m-sde", "unipc2",
            "unipc3", "heun", "euler-ancestral")
# Which eps a DDIM step moves along once x_0 is clipped: "clipped" re-derives it from the
# clipped x_0 (ddpmkit, the reference, GLIDE; diffusers' use_clipped_model_output=True);
# "model" keeps the network's own (diffusers' DDIMPipeline default). Equal without clipping.
DDIM_EPS_SOURCES = ("clipped", "model")
# Where a DDIM step lands: "next" at the next evaluated timestep (clean data after the last);
# "stride" at t - T // S, as diffusers' DDIMScheduler computes it whatever the spacing (the
# same for `linear` / `leading`, and for `trailing` when S divides T).
DDIM_STEP_TARGETS = ("next", "stride")

# data (ddpmkit.data)
IMAGE_DATASETS = ("mnist", "cifar10", "celeba", "celebahq", "folder")
CONFIG_DATASETS = IMAGE_DATASETS[:-1]  # those with a shipped configs/<name>.json: not folder
TOY_DATASETS = ("gaussian8", "gaussian25", "swissroll")
# How a folder image reaches --image-size (ddpmkit.data.folder.ResizeTo).
RESIZE_MODES = ("center-crop", "resize", "pad")

# training and speed (ddpmkit.training, ddpmkit.runtime.devices)
LR_DECAYS = ("none", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: devices.resolve_precision
# torch.compile modes (`--compile MODE`). reduce-overhead adds CUDA graphs (fewer kernel
# launches); the max-autotune modes also benchmark kernel choices, so they compile longer.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# pictures (ddpmkit.utils.images): animation files, by suffix
ANIMATION_FORMATS = ("gif", "webp")
