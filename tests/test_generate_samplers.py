"""Few-step samplers against the many-step ODE solution, from the same x_T.

DPM-Solver++(2M) is second order in the step size and DDIM first order, so with 50 steps
DPM-Solver++ must land closer to (a) the exact probability-flow ODE solution of an analytic
denoiser and (b) DDIM with all T steps of a trained toy network.

Analytic case: data x_0 ~ N(mu, diag(s^2)). Then x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab) and the
optimal eps prediction is E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab).
The ODE flow between Gaussians is the monotone affine map, so from x_T (at ab_T):
    x_0 = mu + s (x_T - sqrt(ab_T) mu) / sqrt(ab_T s^2 + 1 - ab_T).
The data std s is kept >= 0.5: both samplers end with one first-order jump from their last
timestep to clean data, whose error grows like (1 - ab_last) / s^2 and would hide the solver's
order for very narrow data.
"""

import pytest
import torch

from ddpmkit.data.toy import make_toy_data, toy_generator
from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule, make_sampler, sample
from ddpmkit.models.toy import ToyMLP

T = 1000
STEPS = 50


def _diffusion():
    betas = get_beta_schedule("linear", T, beta_start=1e-4, beta_end=0.02)
    return GaussianDiffusion(betas, decoder="continuous")  # no clipping of x_0


def _rms(a, b):
    return float(((a - b) ** 2).mean().sqrt())


def test_analytic_gaussian_exact_solution():
    diffusion = _diffusion()
    alphas_bar = torch.as_tensor(diffusion.alphas_bar)  # float64
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    s = torch.tensor([0.5, 0.8, 1.0, 1.5], dtype=torch.float64)

    def eps_fn(x_t, t):
        ab = alphas_bar[t][:, None]
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * s ** 2 + 1 - ab)

    x_T = torch.randn(512, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab_T = alphas_bar[-1]
    exact = mu + s * (x_T - ab_T.sqrt() * mu) / (ab_T * s ** 2 + 1 - ab_T).sqrt()

    def error(name, steps, skip_schedule="linspace"):  # from T - 1, as the exact solution
        sampler = make_sampler(diffusion, name, steps=steps, skip_schedule=skip_schedule)
        return _rms(sample(diffusion, eps_fn, sampler, x_T), exact)

    err_ddim_all = error("ddim", T)
    err_ddim = error("ddim", STEPS)
    err_dpm = error("dpm-solver++", STEPS)
    assert err_ddim_all < 2e-3  # T first-order steps: the discretization error is small
    assert err_dpm < 0.1 * err_ddim, (err_dpm, err_ddim)  # measured: 0.0022 vs 0.036
    # Orders: doubling the steps (100 -> 200) halves DDIM's error and cuts DPM-Solver++'s by
    # about 4 (measured 6.8: its remaining error terms partly cancel).
    ddim_ratio = error("ddim", 100) / error("ddim", 200)
    dpm_ratio = error("dpm-solver++", 100) / error("dpm-solver++", 200)
    assert 1.7 < ddim_ratio < 2.3 and dpm_ratio > 3.5, (ddim_ratio, dpm_ratio)
    # DPM-Solver++'s default time-quadratic steps pay off where it is meant to be used, at
    # 10-20 steps (measured on mu, s = 0.5: 0.022 vs 0.096 at 10 steps).
    assert error("dpm-solver++", 10, None) < 0.5 * error("dpm-solver++", 10)
    assert error("dpm-solver++", 20, None) < 0.8 * error("dpm-solver++", 20)


@pytest.fixture(scope="module")
def toy_model():
    """A small MLP trained briefly on the 8-Gaussian data (a smooth, non-linear eps model)."""
    torch.manual_seed(0)
    g = toy_generator(0)
    diffusion = _diffusion()
    net = ToyMLP(mid_features=64, num_temporal_layers=2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(300):
        x_0 = make_toy_data("gaussian8", 256, g)
        t = torch.randint(T, (256,), generator=g)
        loss = diffusion.training_losses(net, x_0, t, torch.randn(x_0.shape, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5  # it learned something (untrained: about 1)
    return diffusion, net.eval()


def test_trained_toy_model_against_ddim_all_steps(toy_model):
    diffusion, net = toy_model
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
    reference = sample(diffusion, net, make_sampler(diffusion, "ddim", steps=T), x_T)
    err_ddim = _rms(sample(diffusion, net, make_sampler(diffusion, "ddim", steps=STEPS,
                                                        skip_schedule="linspace"), x_T),
                    reference)
    err_dpm = _rms(sample(diffusion, net, make_sampler(
        diffusion, "dpm-solver++", steps=STEPS, skip_schedule="linspace"), x_T), reference)
    assert err_dpm < 0.7 * err_ddim, (err_dpm, err_ddim)  # the same step spacing
    err_default = _rms(sample(diffusion, net, make_sampler(diffusion, "dpm-solver++",
                                                           steps=STEPS), x_T), reference)
    assert err_default < err_ddim, (err_default, err_ddim)  # its default spacing
    assert err_ddim < 0.3  # both approach the T-step result
