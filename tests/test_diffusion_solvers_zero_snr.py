"""The newer samplers with zero terminal SNR (alphas_bar_{T-1} = 0: alpha 0, sigma 1, lambda
-inf, Karras' sigma +inf), on v models (the parameterisation that is defined there).

For data x_0 ~ N(mu, s^2) the exact denoiser at zero SNR is x_0 = mu whatever x_T, x_T is pure
noise, and the probability-flow ODE maps x_T to mu + s x_T. Checked: the step from t = T-1 is
each sampler's first-order limit written from the formulas (DDIM for the ODE solvers, a fresh
draw from q(x_next | x_0) for the stochastic ones); the multistep solvers and Heun then go on
exactly as if they had started from the next point; the ODE samplers converge to mu + s x_T;
the SDE samples N(mu, s^2); Karras spacing, which needs a finite sigma_max, is refused.
"""

import math

import pytest
import torch
from test_diffusion_diffusers import GaussianData

from ddpmkit.diffusion import (
    GaussianDiffusion,
    get_beta_schedule,
    make_sampler,
    rescale_zero_terminal_snr,
    sample,
)
from ddpmkit.diffusion.multistep import DPMSolverPPSampler
from ddpmkit.diffusion.sampler_utils import solver_points
from ddpmkit.diffusion.sigma_samplers import HeunSampler

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000
MU, S_DATA = 0.3, 0.5
NEW_ODE = ("dpm-solver++", "dpm-solver++3m", "unipc2", "unipc3", "heun")
NEW_STOCHASTIC = ("dpm-solver++2m-sde", "euler-ancestral")


def _setup():
    d = GaussianDiffusion(rescale_zero_terminal_snr(get_beta_schedule("linear", T)), "v",
                          "fixed-small", decoder="continuous")
    assert d.alphas_bar[-1] == 0
    return d, GaussianData(d.alphas_bar, MU, S_DATA)("v")


def _x_T(n, seed=0):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", NEW_ODE + NEW_STOCHASTIC)
def test_the_step_from_zero_snr_is_the_first_order_limit(name):
    d, fn = _setup()
    sampler = make_sampler(d, name, steps=10)
    t_now = int(sampler.timesteps[0])
    assert t_now == T - 1
    x_T, z = _x_T(4), _x_T(4, seed=1)
    out = fn(x_T, torch.full((4,), t_now))
    x, x_0 = sampler.step(d, out, x_T, 0, z, False, sampler.new_state())
    t_next = int(sampler.points[1] if name == "heun" else sampler.timesteps[1])
    a_next, s_next = math.sqrt(d.alphas_bar[t_next]), math.sqrt(1 - d.alphas_bar[t_next])
    # the exact denoiser at zero SNR is mu; eps = x_T (x_T = 0 x_0 + 1 eps)
    torch.testing.assert_close(x_0, torch.full_like(x_T, MU), rtol=0, atol=1e-12)
    moved_along = z if name in NEW_STOCHASTIC else x_T
    torch.testing.assert_close(x, a_next * MU + s_next * moved_along, rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda points: DPMSolverPPSampler(T, 0, order=2, points=points),
    lambda points: DPMSolverPPSampler(T, 0, order=3, points=points),
    lambda points: HeunSampler(T, 0, points=points),
], ids=["2m", "3m", "heun"])
def test_after_the_zero_snr_step_the_solver_goes_on_as_from_the_next_point(make):
    """The zero-SNR point enters no divided difference (and Heun has no slope to average from
    it): the run equals its DDIM first step followed by the same solver started one point
    later (Heun spends one extra evaluation there, which leaves its sample unchanged)."""
    d, fn = _setup()
    points = solver_points(T, 12, "quadratic")
    x_T = _x_T(6)
    full = sample(d, fn, make(points), x_T, clip_denoised=False)
    a_1, s_1 = math.sqrt(d.alphas_bar[points[1]]), math.sqrt(1 - d.alphas_bar[points[1]])
    rest = sample(d, fn, make(points[1:]), a_1 * MU + s_1 * x_T, clip_denoised=False)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full, rest, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NEW_ODE)
def test_ode_samplers_converge_to_the_flow_from_pure_noise(name):
    d, fn = _setup()
    x_T = _x_T(500)
    exact = MU + S_DATA * x_T
    errors = [float((sample(d, fn, make_sampler(d, name, steps=S), x_T, clip_denoised=False)
                     - exact).abs().max()) for S in (25, 100)]
    assert errors[1] < 2e-3 and errors[1] < errors[0] / 4, errors


def test_the_sde_samples_the_data_law_from_pure_noise():
    d, fn = _setup()
    x = sample(d, fn, make_sampler(d, "dpm-solver++2m-sde", steps=50), _x_T(4000),
               clip_denoised=False, generator=torch.Generator().manual_seed(3))
    # standard errors with 4000 draws: 0.008 (mean), 0.006 (std)
    assert abs(float(x.mean()) - MU) < 0.03 and abs(float(x.std()) - S_DATA) < 0.025


@pytest.mark.parametrize("name", ["ddim", "dpm-solver++", "heun"])
def test_karras_spacing_is_refused_at_zero_terminal_snr(name):
    d, _ = _setup()
    with pytest.raises(ValueError, match="zero terminal SNR") as info:
        make_sampler(d, name, steps=10, skip_schedule="karras")
    assert "\n" not in str(info.value)
