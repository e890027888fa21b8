"""The newer samplers against diffusers' schedulers in float64, on the same network (an exact
Gaussian-data denoiser, O(1) along the whole chain), the same timesteps and the same noise.

diffusers casts its sigmas to float32 in `set_timesteps`; each test replaces them by the float64
sigmas of our table at diffusers' own timesteps, so the two chains do the same arithmetic
in float64 and agree to ~1e-10. Documented differences:
- Heun and Euler ancestral: diffusers' `init_noise_sigma` for the trailing and linspace spacings
  is sigma_max, an approximation of the exact start sqrt(sigma_max^2 + 1) x_T (x_T ~ N(0, I) in
  VP space); the diffusers chains here start from the exact one.
- DPMSolverMultistepScheduler and EulerAncestralDiscreteScheduler "upcast" the sample to
  float32 in `step`, a downcast for float64 samples (errors ~1e-7); the `float64_steps` fixture
  makes that cast float64 in those two modules, for these tests only.
- v models (prediction_type="v_prediction") are read through `GaussianDiffusion.predict` by
  every sampler, and match diffusers' own v conversion (VP or sigma space) to the same 1e-10.
- Karras spacing: diffusers evaluates the network at the rounded timestep but keeps the
  unrounded Karras sigma in the update; ddpmkit uses the table's sigma at that timestep, so the
  network always sees the noise level it is evaluated at. The timesteps themselves agree.
"""

import numpy as np
import pytest
import torch
from test_diffusion_diffusers import MEAN_TO_PREDICTION, GaussianData, _x_T

from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule, make_sampler, sample
from ddpmkit.diffusion.schedules import karras_timesteps
from ddpmkit.diffusion.sigma_samplers import EulerAncestralSampler, HeunSampler

diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

T = 1000
ATOL = 1e-10


class _Float32IsFloat64:
    """`torch` for a diffusers scheduler module, with torch.float32 meaning float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.fixture
def float64_steps(monkeypatch):
    from diffusers.schedulers import (
        scheduling_dpmsolver_multistep,
        scheduling_euler_ancestral_discrete,
    )

    for module in (scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "torch", _Float32IsFloat64())


def _diffusion(mean_type="eps"):
    return GaussianDiffusion(get_beta_schedule("linear", T), mean_type, "fixed-small", "mse",
                             decoder="continuous")


def _sigmas(diffusion, timesteps):
    """sqrt((1 - alphas_bar) / alphas_bar) at the timesteps, then 0 (clean data): float64."""
    ab = diffusion.alphas_bar[np.asarray(timesteps, dtype=np.int64)]
    return torch.from_numpy(np.append(np.sqrt((1 - ab) / ab), 0.0))


def _multistep_chain(scheduler, fn, x_T, noises=None):
    """A VP multistep scheduler's chain (DPMSolverMultistep, UniPC): x is the VP sample."""
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        out = fn(x, torch.full((x.shape[0],), int(t)))
        kwargs = {} if noises is None else {"variance_noise": noises[i]}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def _sigma_chain(scheduler, fn, x_T, sigma_0, generator=None):
    """A sigma-space scheduler's chain (Heun, Euler ancestral) from the exact start
    sqrt(sigma_0^2 + 1) x_T; its last sigma is 0, so the result is in data space."""
    x = x_T * (sigma_0 ** 2 + 1) ** 0.5
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = fn(model_input, torch.full((x.shape[0],), int(t)))
        kwargs = {} if generator is None else {"generator": generator}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def _check(ours, theirs, x_T):
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    assert ours.dtype == torch.float64 and (ours - x_T).abs().max() > 0.1  # the chain moved


# ---- DPM-Solver++ 3M and 2M SDE -----------------------------------------------------------------
def _dpm_scheduler(diffusion, mean_type, **config):
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=diffusion.betas, final_sigmas_type="zero",
        lower_order_final=True, timestep_spacing="linspace",
        prediction_type=MEAN_TO_PREDICTION[mean_type], **config)


