"""Cross-checks against diffusers' schedulers (a test-only dependency): same betas, same model
outputs, same noise -> same samples.

diffusers keeps its tables in float32; where a comparison is about the formulas, its
`alphas_cumprod` is replaced by our float64 table so the two can agree to ~1e-10. One run per
scheduler also uses diffusers' own float32 tables, at float32 tolerance.

Known, documented differences:
- `fixed_large` in diffusers is beta_t at every t; ours (as the official DDPM code) replaces the
  first entry by beta~_1. No noise is added at t = 0, so samples agree; the variances differ at
  t = 0 only (checked below).
- diffusers' `learned` variance is a variance; ours is a log-variance.
- DDIMScheduler derives the next step as t - T // num_inference_steps. Here our default
  ("linear", the reference's spacing, which is diffusers' "leading" when S divides T) is
  compared with it; test_diffusion_parity.py runs every diffusers spacing with the sampler
  switches that reproduce DDIMPipeline.
"""

import numpy as np
import pytest
import torch

from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule, make_sampler, sample

diffusers = pytest.importorskip("diffusers")

# diffusers' DPMSolverMultistepScheduler calls np.array on a tensor with copy=False (numpy 2)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

MEAN_TO_PREDICTION = {"eps": "epsilon", "x_0": "sample", "v": "v_prediction"}




def _fn(T, scale=1.0):
    """A smooth, t-dependent stand-in for a network (eps or x_0 output alike)."""
    def fn(x, t):
        tt = (t.to(x.dtype) / T).view(-1, *([1] * (x.ndim - 1)))
        return scale * (0.6 * torch.tanh(x) + 0.3 * tt - 0.1 * x * tt)
    return fn


class GaussianData:
    """Exact denoisers for data x_0 ~ N(mu, s^2 I): keeps long chains O(1)."""

    def __init__(self, alphas_bar, mu=0.3, s=0.5):
        self.ab, self.mu, self.s = torch.from_numpy(alphas_bar.copy()), mu, s

    def __call__(self, mean_type):
        def fn(x, t):
            a = self.ab[t].sqrt().view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
            b2 = 1 - a ** 2
            eps = b2.sqrt() * (x - a * self.mu) / (a ** 2 * self.s ** 2 + b2)  # E[eps | x_t]
            x_0 = self.mu + a * self.s ** 2 * (x - a * self.mu) / (a ** 2 * self.s ** 2 + b2)
            return {"eps": eps, "x_0": x_0, "v": a * eps - b2.sqrt() * x_0}[mean_type]
        return fn


def _x_T(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _use_float64_tables(scheduler, diffusion):
    scheduler.alphas_cumprod = torch.from_numpy(diffusion.alphas_bar.copy())


# ---- DDPM --------------------------------------------------------------------------------------
def _ddpm_pair(T, mean_type, var_type, clip):
    betas = get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2)
    ours = GaussianDiffusion(betas, mean_type, var_type, "mse",
                             decoder="discretized" if clip else "continuous")
    theirs = diffusers.DDPMScheduler(
        num_train_timesteps=T, trained_betas=betas, variance_type=var_type.replace("-", "_"),
        clip_sample=clip, prediction_type=MEAN_TO_PREDICTION[mean_type])
    return ours, theirs


def _ddpm_chain_diffusers(scheduler, fn, x_T, seed):
    g = torch.Generator().manual_seed(seed)
    x, preds = x_T, []
    for t in range(scheduler.config.num_train_timesteps - 1, -1, -1):
        out = fn(x, torch.full((x.shape[0],), t))
        step = scheduler.step(out, t, x, generator=g)
        x = step.prev_sample
        preds.append(step.pred_original_sample)
    return x, preds


def test_diffusers_tables_are_ours_to_float32():
    _, theirs = _ddpm_pair(50, "eps", "fixed-small", False)
    ours = GaussianDiffusion(get_beta_schedule("linear", 50, beta_start=1e-3, beta_end=0.2))
    np.testing.assert_allclose(theirs.alphas_cumprod.numpy(), ours.alphas_bar, rtol=2e-6)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("mean_type", ["eps", "x_0", "v"])
@pytest.mark.parametrize("var_type", ["fixed-small", "fixed-large"])
def test_ddpm_chain_matches_ddpm_scheduler(var_type, mean_type, clip):
    T = 50
    ours, theirs = _ddpm_pair(T, mean_type, var_type, clip)
    _use_float64_tables(theirs, ours)
    fn = _fn(T, scale=2.5 if mean_type == "x_0" else 1.0)  # wide enough to be clipped
    x_T = 1.5 * _x_T((2, 3, 4, 4))
    preds = []
    x_0 = sample(ours, fn, make_sampler(ours, "ddpm"), x_T, clip_denoised=clip,
                 generator=torch.Generator().manual_seed(7),
                 callback=lambda info: preds.append(info.pred_x_0))
    expected, their_preds = _ddpm_chain_diffusers(theirs, fn, x_T, seed=7)
    torch.testing.assert_close(x_0, expected, rtol=0, atol=1e-10)
    for mine, theirs_pred in zip(preds, their_preds):
        torch.testing.assert_close(mine, theirs_pred, rtol=0, atol=1e-9)
    if clip:
        assert max(p.abs().max() for p in preds) == 1.0  # clipping was exercised


