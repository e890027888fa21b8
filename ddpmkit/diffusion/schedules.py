"""Noise schedules and sampling sub-sequences, in float64.

References:
- Ho, Jain, Abbeel (2020), "Denoising Diffusion Probabilistic Models" (DDPM): `linear`, `quad`,
  `warmup10`, `warmup50`, `jsd` as in the official code's `get_beta_schedule`.
- Nichol & Dhariwal (2021), "Improved DDPM", eq. 17: `cosine`.
- Song, Meng, Ermon (2021), "DDIM", section D.2: `linear` and `quadratic` skip schedules.

Symbols: T training steps; S sampling steps; betas (T,); alphas_bar (T,) = prod(1 - betas).
"""

import math

import numpy as np

from ddpmkit.choices import BETA_SCHEDULES, SKIP_SCHEDULES

# No beta may reach 1: alphas_bar would be 0 at the last step and recovering x_0 from eps
# (division by sqrt(alphas_bar)) would give inf. `jsd` ends at exactly 1 and `cosine` tends to
# 1, so both are clipped here, as Improved DDPM does for cosine.
MAX_BETA = 0.999
COSINE_OFFSET = 0.008  # `s` in Improved DDPM eq. 17


def _check_steps(T) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"the number of diffusion steps must be a positive integer, got {T!r}")
    return int(T)


def get_beta_schedule(name: str, T: int, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> np.ndarray:
    """betas (T,) float64 for a named schedule; every entry in (0, MAX_BETA]."""
    T = _check_steps(T)
    if name in ("linear", "quad", "warmup10", "warmup50") and not 0 < beta_start <= beta_end < 1:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, "
            f"beta_end={beta_end}"
        )
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif name in ("warmup10", "warmup50"):
        warmup_steps = int(T * {"warmup10": 0.1, "warmup50": 0.5}[name])
        betas = np.full(T, beta_end, dtype=np.float64)
        betas[:warmup_steps] = np.linspace(beta_start, beta_end, warmup_steps, dtype=np.float64)
    elif name == "jsd":
        # 1/T, 1/(T-1), ..., 1: the last beta is 1 and is clipped below.
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif name == "cosine":
        steps = np.arange(T + 1, dtype=np.float64) / T
        alphas_bar = np.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        betas = 1.0 - alphas_bar[1:] / alphas_bar[:-1]
    else:
        raise ValueError(f"unknown beta schedule {name!r}; choose from {', '.join(BETA_SCHEDULES)}")
    return np.minimum(betas, MAX_BETA)


# The DDIM paper's quadratic spacing ends at 0.8 T (its section D.2).
DDIM_QUADRATIC_END = 0.8


def ddim_timesteps(T: int, S: int, kind: str = "linear",
                   quadratic_end: float = DDIM_QUADRATIC_END) -> np.ndarray:
    """S distinct, strictly increasing timesteps in [0, T) (int64, shape (S,)).

    `linear`: evenly spaced from 0 to T-1. `quadratic`: spaced as i^2 from 0 to
    `quadratic_end` * T (0.8, as in the DDIM paper), then nudged so that no step repeats (the
    paper's rounding repeats the first few).
    """
    T = _check_steps(T)
    if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or not 1 <= S <= T:
        raise ValueError(f"the number of sampling steps must be an integer in [1, {T}], got {S!r}")
    S = int(S)
    if kind not in SKIP_SCHEDULES:
        raise ValueError(f"unknown skip schedule {kind!r}; choose from {', '.join(SKIP_SCHEDULES)}")
    if S == 1:
        # One step must start from the noisiest step, not from t = 0 (where both spacings
        # below would put it): x_0 is then predicted from pure noise in one jump.
        return np.array([T - 1], dtype=np.int64)
    if kind == "linear":
        # floor(x + 0.5) rather than np.round: banker's rounding could map two points spaced
        # exactly 1 apart (e.g. 1.5 and 2.5) to the same integer.
        steps = np.floor(np.linspace(0, T - 1, S) + 0.5).astype(np.int64)
    elif kind == "quadratic":
        top = min(T * quadratic_end, T - 1)
        steps = np.floor(np.linspace(0, math.sqrt(top), S) ** 2 + 0.5).astype(np.int64)
        for i in range(1, S):  # forward pass: strictly increasing
            steps[i] = max(steps[i], steps[i - 1] + 1)
        steps[-1] = min(steps[-1], T - 1)
        for i in range(S - 2, -1, -1):  # backward pass: fit below T
            steps[i] = min(steps[i], steps[i + 1] - 1)
    assert len(np.unique(steps)) == S and steps[0] >= 0 and steps[-1] < T
    return steps