@pytest.mark.parametrize("spacing", ["linspace", "karras"])
@pytest.mark.parametrize("mean_type", ["eps", "x_0", "v"])
@pytest.mark.parametrize("S", [5, 10, 20])
@pytest.mark.parametrize("name,order", [("dpm-solver++3m", 3), ("dpm-solver++", 2)])
def test_dpm_solver_pp_matches_diffusers_orders_2_and_3(name, order, S, mean_type, spacing,
                                                        float64_steps):
    """S = 5, 10: below 15 steps the second-to-last step is second order (both); S = 20: third
    order up to the last step. karras: our timesteps are diffusers' (use_karras_sigmas); the
    sigmas there are the table's (see the module docstring)."""
    ours = _diffusion(mean_type)
    sampler = make_sampler(ours, name, steps=S, skip_schedule=spacing)
    theirs = _dpm_scheduler(ours, mean_type, algorithm_type="dpmsolver++", solver_order=order,
                            use_karras_sigmas=spacing == "karras")
    theirs.set_timesteps(S)
    np.testing.assert_array_equal(theirs.timesteps.numpy(), sampler.timesteps)
    theirs.sigmas = _sigmas(ours, sampler.timesteps)
    fn = GaussianData(ours.alphas_bar)(mean_type)
    x_T = _x_T((3, 2, 2, 2))
    _check(sample(ours, fn, sampler, x_T, clip_denoised=False),
           _multistep_chain(theirs, fn, x_T), x_T)


@pytest.mark.parametrize("mean_type", ["eps", "x_0", "v"])
@pytest.mark.parametrize("S", [5, 20])
def test_dpm_solver_pp_2m_sde_matches_diffusers_sde_dpmsolver_pp(S, mean_type, float64_steps):
    ours = _diffusion(mean_type)
    sampler = make_sampler(ours, "dpm-solver++2m-sde", steps=S, skip_schedule="linspace")
    theirs = _dpm_scheduler(ours, mean_type, algorithm_type="sde-dpmsolver++", solver_order=2)
    theirs.set_timesteps(S)
    np.testing.assert_array_equal(theirs.timesteps.numpy(), sampler.timesteps)
    theirs.sigmas = _sigmas(ours, sampler.timesteps)
    fn = GaussianData(ours.alphas_bar)(mean_type)
    x_T = _x_T((3, 2, 2, 2))
    noises = [_x_T(x_T.shape, seed=500 + i) for i in range(S)]
    used = []

    def noise_fn(i, x):
        used.append(i)
        return noises[i]

    mine = sample(ours, fn, sampler, x_T, clip_denoised=False, noise_fn=noise_fn)
    assert used == list(range(S - 1))  # no noise on the last step (sigma = 0 there)
    _check(mine, _multistep_chain(theirs, fn, x_T, noises), x_T)
    ode = sample(ours, fn, make_sampler(ours, "dpm-solver++", steps=S, skip_schedule="linspace"),
                 x_T, clip_denoised=False)
    assert (mine - ode).abs().max() > 1e-3  # the noise mattered


# ---- UniPC --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean_type", ["eps", "x_0", "v"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("S", [3, 6, 20])
def test_unipc_matches_diffusers_bh2(S, order, mean_type):
    ours = _diffusion(mean_type)
    sampler = make_sampler(ours, f"unipc{order}", steps=S, skip_schedule="linspace")
    assert len(sampler.timesteps) == S  # the corrector costs no evaluation
    theirs = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=T, trained_betas=ours.betas, solver_order=order, solver_type="bh2",
        predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
        timestep_spacing="linspace", prediction_type=MEAN_TO_PREDICTION[mean_type])
    theirs.set_timesteps(S)
    np.testing.assert_array_equal(theirs.timesteps.numpy(), sampler.timesteps)
    theirs.sigmas = _sigmas(ours, sampler.timesteps)
    fn = GaussianData(ours.alphas_bar)(mean_type)
    x_T = _x_T((3, 2, 2, 2))
    _check(sample(ours, fn, sampler, x_T, clip_denoised=False),
           _multistep_chain(theirs, fn, x_T), x_T)


# ---- Heun and Euler ancestral -------------------------------------------------------------------
def _points(scheduler):
    """The distinct timesteps of a (possibly interleaved) diffusers list, in order."""
    t = scheduler.timesteps.numpy().astype(np.int64)
    return np.array(list(dict.fromkeys(t.tolist())), dtype=np.int64)


@pytest.mark.parametrize("spacing,S", [("trailing", 1), ("trailing", 4), ("leading", 4),
                                       ("trailing", 10), ("leading", 10)])
