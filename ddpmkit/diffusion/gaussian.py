"""Gaussian diffusion: forward process, posterior, model parameterizations, losses, bits/dim.

References:
- Ho, Jain, Abbeel (2020), DDPM: eq. 4 (q(x_t | x_0)), eq. 6-7 (posterior q(x_{t-1} | x_t, x_0)),
  eq. 11 (mean from eps), eq. 12/14 (losses), eq. 13 (discretized decoder), eq. 5 (bound).
- The official DDPM code (diffusion_utils_2.py) for the `fixed-large` first entry, the clipped
  posterior log-variance, and the `learned` log-variance output.
- Salimans & Ho (2022), "Progressive Distillation", section 4 and appendix D: the `v` target
  v = sqrt(alphas_bar) eps - sqrt(1 - alphas_bar) x_0.
- Hang et al. (2023), "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 7-9:
  the `min-snr` loss weights.
- Lin et al. (2024), "Common Diffusion Noise Schedules and Sampling Steps Are Flawed": zero
  terminal SNR (alphas_bar_{T-1} = 0, the last beta 1).

Symbols (all tables float64, shape (T,)):
  betas               beta_t
  alphas              1 - beta_t
  alphas_bar          prod_{s<=t} alphas_s
  alphas_bar_prev     alphas_bar_{t-1}, with alphas_bar_{-1} = 1
  posterior_var       beta~_t = beta_t (1 - alphas_bar_prev) / (1 - alphas_bar)         (eq. 7)
  posterior_logvar_clipped  log beta~_t with beta~_0 (= 0) replaced by beta~_1
  posterior_mean_coef1/2    mu~_t = coef1 x_0 + coef2 x_t                                (eq. 7)
  snr                 SNR_t = alphas_bar / (1 - alphas_bar)
The network's mean channels predict, by `model_mean_type`: `eps`; `x_0`; `mean` (mu~_t); `v`.
Every sampler and loss reads them through one conversion, `predict` -> (x_0, eps).
Shapes: x_0, x_t, eps: (B, *S) for images (B, C, H, W) and toy data (B, D) alike; t: int64 (B,).
"""

