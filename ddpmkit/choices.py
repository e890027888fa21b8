"""The string values that flags and config files accept, in one module that imports nothing.

`ddpmkit --help` and the config checks read these without loading torch; the library modules
that implement each choice take their tuple from here, so the two cannot drift apart.
"""

# diffusion (ddpmkit.diffusion)
BETA_SCHEDULES = ("linear", "quad", "warmup10", "warmup50", "jsd", "cosine")
SKIP_SCHEDULES = ("linear", "quadratic")
MODEL_MEAN_TYPES = ("eps", "x_0", "mean")
MODEL_VAR_TYPES = ("fixed-small", "fixed-large", "learned")
LOSS_TYPES = ("mse", "kl")
DECODERS = ("discretized", "continuous")
SAMPLERS = ("ddpm", "ddim", "dpm-solver++")

# data (ddpmkit.data)
IMAGE_DATASETS = ("mnist", "cifar10", "celeba", "celebahq", "folder")
TOY_DATASETS = ("gaussian8", "gaussian25", "swissroll")

# training and speed (ddpmkit.training, ddpmkit.devices)
LR_DECAYS = ("none", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 where it is native (devices.resolve_precision)
# torch.compile modes (`--compile MODE`). reduce-overhead adds CUDA graphs (fewer kernel
# launches); the max-autotune modes also benchmark kernel choices, so they compile longer.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
