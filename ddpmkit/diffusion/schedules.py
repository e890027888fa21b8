"""Noise schedules and sampling sub-sequences, in float64.

References:
- Ho, Jain, Abbeel (2020), "Denoising Diffusion Probabilistic Models" (DDPM): `linear`, `quad`,
  `warmup10`, `warmup50`, `jsd` as in the official code's `get_beta_schedule`.
- Nichol & Dhariwal (2021), "Improved DDPM", eq. 17: `cosine`.
- The reference project ddpm-torch: `const` (beta_end at every step).
- Song, Meng, Ermon (2021), "DDIM", section D.2, and its authors' code: the `linear` and
  `quadratic` sub-sequences, as the reference project computes them.
- Lin, Liu, Li, Yang (2024), "Common Diffusion Noise Schedules and Sampling Steps Are Flawed",
  table 2, as diffusers implements it: `linspace`, `leading`, `trailing`.
- Lu et al. (2022), "DPM-Solver": time-quadratic steps over all of [0, T-1].
- Karras, Aittala, Aila, Laine (2022), "Elucidating the Design Space...", eq. 5: `karras`
  (rho = 7) steps in sigma = sqrt((1 - alphas_bar) / alphas_bar), mapped to timesteps.
- Lin, Liu, Li, Yang (2024), Algorithm 1: `rescale_zero_terminal_snr`.

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
    elif name == "const":
        if not 0 < beta_end < 1:
            raise ValueError(f"need 0 < beta_end < 1, got beta_end={beta_end}")
        betas = np.full(T, beta_end, dtype=np.float64)
    elif name == "cosine":
        steps = np.arange(T + 1, dtype=np.float64) / T
        alphas_bar = np.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        betas = 1.0 - alphas_bar[1:] / alphas_bar[:-1]
    else:
        raise ValueError(f"unknown beta schedule {name!r}; choose from {', '.join(BETA_SCHEDULES)}")
    return np.minimum(betas, MAX_BETA)


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """betas (T,) rescaled so that alphas_bar_{T-1} = 0 (SNR 0 at t = T-1) and alphas_bar_0 is
    unchanged (Lin et al. 2024, Algorithm 1): sqrt(alphas_bar) is shifted by its last value and
    scaled back to its first. The last beta comes out exactly 1."""
    betas = np.asarray(betas, dtype=np.float64)
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    if not first > last:
        raise ValueError("zero terminal SNR needs alphas_bar to fall over the schedule")
    # (1) shift so the last value is 0, (2) scale so the first is back to its old value.
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab ** 2
    # (3) back to betas: alphas_t = alphas_bar_t / alphas_bar_{t-1}, alphas_0 = alphas_bar_0.
    alphas = np.append(alphas_bar[0], alphas_bar[1:] / alphas_bar[:-1])
    return 1.0 - alphas


# The DDIM paper's quadratic spacing ends at 0.8 T (its section D.2).
DDIM_QUADRATIC_END = 0.8


def _check_subsequence_size(T, S) -> tuple[int, int]:
    T = _check_steps(T)
    if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or not 1 <= S <= T:
        raise ValueError(f"the number of sampling steps must be an integer in [1, {T}], got {S!r}")
    return T, int(S)


def _distinct(candidates: np.ndarray, T: int) -> np.ndarray:
    """Nudge increasing integer candidates (S,) to S distinct steps in [0, T): a repeat moves up
    by one, then everything is pushed below T from the top down. Candidates that are already
    distinct and below T come back unchanged."""
    steps = candidates.astype(np.int64)
    for i in range(1, len(steps)):  # forward pass: strictly increasing
        steps[i] = max(steps[i], steps[i - 1] + 1)
    steps[-1] = min(steps[-1], T - 1)
    for i in range(len(steps) - 2, -1, -1):  # backward pass: fit below T
        steps[i] = min(steps[i], steps[i + 1] - 1)
    return steps


def _reference_quadratic(T: int, S: int) -> np.ndarray:
    """round((i sqrt(0.8 T) / (S - 1))^2), i = 0..S-1, computed as the reference does: a float32
    torch.linspace, squared, rounded half to even. Exact ties (12.5 at S = 9 of T = 1000) fall
    where float32 puts them, so only the same arithmetic gives the same list."""
    import torch  # here only: the rest of this module is plain numpy

    points = torch.linspace(0.0, math.sqrt(T * DDIM_QUADRATIC_END), S, dtype=torch.float32)
    return torch.pow(points, 2).round().to(torch.int64).numpy()


def ddim_timesteps(T: int, S: int, kind: str = "linear") -> np.ndarray:
    """S distinct, strictly increasing timesteps in [0, T) (int64, shape (S,)).

    `linear`: floor(i T / S), i.e. 0, 20, ..., 980 for S = 50 of T = 1000: the reference's and
    the DDIM authors' `range(0, T, T // S)` whenever S divides T (they return more than S
    steps when it does not: 334 for S = 300; this keeps the stride T / S and gives S).
    `quadratic`: the reference's round((i sqrt(0.8 T) / (S - 1))^2), where those are S distinct
    steps (at T = 1000 up to S = 40); beyond, repeats move up by one (the reference evaluates
    its repeats as no-op steps). The DDIM authors' code rounds down instead (another list for
    some S, e.g. 10 at T = 1000).
    `linspace`, `leading`, `trailing`: diffusers' DDIMScheduler `timestep_spacing` (with
    steps_offset 0): round-half-even of linspace(0, T - 1, S); i (T // S); round(T - i T / S) - 1.
    S = 1 gives [T - 1] for every kind (one step from pure noise), where the reference and
    diffusers (but for trailing) would evaluate t = 0 only.
    """
    T, S = _check_subsequence_size(T, S)
    if kind not in SKIP_SCHEDULES:
        raise ValueError(f"unknown skip schedule {kind!r}; choose from {', '.join(SKIP_SCHEDULES)}")
    if kind == "karras":
        raise ValueError("karras spacing depends on the noise schedule: use karras_timesteps")
    if S == 1:
        return np.array([T - 1], dtype=np.int64)
    i = np.arange(S, dtype=np.int64)
    if kind == "linear":
        steps = i * T // S
    elif kind == "quadratic":
        steps = _distinct(_reference_quadratic(T, S), T)
    elif kind == "linspace":
        # np.round rounds half to even, as diffusers; the spacing (T-1)/(S-1) > 1 for S < T
        # keeps the steps distinct, and for S = T they are the integers 0..T-1.
        steps = np.round(np.linspace(0, T - 1, S)).astype(np.int64)
    elif kind == "leading":
        steps = i * (T // S)
    else:  # trailing, from the top: np.arange as diffusers (its float steps decide the ties);
        # it may hold one more, near-zero point when T / (T / S) rounds above S
        steps = (np.round(np.arange(T, 0, -T / S))[:S] - 1).astype(np.int64)[::-1].copy()
    assert len(np.unique(steps)) == S and steps[0] >= 0 and steps[-1] < T
    return steps


def solver_timesteps(T: int, S: int, kind: str = "quadratic") -> np.ndarray:
    """The S + 1 points (int64, increasing, starting at 0) that S steps of DPM-Solver++ span.

    `quadratic` here is time-quadratic over all of [0, T-1] (the DPM-Solver paper's), not the
    DDIM paper's [0, 0.8 T]: floor((i sqrt(T - 1) / S)^2 + 0.5), repeats moved up by one. Other
    kinds are `ddim_timesteps(T, S + 1, kind)`.
    """
    T = _check_steps(T)
    if kind != "quadratic":
        return ddim_timesteps(T, S + 1, kind)
    T, n = _check_subsequence_size(T, S + 1)
    if n == 1:
        return np.array([T - 1], dtype=np.int64)
    candidates = np.floor(np.linspace(0, math.sqrt(T - 1), n) ** 2 + 0.5)
    steps = _distinct(candidates, T)
    assert len(np.unique(steps)) == n and steps[0] >= 0 and steps[-1] < T
    return steps


KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5 and table 1


def karras_timesteps(alphas_bar: np.ndarray, S: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """S distinct, increasing timesteps (int64, (S,)) spaced as Karras et al. eq. 5 in
    sigma_t = sqrt((1 - alphas_bar_t) / alphas_bar_t), from sigma_0 to sigma_{T-1}.

    Each sigma_i = (sigma_max^(1/rho) + i / (S - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    is mapped to the timestep whose log-sigma it interpolates, rounded half to even (diffusers'
    `use_karras_sigmas`: equal lists while they are distinct). Repeats, which diffusers keeps,
    move up by one. The samplers then use the table's sigma at each timestep, so the network
    sees the noise level it is evaluated at (diffusers keeps the unrounded sigmas instead).
    """
    if alphas_bar is None:
        raise ValueError("karras spacing needs the noise schedule (alphas_bar)")
    alphas_bar = np.asarray(alphas_bar, dtype=np.float64)
    if alphas_bar[-1] == 0:
        raise ValueError("karras spacing needs a finite sigma at t = T-1, and zero terminal SNR "
                         "makes it infinite; use trailing, linspace or quadratic spacing")
    T, S = _check_subsequence_size(len(alphas_bar), S)
    if S == 1:
        return np.array([T - 1], dtype=np.int64)
    log_sigmas = 0.5 * (np.log1p(-alphas_bar) - np.log(alphas_bar))  # increasing in t
    inv_rho_max, inv_rho_min = np.exp(log_sigmas[[-1, 0]] / rho)
    ramp = np.linspace(0, 1, S)
    sigmas = (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho  # descending
    t = np.round(np.interp(np.log(sigmas), log_sigmas, np.arange(T, dtype=np.float64)))
    steps = _distinct(t[::-1], T)
    assert len(np.unique(steps)) == S and steps[0] >= 0 and steps[-1] < T
    return steps