@pytest.mark.parametrize("var_type", ["fixed-small", "fixed-large"])
def test_ddpm_chain_matches_ddpm_scheduler_in_float32(var_type):
    """diffusers' own float32 tables, float32 samples: float32 agreement."""
    T = 50
    ours, theirs = _ddpm_pair(T, "eps", var_type, False)
    fn = _fn(T)
    x_T = _x_T((2, 2, 3, 3), dtype=torch.float32)
    x_0 = sample(ours, fn, make_sampler(ours, "ddpm"), x_T, clip_denoised=False,
                 generator=torch.Generator().manual_seed(3))
    expected, _ = _ddpm_chain_diffusers(theirs, fn, x_T, seed=3)
    assert x_0.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(x_0, expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("var_type", ["fixed-small", "fixed-large"])
def test_ddpm_variances_match_except_fixed_large_at_t_0(var_type):
    T = 50
    ours, theirs = _ddpm_pair(T, "eps", var_type, False)
    _use_float64_tables(theirs, ours)
    x = torch.zeros(T, 1, dtype=torch.float64)
    p = ours.p_mean_var(x, x, torch.arange(T), clip_denoised=False)
    their_var = torch.stack([theirs._get_variance(t) for t in range(T)]).to(torch.float64)
    torch.testing.assert_close(p.var[1:, 0], their_var[1:], rtol=1e-12, atol=0)
    if var_type == "fixed-small":
        assert p.var[0, 0] == 0 and their_var[0] <= 1e-20  # diffusers clamps 0 to 1e-20
    else:
        # diffusers: beta_0; ours: beta~_1 (official DDPM code). Only the likelihood sees it.
        assert their_var[0].item() == pytest.approx(ours.betas[0], rel=1e-6)
        assert p.var[0, 0].item() == pytest.approx(ours.posterior_var[1], rel=1e-12)


def test_learned_variance_step_matches_ddpm_scheduler():
    """Ours outputs log-variance, diffusers' `learned` a variance: exp() maps one to the other."""
    T = 50
    betas = get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2)
    ours = GaussianDiffusion(betas, "eps", "learned", "kl", decoder="continuous")
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=betas,
                                     variance_type="learned", clip_sample=False)
    _use_float64_tables(theirs, ours)
    sampler = make_sampler(ours, "ddpm")
    x_t = _x_T((2, 3, 2, 2))
    for i, t in enumerate(sampler.timesteps):
        eps = _fn(T)(x_t, torch.full((2,), int(t)))
        logvar = -3.0 + 0.5 * torch.sin(x_t) + 0.02 * t
        noise = _x_T(x_t.shape, seed=100 + i)
        mine, _ = sampler.step(ours, torch.cat([eps, logvar], 1), x_t, i,
                               noise if t > 0 else None, False, None)
        g = torch.Generator().manual_seed(100 + i)
        expected = theirs.step(torch.cat([eps, logvar.exp()], 1), int(t), x_t,
                               generator=g).prev_sample
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-10)


# ---- DDIM --------------------------------------------------------------------------------------
def _ddim_scheduler(diffusion, mean_type="eps", clip=False):
    theirs = diffusers.DDIMScheduler(
        num_train_timesteps=diffusion.T, trained_betas=diffusion.betas, clip_sample=clip,
        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
        prediction_type=MEAN_TO_PREDICTION[mean_type])
    _use_float64_tables(theirs, diffusion)
    return theirs