@pytest.mark.parametrize("mean_type", ["eps", "x_0", "v"])
def test_heun_matches_heun_discrete_scheduler(S, mean_type, spacing):
    ours = _diffusion(mean_type)
    theirs = diffusers.HeunDiscreteScheduler(
        num_train_timesteps=T, trained_betas=ours.betas, timestep_spacing=spacing,
        prediction_type=MEAN_TO_PREDICTION[mean_type])
    theirs.set_timesteps(S)
    points = _points(theirs)
    sampler = HeunSampler(T, S, points=points)
    # every evaluation of theirs, in order: 2 per step, 1 on the last (Euler) step
    np.testing.assert_array_equal(theirs.timesteps.numpy().astype(np.int64), sampler.timesteps)
    assert len(sampler.timesteps) == 2 * S - 1
    sig = _sigmas(ours, points)
    theirs.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
    fn = GaussianData(ours.alphas_bar)(mean_type)
    x_T = _x_T((3, 2, 2, 2))
    _check(sample(ours, fn, sampler, x_T, clip_denoised=False),
           _sigma_chain(theirs, fn, x_T, float(sig[0])), x_T)


@pytest.mark.parametrize("spacing,S", [("trailing", 1), ("trailing", 5), ("leading", 5),
                                       ("trailing", 20), ("leading", 20)])
@pytest.mark.parametrize("mean_type", ["eps", "v"])
def test_euler_ancestral_matches_euler_ancestral_discrete_scheduler(S, spacing, mean_type,
                                                                    float64_steps):
    """Both draw one normal tensor per step from one generator (diffusers also on the last
    step, after ours has finished). diffusers has no x_0 prediction here; ours runs every mean
    type through GaussianDiffusion's conversion to x_0."""
    ours = _diffusion(mean_type)
    theirs = diffusers.EulerAncestralDiscreteScheduler(
        num_train_timesteps=T, trained_betas=ours.betas, timestep_spacing=spacing,
        prediction_type=MEAN_TO_PREDICTION[mean_type])
    theirs.set_timesteps(S)
    points = _points(theirs)
    sampler = EulerAncestralSampler(T, S, points=points)
    theirs.sigmas = _sigmas(ours, points)
    fn = GaussianData(ours.alphas_bar)(mean_type)
    x_T = _x_T((3, 2, 2, 2))
    mine = sample(ours, fn, sampler, x_T, clip_denoised=False,
                  generator=torch.Generator().manual_seed(9))
    expected = _sigma_chain(theirs, fn, x_T, float(_sigmas(ours, points)[0]),
                            generator=torch.Generator().manual_seed(9))
    _check(mine, expected, x_T)


# ---- Karras spacing -----------------------------------------------------------------------------
@pytest.mark.parametrize("S", [5, 10, 20, 25])
def test_karras_timesteps_are_diffusers_rounded_karras_timesteps(S):
    d = _diffusion()
    theirs = _dpm_scheduler(d, "eps", algorithm_type="dpmsolver++", use_karras_sigmas=True)
    theirs.alphas_cumprod = torch.from_numpy(d.alphas_bar.copy())  # the float64 table
    theirs.set_timesteps(S)
    np.testing.assert_array_equal(karras_timesteps(d.alphas_bar, S)[::-1],
                                  theirs.timesteps.numpy())


def test_karras_timesteps_follow_eq_5():
    """sigma at the chosen timesteps is within half a step of Karras et al. eq. 5's sigma_i,
    with distinct steps for every S, including more than T has room for near t = 0."""
    d = GaussianDiffusion(get_beta_schedule("linear", 50), decoder="continuous")
    log_sigma = 0.5 * np.log((1 - d.alphas_bar) / d.alphas_bar)
    for S in range(1, 51):
        steps = karras_timesteps(d.alphas_bar, S)
        assert len(steps) == S and np.all(np.diff(steps) > 0)
        assert steps[-1] == 49 and (S == 1 or steps[0] == 0)
    steps = karras_timesteps(d.alphas_bar, 8)
    s_max, s_min = np.exp(log_sigma[[-1, 0]])
    ramp = np.arange(8) / 7
    ideal = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    t_ideal = np.interp(np.log(ideal), log_sigma, np.arange(50))
    assert np.all(np.abs(steps[::-1] - t_ideal) <= 0.5 + 1e-12)
