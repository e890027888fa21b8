"""The newer samplers against closed forms: for data x_0 ~ N(mu, s^2) the exact denoiser is
known, the probability-flow ODE maps x_T to mu + s (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 +
sigma_T^2), and a stochastic sampler must draw from N(mu, s^2). Also their NFE, one-line
errors, and what they do with a learned variance."""

import math

import numpy as np
import pytest
import torch
from test_diffusion_diffusers import GaussianData

from ddpmkit.choices import SAMPLERS
from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule, make_sampler, sample

pytestmark = pytest.mark.usefixtures("one_thread")

ODE_SAMPLERS = ("ddim", "dpm-solver++", "dpm-solver++3m", "unipc2", "unipc3", "heun")
STOCHASTIC_SAMPLERS = ("dpm-solver++2m-sde", "euler-ancestral")
MU, S_DATA = 0.3, 0.5


def _setup(T=1000):
    d = GaussianDiffusion(get_beta_schedule("linear", T), decoder="continuous")
    return d, GaussianData(d.alphas_bar, MU, S_DATA)("eps")


def _x_T(n, seed=0):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_sampler_names_hold_the_issue_words():
    for word in ("3m", "sde", "unipc", "heun", "euler"):
        assert any(word in name for name in SAMPLERS)


@pytest.mark.parametrize("name", ODE_SAMPLERS)
@pytest.mark.parametrize("spacing", [None, "karras"])
def test_ode_samplers_converge_to_the_exact_flow(name, spacing):
    d, fn = _setup()
    x_T = _x_T(500)
    a_T, s_T = math.sqrt(d.alphas_bar[-1]), math.sqrt(1 - d.alphas_bar[-1])
    exact = MU + S_DATA * (x_T - a_T * MU) / math.sqrt(a_T ** 2 * S_DATA ** 2 + s_T ** 2)
    errors = []
    for steps in (20, 200):
        sampler = make_sampler(d, name, steps=steps, skip_schedule=spacing)
        errors.append((sample(d, fn, sampler, x_T) - exact).abs().max().item())
    tolerance = 3e-2 if name == "ddim" else 5e-3  # DDIM is first order: 0.022 at 200 steps
    assert errors[1] < tolerance and errors[1] < errors[0] / 5, errors


@pytest.mark.parametrize("name", STOCHASTIC_SAMPLERS)
def test_stochastic_samplers_draw_from_the_data_distribution(name):
    d, fn = _setup()
    sampler = make_sampler(d, name, steps=200)
    x = sample(d, fn, sampler, _x_T(20_000), generator=torch.Generator().manual_seed(1))
    # standard errors: 0.0035 (mean), 0.0025 (std)
    assert abs(x.mean().item() - MU) < 0.015 and abs(x.std().item() - S_DATA) < 0.015
    ode = sample(d, fn, make_sampler(d, "dpm-solver++", steps=200), _x_T(20_000))
    assert (x - ode).abs().mean() > 0.1  # not the ODE's map: noise was added


@pytest.mark.parametrize("name", SAMPLERS[2:])
def test_each_evaluation_is_one_loop_step_and_heun_costs_two_per_step(name):
    d, fn = _setup(T=100)
    steps = 6
    sampler = make_sampler(d, name, steps=steps)
    calls = []

    def counted(x, t):
        calls.append(int(t[0]))
        return fn(x, t)

    infos = []
    sample(d, counted, sampler, _x_T(3), callback=infos.append,
           generator=torch.Generator().manual_seed(0))
    nfe = 2 * steps - 1 if name == "heun" else steps  # Heun's last step is Euler alone
    assert len(calls) == len(infos) == len(sampler.timesteps) == nfe
    assert calls == [int(t) for t in sampler.timesteps]
    assert sampler.steps == steps


@pytest.mark.parametrize("name,order", [("dpm-solver++3m", 3), ("unipc2", 2), ("unipc3", 3)])
def test_an_order_above_the_step_count_is_refused(name, order):
    d, _ = _setup(T=100)
    with pytest.raises(ValueError, match=f"order {order} needs at least {order} steps"):
        make_sampler(d, name, steps=order - 1)
    assert len(make_sampler(d, name, steps=order).timesteps) == order


@pytest.mark.parametrize("eta", [float("nan"), float("inf"), -0.5])
def test_a_nan_or_infinite_eta_is_refused(eta):
    d, _ = _setup(T=100)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        make_sampler(d, "ddim", steps=10, eta=eta)


def test_a_nan_guidance_scale_is_refused():
    from ddpmkit.diffusion import classifier_free_guidance

    with pytest.raises(ValueError, match="guidance scale"):
        classifier_free_guidance(lambda x, t, y: x, torch.zeros(2, dtype=torch.long), 3,
                                 float("nan"))


@pytest.mark.parametrize("name", SAMPLERS[2:])
def test_a_learned_variance_does_not_change_the_solvers_path(name):
    """The solvers use the mean channels only (their paths need no variance): a model with a
    learned log-variance gives the same samples as the same mean with a fixed variance."""
    T = 100
    betas = get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2)
    fixed = GaussianDiffusion(betas, "eps", "fixed-small", "mse", decoder="continuous")
    learned = GaussianDiffusion(betas, "eps", "learned", "kl", decoder="continuous")
    fn = GaussianData(fixed.alphas_bar, MU, S_DATA)("eps")

    def with_logvar(x, t):
        return torch.cat([fn(x, t), -3.0 + torch.sin(7 * x)], dim=1)

    x_T = _x_T(5)
    runs = [sample(d, f, make_sampler(d, name, steps=8), x_T,
                   noise_fn=lambda i, x: _x_T(len(x), seed=100 + i))
            for d, f in ((fixed, fn), (learned, with_logvar))]
    assert torch.equal(runs[0], runs[1])


def test_heun_evaluates_each_point_twice_but_the_first():
    d, _ = _setup(T=100)
    sampler = make_sampler(d, "heun", steps=4, skip_schedule="linspace")
    points = sampler.points
    np.testing.assert_array_equal(sampler.timesteps,
                                  [points[0], points[1], points[1], points[2], points[2],
                                   points[3], points[3]])


def test_karras_spacing_for_ddim_and_the_solvers():
    """DDIM takes S Karras timesteps (from T-1 to 0); so do the solvers, then clean data."""
    from ddpmkit.diffusion.samplers import DDIMSampler
    from ddpmkit.diffusion.schedules import karras_timesteps

    d, _ = _setup()
    expected = karras_timesteps(d.alphas_bar, 10)[::-1]
    assert expected[0] == 999 and expected[-1] == 0
    for name in ("ddim", "dpm-solver++3m", "unipc3", "euler-ancestral"):
        sampler = make_sampler(d, name, steps=10, skip_schedule="karras")
        np.testing.assert_array_equal(sampler.timesteps, expected)
    with pytest.raises(ValueError, match="needs the noise schedule"):
        DDIMSampler(1000, 10, 0.0, "karras")