def _ddim_chain_diffusers(scheduler, fn, x_T, timesteps, eta, noises, clip):
    x = x_T
    for i, t in enumerate(timesteps):
        out = fn(x, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(out, int(t), x, eta=eta, variance_noise=noises[i],
                           use_clipped_model_output=clip).prev_sample
    return x


def _noises(n, shape):
    return [_x_T(shape, seed=1000 + i) for i in range(n)]


@pytest.mark.parametrize("mean_type,clip", [("eps", False), ("x_0", False), ("eps", True),
                                            ("v", False), ("v", True)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_on_our_subsequence_matches_ddim_scheduler(eta, mean_type, clip):
    """Ours T=1000, S=10 linear is 0, 100, ..., 900; diffusers steps to t - T // S, the same
    stride. clip: diffusers re-derives eps from the clipped x_0 only with
    use_clipped_model_output=True, which is what ours does by default."""
    T, S = 1000, 10
    ours = GaussianDiffusion(get_beta_schedule("linear", T), mean_type, "fixed-small", "mse",
                             decoder="discretized" if clip else "continuous")
    sampler = make_sampler(ours, "ddim", steps=S, eta=eta)
    theirs = _ddim_scheduler(ours, mean_type, clip)
    theirs.set_timesteps(S)
    strides = -np.diff(sampler.timesteps)
    assert np.all(strides == T // theirs.num_inference_steps) and sampler.timesteps[-1] == 0
    fn = _fn(T)
    x_T = 1.5 * _x_T((2, 3, 4, 4))
    noises = _noises(S, x_T.shape)
    x_0 = sample(ours, fn, sampler, x_T, clip_denoised=clip, noise_fn=lambda i, x: noises[i])
    expected = _ddim_chain_diffusers(theirs, fn, x_T, sampler.timesteps, eta, noises, clip)
    torch.testing.assert_close(x_0, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_on_diffusers_leading_subsequence_matches(eta):
    """diffusers' own "leading" sub-sequence (900, 800, ..., 0), run by our sampler."""
    T, S = 1000, 10
    ours = GaussianDiffusion(get_beta_schedule("linear", T), "eps", "fixed-small", "mse",
                             decoder="continuous")
    theirs = _ddim_scheduler(ours)
    theirs.set_timesteps(S)
    leading = theirs.timesteps.numpy()
    np.testing.assert_array_equal(leading, np.arange(900, -1, -100))
    sampler = make_sampler(ours, "ddim", steps=S, eta=eta)
    np.testing.assert_array_equal(sampler.timesteps, leading)  # linear: the reference's steps
    np.testing.assert_array_equal(
        make_sampler(ours, "ddim", steps=S, skip_schedule="leading").timesteps, leading)
    fn = _fn(T)
    x_T = _x_T((3, 5))
    noises = _noises(S, x_T.shape)
    x_0 = sample(ours, fn, sampler, x_T, clip_denoised=False, noise_fn=lambda i, x: noises[i])
    expected = _ddim_chain_diffusers(theirs, fn, x_T, leading, eta, noises, clip=False)
    torch.testing.assert_close(x_0, expected, rtol=0, atol=1e-10)


def test_ddim_in_float32_matches_ddim_scheduler():
    T, S = 1000, 10
    ours = GaussianDiffusion(get_beta_schedule("linear", T), "eps", "fixed-small", "mse",
                             decoder="continuous")
    theirs = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=ours.betas,
                                     clip_sample=False, set_alpha_to_one=True)
    theirs.set_timesteps(S)
    sampler = make_sampler(ours, "ddim", steps=S, eta=0.0)
    fn = _fn(T)
    x_T = _x_T((3, 5), dtype=torch.float32)
    x_0 = sample(ours, fn, sampler, x_T, clip_denoised=False)
    expected = _ddim_chain_diffusers(theirs, fn, x_T, sampler.timesteps, 0.0, [None] * S, False)
    # Outputs reach a few hundred (the stand-in network is not a denoiser), where one float32
    # ulp is 3e-5: compare relatively, at a few ulps per step (measured up to 4.7e-7).
    torch.testing.assert_close(x_0, expected, rtol=2e-6, atol=1e-6)


# ---- DPM-Solver++(2M) ---------------------------------------------------------------------------
@pytest.mark.parametrize("mean_type", ["eps", "x_0", "v"])
@pytest.mark.parametrize("S", [10, 20, 25, 30])
def test_dpm_solver_pp_matches_dpm_solver_multistep_scheduler(S, mean_type):
    """Ours evaluates ddim_timesteps(T, S + 1, "linspace") without 0, descending: diffusers'
    "linspace" spacing, rounded half to even as diffusers does (S = 30 at T = 1000 has ties).
    diffusers computes the update in float32."""
    T = 1000
    ours = GaussianDiffusion(get_beta_schedule("linear", T), mean_type, "fixed-small", "mse",
                             decoder="continuous")
    sampler = make_sampler(ours, "dpm-solver++", steps=S, skip_schedule="linspace")
    theirs = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=ours.betas, algorithm_type="dpmsolver++",
        solver_order=2, final_sigmas_type="zero", lower_order_final=True,
        timestep_spacing="linspace", prediction_type=MEAN_TO_PREDICTION[mean_type])
    theirs.set_timesteps(S)
    np.testing.assert_array_equal(theirs.timesteps.numpy(), sampler.timesteps)

    fn = GaussianData(ours.alphas_bar)(mean_type)
    x_T = _x_T((3, 2, 2, 2), dtype=torch.float32)
    x_0 = sample(ours, fn, sampler, x_T, clip_denoised=False)
    x = x_T
    for t in theirs.timesteps:
        x = theirs.step(fn(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
    torch.testing.assert_close(x_0, x, rtol=0, atol=2e-5)  # measured <= 1.6e-6 (float32)
    assert (x_0 - x_T).abs().max() > 0.1  # the chain moved