import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ddpmkit.choices import DECODERS, LOSS_TYPES, LOSS_WEIGHTS, MODEL_MEAN_TYPES, MODEL_VAR_TYPES
from ddpmkit.diffusion.functions import (
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Gaussian(NamedTuple):
    mean: torch.Tensor
    var: torch.Tensor
    logvar: torch.Tensor


class Prediction(NamedTuple):
    """What the network output says about the clean data and the noise in x_t: (B, *S) each."""
    x_0: torch.Tensor
    eps: torch.Tensor


class PMeanVar(NamedTuple):
    """The model's reverse step p(x_{t-1} | x_t) and what it implies about x_0 and eps."""
    mean: torch.Tensor
    var: torch.Tensor
    logvar: torch.Tensor
    pred_x_0: torch.Tensor
    pred_eps: torch.Tensor


class BPDResult(NamedTuple):
    """The variational bound in bits/dim, per example (DDPM eq. 5)."""
    total: torch.Tensor   # (B,) prior + sum of terms
    prior: torch.Tensor   # (B,) KL(q(x_T | x_0) || N(0, I))
    terms: torch.Tensor   # (B, T) L_t for t = 0..T-1 (t = 0 is the decoder NLL)
    x_0_mse: torch.Tensor  # (B, T) mean squared error of the predicted x_0


def _choice(value: str, allowed: Tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
    return value


def _check_objective(betas: np.ndarray, model_mean_type: str, model_var_type: str,
                     loss_type: str, loss_weight: str, min_snr_gamma: float) -> None:
    """ValueError for the betas and the combinations of settings that are not defined."""
    if betas.ndim != 1 or len(betas) < 2:
        raise ValueError("betas must be a 1-D array of at least 2 diffusion steps")
    # Only the last beta may be 1: zero terminal SNR (x_{T-1} is pure noise).
    if not (np.all((betas[:-1] > 0) & (betas[:-1] < 1)) and 0 < betas[-1] <= 1):
        raise ValueError("every beta must lie in (0, 1) (the last may be 1: zero terminal SNR)")
    if loss_type == "mse" and model_var_type == "learned":
        raise ValueError(
            "loss type 'mse' trains only the mean, so a 'learned' variance would never be "
            "trained; use loss type 'kl' with 'learned', or model variance type "
            "'fixed-small' / 'fixed-large' with 'mse'"
        )
    if loss_weight == "min-snr" and loss_type != "mse":
        raise ValueError("loss weight 'min-snr' weights the MSE over t; loss type 'kl' is the "
                         "variational bound, which a weighting would no longer be: use "
                         "loss weight 'uniform' with 'kl'")
    if not (math.isfinite(min_snr_gamma) and min_snr_gamma > 0):
        raise ValueError(f"min-SNR gamma must be a positive number, got {min_snr_gamma}")
    if betas[-1] == 1 and model_mean_type == "eps":
        raise ValueError("zero terminal SNR leaves no signal at t = T-1, where x_0 cannot be "
                         "recovered from eps (it divides by sqrt(alphas_bar) = 0); use model "
                         "mean type 'v' (Lin et al. 2024) or 'x_0'")


def _x_0_loss_factor(model_mean_type: str, snr: np.ndarray, coef1: np.ndarray) -> np.ndarray:
    """f_t with |target - output|^2 = f_t |x_0 - x_0^|^2 for the mean type's MSE: eps: SNR;
    x_0: 1; v: SNR + 1; mean: coef1^2 (mu~ is coef1 x_0 plus a term in x_t)."""
    return {"eps": snr, "x_0": np.ones_like(snr), "v": snr + 1.0,
            "mean": coef1 ** 2}[model_mean_type]


def _tables(betas: np.ndarray) -> Dict[str, np.ndarray]:
    """The float64 tables (T,) of the symbol table above, from betas (T,)."""
    alphas = 1.0 - betas
    alphas_bar = np.cumprod(alphas)
    alphas_bar_prev = np.append(1.0, alphas_bar[:-1])
    posterior_var = betas * (1.0 - alphas_bar_prev) / (1.0 - alphas_bar)
    # beta~_0 = 0; the official code replaces it by beta~_1 so the log stays finite.
    posterior_var_clipped = np.append(posterior_var[1], posterior_var[1:])
    # `fixed-large` uses beta_t, with beta_0 replaced by beta~_1 (official code) so the
    # decoder variance at t = 0 is not needlessly large.
    fixed_large_var = np.append(posterior_var[1], betas[1:])
    snr = alphas_bar / (1.0 - alphas_bar)
    coef1 = betas * np.sqrt(alphas_bar_prev) / (1.0 - alphas_bar)
    with np.errstate(divide="ignore"):  # 1 / alphas_bar is inf at zero terminal SNR
        sqrt_recip_alphas_bar = np.sqrt(1.0 / alphas_bar)
        sqrt_recipm1_alphas_bar = np.sqrt(1.0 / alphas_bar - 1.0)
    return {
        "betas": betas,
        "alphas_bar": alphas_bar,
        "alphas_bar_prev": alphas_bar_prev,
        "sqrt_alphas_bar": np.sqrt(alphas_bar),
        "sqrt_one_minus_alphas_bar": np.sqrt(1.0 - alphas_bar),
        "log_one_minus_alphas_bar": np.log(1.0 - alphas_bar),
        "sqrt_recip_alphas_bar": sqrt_recip_alphas_bar,
        "sqrt_recipm1_alphas_bar": sqrt_recipm1_alphas_bar,
        "posterior_var": posterior_var,
        "posterior_logvar_clipped": np.log(posterior_var_clipped),
        "posterior_mean_coef1": coef1,
        "posterior_mean_coef2": (1.0 - alphas_bar_prev) * np.sqrt(alphas) / (1.0 - alphas_bar),
        "fixed_large_var": fixed_large_var,
        "fixed_large_logvar": np.log(fixed_large_var),
        "snr": snr,
    }


class GaussianDiffusion:
    """The DDPM forward and reverse processes. Not an nn.Module: it holds no device or weights.

    `decoder="discretized"` treats data as 8-bit pixels scaled to [-1, 1] (DDPM eq. 13) and clips
    predicted x_0 to [-1, 1] by default; `decoder="continuous"` (toy data) uses a Gaussian density
    at t = 0 and no clipping. `clip_denoised` overrides that default (a diffusers scheduler's
    `clip_sample: false`).

    `loss_weight="min-snr"` weights the MSE at step t by w_t = min(SNR_t, gamma) / f_t, where
    f_t (`_x_0_loss_factor`) turns the mean type's MSE into the MSE of x_0: every mean type
    then minimises min(SNR_t, gamma) |x_0 - x_0^|^2 (Hang et al. 2023: eps min(SNR, g) / SNR,
    x_0 min(SNR, g), v min(SNR, g) / (SNR + 1); for `mean`, min(SNR, g) / coef1^2).
    Betas whose last entry is 1 have zero terminal SNR (see `rescale_zero_terminal_snr`).
    """

    def __init__(self, betas, model_mean_type: str = "eps", model_var_type: str = "fixed-large",
                 loss_type: str = "mse", decoder: str = "discretized",
                 clip_denoised: Optional[bool] = None, loss_weight: str = "uniform",
                 min_snr_gamma: float = 5.0):
        self.model_mean_type = _choice(model_mean_type, MODEL_MEAN_TYPES, "model mean type")
        self.model_var_type = _choice(model_var_type, MODEL_VAR_TYPES, "model variance type")
        self.loss_type = _choice(loss_type, LOSS_TYPES, "loss type")
        self.decoder = _choice(decoder, DECODERS, "decoder")
        self.loss_weight = _choice(loss_weight, LOSS_WEIGHTS, "loss weight")
        self.min_snr_gamma = float(min_snr_gamma)
        betas = np.asarray(betas, dtype=np.float64)
        _check_objective(betas, model_mean_type, model_var_type, loss_type, loss_weight,
                         self.min_snr_gamma)
        self.T = len(betas)
        self.zero_terminal_snr = bool(betas[-1] == 1)
        self.clip_denoised = decoder == "discretized" if clip_denoised is None else clip_denoised

        tables = _tables(betas)
        if self.loss_weight == "min-snr":
            snr = tables["snr"]
            factor = _x_0_loss_factor(self.model_mean_type, snr, tables["posterior_mean_coef1"])
            tables["min_snr_weight"] = np.minimum(snr, self.min_snr_gamma) / factor
        for name, table in tables.items():
            # Only eps -> x_0 divides by sqrt(alphas_bar), and eps is refused at zero SNR.
            eps_only = name in ("sqrt_recip_alphas_bar", "sqrt_recipm1_alphas_bar")
            assert np.all(np.isfinite(table[:-1] if eps_only else table)), name
        self.tables: Dict[str, np.ndarray] = tables
        for name, table in tables.items():
            setattr(self, name, table)
        self._device_tables: Dict[torch.device, Dict[str, torch.Tensor]] = {}

    def __repr__(self) -> str:
        weight = "" if self.loss_weight == "uniform" else f", min-snr={self.min_snr_gamma:g}"
        zero = ", zero-terminal-snr" if self.zero_terminal_snr else ""
        return (f"GaussianDiffusion(T={self.T}, mean={self.model_mean_type}, "
                f"var={self.model_var_type}, loss={self.loss_type}{weight}{zero}, "
                f"decoder={self.decoder})")

    # ---- table lookup --------------------------------------------------------------------
    def _tables_on(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The tables as tensors on `device`, made once per device (not on every lookup)."""
        cached = self._device_tables.get(device)
        if cached is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no f64
            cached = {k: torch.as_tensor(v, dtype=dtype, device=device)
                      for k, v in self.tables.items()}
            self._device_tables[device] = cached
        return cached

    def extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, ..., 1) to broadcast against x (B, *S), in x's float dtype."""
        table = self._tables_on(x.device)[name]
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        out = table.gather(0, t.to(device=x.device, dtype=torch.long)).to(dtype)
        return out.view(-1, *([1] * (x.ndim - 1)))

    def model_out_channels(self, channels: int) -> int:
        """Channels the network must output: the data's, doubled for a learned variance."""
        return 2 * channels if self.model_var_type == "learned" else channels

    # ---- forward process -----------------------------------------------------------------
    def q_mean_var(self, x_0: torch.Tensor, t: torch.Tensor) -> Gaussian:
        """q(x_t | x_0) = N(sqrt(alphas_bar) x_0, (1 - alphas_bar) I)   (DDPM eq. 4)."""
        mean = self.extract("sqrt_alphas_bar", t, x_0) * x_0
        var = self.extract("sqrt_one_minus_alphas_bar", t, x_0) ** 2
        logvar = self.extract("log_one_minus_alphas_bar", t, x_0)
        return Gaussian(mean, var.expand_as(x_0), logvar.expand_as(x_0))

    def q_sample(self, x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alphas_bar) x_0 + sqrt(1 - alphas_bar) eps   (DDPM eq. 4)."""
        return (self.extract("sqrt_alphas_bar", t, x_0) * x_0
                + self.extract("sqrt_one_minus_alphas_bar", t, x_0) * noise)

    def q_posterior(self, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Gaussian:
        """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)   (DDPM eq. 6-7)."""
        mean = (self.extract("posterior_mean_coef1", t, x_t) * x_0
                + self.extract("posterior_mean_coef2", t, x_t) * x_t)
        var = self.extract("posterior_var", t, x_t).expand_as(x_t)
        logvar = self.extract("posterior_logvar_clipped", t, x_t).expand_as(x_t)
        return Gaussian(mean, var, logvar)

    # ---- parameterizations -----------------------------------------------------------------
    def pred_x_0_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alphas_bar) eps) / sqrt(alphas_bar)   (eq. 4 solved for x_0)."""
        return (self.extract("sqrt_recip_alphas_bar", t, x_t) * x_t
                - self.extract("sqrt_recipm1_alphas_bar", t, x_t) * eps)

    def pred_eps_from_x_0(self, x_t, t, x_0):
        """eps = (x_t - sqrt(alphas_bar) x_0) / sqrt(1 - alphas_bar)   (finite at zero SNR)."""
        return ((x_t - self.extract("sqrt_alphas_bar", t, x_t) * x_0)
                / self.extract("sqrt_one_minus_alphas_bar", t, x_t))

    def pred_x_0_from_v(self, x_t, t, v):
        """x_0 = sqrt(alphas_bar) x_t - sqrt(1 - alphas_bar) v   (Salimans & Ho 2022, eq. 4
        with x_t = alpha x_0 + sigma eps and alpha^2 + sigma^2 = 1)."""
        return (self.extract("sqrt_alphas_bar", t, x_t) * x_t
                - self.extract("sqrt_one_minus_alphas_bar", t, x_t) * v)

    def pred_eps_from_v(self, x_t, t, v):
        """eps = sqrt(1 - alphas_bar) x_t + sqrt(alphas_bar) v."""
        return (self.extract("sqrt_one_minus_alphas_bar", t, x_t) * x_t
                + self.extract("sqrt_alphas_bar", t, x_t) * v)

    def v_target(self, x_0, t, noise):
        """v = sqrt(alphas_bar) eps - sqrt(1 - alphas_bar) x_0   (the `v` mean type's target)."""
        return (self.extract("sqrt_alphas_bar", t, x_0) * noise
                - self.extract("sqrt_one_minus_alphas_bar", t, x_0) * x_0)

    def pred_x_0_from_mean(self, x_t, t, mean):
        """x_0 = (mu~ - coef2 x_t) / coef1   (eq. 7 solved for x_0)."""
        return ((mean - self.extract("posterior_mean_coef2", t, x_t) * x_t)
                / self.extract("posterior_mean_coef1", t, x_t))

    def split_output(self, model_output: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(mean part, log-variance part or None): a learned variance is the second half of dim 1."""
        if self.model_var_type == "learned":
            mean_part, logvar_part = model_output.chunk(2, dim=1)
            return mean_part, logvar_part
        return model_output, None

    def predict(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                clip_denoised: Optional[bool] = None) -> Prediction:
        """(x_0, eps) implied by the network output for any mean type: the one conversion that
        every sampler and loss goes through. model_output: (B, C_out, ...), x_t: (B, *S).

        With `clip_denoised`, x_0 is clipped to [-1, 1] and eps re-derived from the clipped x_0;
        without, eps is the network's own (eps, v: in closed form; x_0, mean: from x_0).
        """
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        out = self.split_output(model_output.to(x_t.dtype))[0]
        if self.model_mean_type == "eps":
            x_0 = self.pred_x_0_from_eps(x_t, t, out)
        elif self.model_mean_type == "v":
            x_0 = self.pred_x_0_from_v(x_t, t, out)
        elif self.model_mean_type == "x_0":
            x_0 = out
        else:
            x_0 = self.pred_x_0_from_mean(x_t, t, out)
        if clip:
            x_0 = x_0.clamp(-1.0, 1.0)
        elif self.model_mean_type == "eps":
            return Prediction(x_0, out)
        elif self.model_mean_type == "v":
            return Prediction(x_0, self.pred_eps_from_v(x_t, t, out))
        return Prediction(x_0, self.pred_eps_from_x_0(x_t, t, x_0))

    def p_mean_var(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   clip_denoised: Optional[bool] = None) -> PMeanVar:
        """p(x_{t-1} | x_t) from the network output, for every mean and variance type.

        With `clip_denoised`, the predicted x_0 is clipped to [-1, 1] before it is used (the mean
        and eps then follow from the clipped x_0; a `mean` prediction is used as it is).
        """
        out, logvar_out = self.split_output(model_output.to(x_t.dtype))
        if self.model_var_type == "learned":
            logvar = logvar_out
            var = torch.exp(logvar)
        else:
            var_name = "posterior_var" if self.model_var_type == "fixed-small" else "fixed_large_var"
            log_name = ("posterior_logvar_clipped" if self.model_var_type == "fixed-small"
                        else "fixed_large_logvar")
            var = self.extract(var_name, t, x_t).expand_as(x_t)
            logvar = self.extract(log_name, t, x_t).expand_as(x_t)

        pred = self.predict(model_output, x_t, t, clip_denoised)
        mean = out if self.model_mean_type == "mean" else self.q_posterior(pred.x_0, x_t, t).mean
        return PMeanVar(mean, var, logvar, pred.x_0, pred.eps)

    # ---- losses -------------------------------------------------------------------------------
    def _decoder_log_likelihood(self, x_0, mean, logvar) -> torch.Tensor:
        if self.decoder == "discretized":
            return discretized_gaussian_log_likelihood(x_0, mean, 0.5 * logvar)
        return continuous_gaussian_log_likelihood(x_0, mean, 0.5 * logvar)

    def vb_terms_bpd(self, model_output, x_0, x_t, t, clip_denoised: bool = False) -> torch.Tensor:
        """L_{t-1} of DDPM eq. 5 in bits/dim, per example (B,).

        t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); t = 0: decoder NLL -log p(x_0 | x_1).
        """
        true = self.q_posterior(x_0, x_t, t)
        p = self.p_mean_var(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true.mean, true.logvar, p.mean, p.logvar)) / math.log(2.0)
        nll = -mean_flat(self._decoder_log_likelihood(x_0, p.mean, p.logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def mse_target(self, x_0, x_t, t, noise) -> torch.Tensor:
        """What the network regresses on under the MSE loss (DDPM eq. 14 for eps)."""
        if self.model_mean_type == "eps":
            return noise
        if self.model_mean_type == "x_0":
            return x_0
        if self.model_mean_type == "v":
            return self.v_target(x_0, t, noise)
        return self.q_posterior(x_0, x_t, t).mean

    def loss_from_output(self, model_output, x_0, x_t, t, noise) -> torch.Tensor:
        """Per-example training loss (B,) given the network output on x_t."""
        if self.loss_type == "mse":
            target = self.mse_target(x_0, x_t, t, noise)
            loss = mean_flat((model_output.to(target.dtype) - target) ** 2)
            if self.loss_weight == "min-snr":
                loss = loss * self.extract("min_snr_weight", t, loss)
            return loss
        return self.vb_terms_bpd(model_output, x_0, x_t, t, clip_denoised=False)

    def training_losses(self, denoise_fn: DenoiseFn, x_0: torch.Tensor, t: torch.Tensor,
                        noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-example loss (B,): `mse` on the parameterization's target, or `kl` (the bound)."""
        if noise is None:
            noise = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, noise)
        return self.loss_from_output(denoise_fn(x_t, t), x_0, x_t, t, noise)

    # ---- bits/dim ---------------------------------------------------------------------------
    def prior_bpd(self, x_0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example (B,)."""
        t = torch.full((x_0.shape[0],), self.T - 1, dtype=torch.long, device=x_0.device)
        q = self.q_mean_var(x_0, t)
        zeros = torch.zeros_like(x_0)
        return mean_flat(normal_kl(q.mean, q.logvar, zeros, zeros)) / math.log(2.0)

    @torch.no_grad()
    def bpd(self, denoise_fn: DenoiseFn, x_0: torch.Tensor,
            clip_denoised: Optional[bool] = None,
            generator: Optional[torch.Generator] = None,
            callback: Optional[Callable[[int], None]] = None) -> BPDResult:
        """The full variational bound (DDPM eq. 5) in bits/dim: prior + sum over all T terms.

        One network call per step t = T-1 .. 0, each on a fresh x_t ~ q(x_t | x_0).
        """
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        B = x_0.shape[0]
        terms = torch.zeros(B, self.T, dtype=x_0.dtype, device=x_0.device)
        mses = torch.zeros_like(terms)
        for step in reversed(range(self.T)):
            t = torch.full((B,), step, dtype=torch.long, device=x_0.device)
            noise = torch.randn(x_0.shape, generator=generator, dtype=x_0.dtype,
                                device=x_0.device)
            x_t = self.q_sample(x_0, t, noise)
            out = denoise_fn(x_t, t)
            terms[:, step] = self.vb_terms_bpd(out, x_0, x_t, t, clip_denoised=clip)
            pred_x_0 = self.p_mean_var(out, x_t, t, clip_denoised=clip).pred_x_0
            mses[:, step] = mean_flat((pred_x_0 - x_0) ** 2)
            if callback is not None:
                callback(step)
        prior = self.prior_bpd(x_0)
        return BPDResult(terms.sum(dim=1) + prior, prior, terms, mses)
