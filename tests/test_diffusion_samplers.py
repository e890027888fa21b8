"""Samplers against float64 references and an analytic denoiser.

References (written here, sharing no code with the library): DDPM Algorithm 2 with the eq. 7
posterior; DDIM eq. 12 with sigma_t(eta) from eq. 16 (Song et al. 2021); DPM-Solver++(2M),
Algorithm 2 of Lu et al. 2022. The analytic denoiser: for data x_0 ~ N(mu, s^2 I) and
x_t = a x_0 + b eps (a = sqrt(alphas_bar_t), b = sqrt(1 - alphas_bar_t)),
E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2), and the probability-flow ODE maps x_T to
mu + s (x_T - a_T mu) / sqrt(a_T^2 s^2 + b_T^2).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpmkit.diffusion import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    GaussianDiffusion,
    ddim_timesteps,
    get_beta_schedule,
    make_sampler,
    sample,
    solver_timesteps,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE_NAMES = ("linear", "quad", "warmup10", "warmup50", "jsd", "cosine")
MEAN_TYPES = ("eps", "x_0", "mean")
VAR_TYPES = ("fixed-small", "fixed-large", "learned")
VALID_COMBOS = [(m, v, lo) for m in MEAN_TYPES for v in VAR_TYPES for lo in ("mse", "kl")
                if not (lo == "mse" and v == "learned")]
PROPERTY = settings(max_examples=50, deadline=None)




# ---- float64 references ----------------------------------------------------------------------------
class Ref:
    def __init__(self, betas):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.ab = np.cumprod(1.0 - self.betas)
        self.ab_prev = np.concatenate([[1.0], self.ab[:-1]])
        self.post_var = self.betas * (1.0 - self.ab_prev) / (1.0 - self.ab)  # eq. 7

    def alpha_bar(self, t):
        return 1.0 if t < 0 else self.ab[t]  # "t = -1" is clean data

    def pred_x_0(self, mean_type, out, x_t, t, clip):
        ab = self.ab[t]
        if mean_type == "eps":
            x_0 = (x_t - math.sqrt(1 - ab) * out) / math.sqrt(ab)
        elif mean_type == "x_0":
            x_0 = out
        else:  # eq. 7 solved for x_0
            c1 = self.betas[t] * math.sqrt(self.ab_prev[t]) / (1 - ab)
            c2 = (1 - self.ab_prev[t]) * math.sqrt(1 - self.betas[t]) / (1 - ab)
            x_0 = (out - c2 * x_t) / c1
        return np.clip(x_0, -1, 1) if clip else x_0

    def ddpm_step(self, x_0, x_t, t, std, noise):
        """Algorithm 2: x_{t-1} = mu~_t(x_t, x_0) + std z, no noise at t = 0."""
        c1 = self.betas[t] * math.sqrt(self.ab_prev[t]) / (1 - self.ab[t])
        c2 = (1 - self.ab_prev[t]) * math.sqrt(1 - self.betas[t]) / (1 - self.ab[t])
        mean = c1 * x_0 + c2 * x_t
        return mean if t == 0 else mean + std * noise

    def ddim_step(self, x_0, x_t, t, t_next, eta, noise):
        """DDIM eq. 12 with sigma from eq. 16, eps implied by (x_t, x_0)."""
        a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
        eps = (x_t - math.sqrt(a) * x_0) / math.sqrt(1 - a)
        sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        return math.sqrt(a_next) * x_0 + math.sqrt(1 - a_next - sigma ** 2) * eps + sigma * noise


def ref_dpm_solver_pp_2m(ref, data_pred, x_T, timesteps):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) over descending `timesteps`, then a
    first-order step to sigma = 0 (lambda = +inf), which lands on the data prediction."""
    def lam(t):
        return 0.5 * math.log(ref.ab[t] / (1 - ref.ab[t]))  # log(alpha_t / sigma_t)

    x, prev_x_0, prev_h = x_T, None, None
    for i, t in enumerate(timesteps):
        x_0 = data_pred(x, t)
        if i == len(timesteps) - 1:
            return x_0
        t_next = timesteps[i + 1]
        h = lam(t_next) - lam(t)
        if prev_x_0 is None:
            D = x_0
        else:
            r = prev_h / h
            D = (1 + 1 / (2 * r)) * x_0 - 1 / (2 * r) * prev_x_0
        sigma, sigma_next = math.sqrt(1 - ref.ab[t]), math.sqrt(1 - ref.ab[t_next])
        x = sigma_next / sigma * x - math.sqrt(ref.ab[t_next]) * (math.exp(-h) - 1) * D
        prev_x_0, prev_h = x_0, h
    raise AssertionError("unreachable")


class GaussianData:
    """x_0 ~ N(mu, s^2 I) (mu: (D,)): exact denoisers for every parameterization."""

    def __init__(self, mu, s, alphas_bar):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.s = float(s)
        self.ab = torch.as_tensor(alphas_bar, dtype=torch.float64)
        self.ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.ab[:-1]])

    def _ab(self, t):
        a = self.ab[t].sqrt().view(-1, 1)
        return a, (1 - a ** 2).sqrt()

    def eps(self, x, t):  # E[eps | x_t]
        a, b = self._ab(t)
        return b * (x - a * self.mu) / (a ** 2 * self.s ** 2 + b ** 2)

    def x_0(self, x, t):  # E[x_0 | x_t]
        a, b = self._ab(t)
        return self.mu + a * self.s ** 2 * (x - a * self.mu) / (a ** 2 * self.s ** 2 + b ** 2)

    def mean(self, x, t):  # E[x_{t-1} | x_t] = mu~_t(x_t, E[x_0 | x_t])
        ab, ab_prev = self.ab[t].view(-1, 1), self.ab_prev[t].view(-1, 1)
        beta = 1 - ab / ab_prev
        c1 = beta * ab_prev.sqrt() / (1 - ab)
        c2 = (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)
        return c1 * self.x_0(x, t) + c2 * x

    def fn(self, mean_type):
        return {"eps": self.eps, "x_0": self.x_0, "mean": self.mean}[mean_type]

    def marginal(self, T_index):
        a2 = float(self.ab[T_index])
        return math.sqrt(a2) * self.mu, math.sqrt(a2 * self.s ** 2 + 1 - a2)

    def ode_solution(self, x_T):
        a2 = float(self.ab[-1])
        return self.mu + self.s * (x_T - math.sqrt(a2) * self.mu) / math.sqrt(
            a2 * self.s ** 2 + 1 - a2)


def _smooth_fn(T, learned=False):
    def fn(x, t):
        tt = (t.to(x.dtype) / T).view(-1, *([1] * (x.ndim - 1)))
        out = 0.6 * torch.tanh(x) + 0.3 * tt - 0.1 * x * tt
        if learned:
            out = torch.cat([out, -4.0 + 2.0 * tt + 0.3 * torch.sin(x)], dim=1)
        return out
    return fn


def _rms(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- single steps against the references ----------------------------------------------------------
@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_ddpm_step_is_algorithm_2(mean_type, var_type):
    T = 30
    betas = get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2)
    ref = Ref(betas)
    d = GaussianDiffusion(betas, mean_type, var_type, "kl", decoder="continuous")
    sampler = make_sampler(d, "ddpm")
    assert isinstance(sampler, DDPMSampler)
    np.testing.assert_array_equal(sampler.timesteps, np.arange(T - 1, -1, -1))
    fn = _smooth_fn(T, learned=var_type == "learned")
    fixed_large = np.concatenate([[ref.post_var[1]], ref.betas[1:]])
    for i, t in enumerate(sampler.timesteps):
        x_t, noise = _randn(2, 3, seed=i), _randn(2, 3, seed=100 + i)
        out = fn(x_t, torch.full((2,), int(t)))
        x, pred_x_0 = sampler.step(d, out, x_t, i, noise if t > 0 else None, False, None)
        mean_out = out[:, :3].numpy()
        x_0 = ref.pred_x_0(mean_type, mean_out, x_t.numpy(), t, clip=False)
        if var_type == "learned":
            std = np.exp(0.5 * out[:, 3:].numpy())
        else:
            std = math.sqrt((ref.post_var if var_type == "fixed-small" else fixed_large)[t])
        expected = ref.ddpm_step(x_0, x_t.numpy(), t, std, noise.numpy())
        tol = 1e-10 / math.sqrt(ref.ab[t]) * (100 if mean_type == "mean" else 1)
        np.testing.assert_allclose(pred_x_0.numpy(), x_0, rtol=0, atol=tol)
        np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=tol)
        assert sampler.needs_noise(i) == (t > 0)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("skip", ["linear", "quadratic", "linspace", "leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
def test_ddim_step_is_eq_12_with_sigma_from_eq_16(eta, skip, clip):
    T, S = 50, 7
    betas = get_beta_schedule("linear", T)
    ref = Ref(betas)
    d = GaussianDiffusion(betas, "eps", "fixed-large", "mse")
    sampler = make_sampler(d, "ddim", steps=S, eta=eta, skip_schedule=skip)
    assert isinstance(sampler, DDIMSampler)
    steps = sampler.timesteps
    np.testing.assert_array_equal(steps, ddim_timesteps(T, S, skip)[::-1])
    fn = _smooth_fn(T)
    for i, t in enumerate(steps):
        t_next = int(steps[i + 1]) if i + 1 < S else -1
        x_t, noise = 2 * _randn(3, 2, 2, seed=i), _randn(3, 2, 2, seed=50 + i)
        out = 3 * fn(x_t, torch.full((3,), int(t)))
        x, _ = sampler.step(d, out, x_t, i, noise, clip, None)
        x_0 = ref.pred_x_0("eps", out.numpy(), x_t.numpy(), t, clip)
        expected = ref.ddim_step(x_0, x_t.numpy(), t, t_next, eta, noise.numpy())
        np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-10 / math.sqrt(ref.ab[t]))
        assert sampler.needs_noise(i) == (eta > 0 and t_next >= 0)


@pytest.mark.parametrize("skip", ["linspace", "quadratic"])
@pytest.mark.parametrize("S", [1, 2, 5, 12, 49])
def test_dpm_solver_pp_2m_is_algorithm_2(S, skip):
    T = 50
    betas = get_beta_schedule("linear", T)
    ref = Ref(betas)
    d = GaussianDiffusion(betas, "eps", "fixed-small", "mse", decoder="continuous")
    sampler = make_sampler(d, "dpm-solver++", steps=S, skip_schedule=skip)
    assert isinstance(sampler, DPMSolverPPSampler)
    # S evaluations at the S + 1 sub-sequence points but t = 0, from the top down; its
    # quadratic spacing spans all of [0, T-1] (time-quadratic), not DDIM's [0, 0.8 T]
    expected_steps = solver_timesteps(T, S, skip)[1:][::-1]
    np.testing.assert_array_equal(sampler.timesteps, expected_steps)
    assert len(sampler.timesteps) == S and sampler.timesteps[0] == T - 1
    fn = _smooth_fn(T)
    x_T = _randn(3, 4, seed=0)

    def data_pred(x, t):
        eps = fn(torch.from_numpy(x), torch.full((3,), int(t))).numpy()
        return (x - math.sqrt(1 - ref.ab[t]) * eps) / math.sqrt(ref.ab[t])

    expected = ref_dpm_solver_pp_2m(ref, data_pred, x_T.numpy(), [int(t) for t in expected_steps])
    x_0 = sample(d, fn, sampler, x_T, clip_denoised=False)
    np.testing.assert_allclose(x_0.numpy(), expected, rtol=0, atol=1e-10)


# ---- properties ------------------------------------------------------------------------------------
@PROPERTY
@given(name=st.sampled_from(SCHEDULE_NAMES), T=st.integers(2, 40),
       shape=st.sampled_from([(2, 3), (3, 1, 2, 2)]), seed=st.integers(0, 2 ** 31 - 1))
def test_ddim_eta_1_on_every_step_is_ddpm_fixed_small(name, T, shape, seed):
    betas = get_beta_schedule(name, T)
    ref = Ref(betas)
    d = GaussianDiffusion(betas, "eps", "fixed-small", "mse", decoder="continuous")
    ddim, ddpm = make_sampler(d, "ddim", steps=T, eta=1.0), make_sampler(d, "ddpm")
    np.testing.assert_array_equal(ddim.timesteps, ddpm.timesteps)
    fn = _smooth_fn(T)
    B = shape[0]
    for i, t in enumerate(ddpm.timesteps):
        x_t = _randn(*shape, seed=seed + i)
        out = fn(x_t, torch.full((B,), int(t)))
        p = d.p_mean_var(out, x_t, torch.full((B,), int(t)), clip_denoised=False)
        mean, _ = ddim.step(d, out, x_t, i, None, False, None)  # the step without its noise
        ones = torch.ones_like(x_t)
        std = ddim.step(d, out, x_t, i, ones, False, None)[0] - mean
        scale = 1e-10 * (1 + x_t.abs().max().item()) / math.sqrt(ref.ab[t])
        torch.testing.assert_close(mean, p.mean, rtol=0, atol=scale)
        expected_var = ref.post_var[t] if t > 0 else 0.0
        torch.testing.assert_close(std ** 2, torch.full_like(std, expected_var), rtol=1e-9,
                                   atol=1e-12)
        assert ddim.needs_noise(i) == ddpm.needs_noise(i)
    # whole chains with the same noise generator
    x_T = _randn(*shape, seed=seed)
    a = sample(d, fn, ddim, x_T, clip_denoised=False, generator=torch.Generator().manual_seed(seed))
    b = sample(d, fn, ddpm, x_T, clip_denoised=False, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * (1 + b.abs().max().item()))


@PROPERTY
@given(name=st.sampled_from(SCHEDULE_NAMES), T=st.integers(2, 60), frac=st.floats(0, 1),
       skip=st.sampled_from(["linear", "quadratic", "linspace", "leading", "trailing"]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_ddim_eta_0_is_deterministic_given_x_T(name, T, frac, skip, seed):
    S = 1 + int(frac * (T - 1))
    d = GaussianDiffusion(get_beta_schedule(name, T), "eps", "fixed-large", "mse")
    sampler = make_sampler(d, "ddim", steps=S, eta=0.0, skip_schedule=skip)
    fn = _smooth_fn(T)
    x_T = _randn(2, 1, 3, 3, seed=seed)
    calls = []

    def noise_fn(i, x):
        calls.append(i)
        return torch.randn_like(x)

    a = sample(d, fn, sampler, x_T, generator=torch.Generator().manual_seed(seed))
    b = sample(d, fn, sampler, x_T, generator=torch.Generator().manual_seed(seed + 1))
    c = sample(d, fn, sampler, x_T, noise_fn=noise_fn)
    assert torch.equal(a, b) and torch.equal(a, c) and calls == []
    assert torch.isfinite(a).all()


def test_stochastic_samplers_do_depend_on_the_noise():
    """The counterpart of the determinism test: eta > 0 and DDPM use their noise."""
    T = 20
    d = GaussianDiffusion(get_beta_schedule("linear", T), "eps", "fixed-large", "mse")
    x_T = _randn(2, 1, 3, 3, seed=0)
    for sampler in (make_sampler(d, "ddim", steps=5, eta=0.5), make_sampler(d, "ddpm")):
        a = sample(d, _smooth_fn(T), sampler, x_T, generator=torch.Generator().manual_seed(1))
        b = sample(d, _smooth_fn(T), sampler, x_T, generator=torch.Generator().manual_seed(2))
        c = sample(d, _smooth_fn(T), sampler, x_T, generator=torch.Generator().manual_seed(1))
        assert not torch.equal(a, b) and torch.equal(a, c)


def test_noise_fn_is_asked_once_per_stochastic_step_with_its_index():
    T = 12
    d = GaussianDiffusion(get_beta_schedule("linear", T), "eps", "fixed-small", "mse")
    calls = []

    def noise_fn(i, x):
        calls.append(i)
        return torch.zeros_like(x)

    fn = _smooth_fn(T)
    x_T = _randn(2, 1, 2, 2, seed=0)
    out = sample(d, fn, make_sampler(d, "ddpm"), x_T, noise_fn=noise_fn)
    assert calls == list(range(T - 1))  # no noise on the final step to t = 0
    calls.clear()
    ddim = sample(d, fn, make_sampler(d, "ddim", steps=T, eta=1.0), x_T, noise_fn=noise_fn)
    assert calls == list(range(T - 1))
    torch.testing.assert_close(out, ddim, rtol=0, atol=1e-10)  # zero noise: the same means


@pytest.mark.parametrize("name,steps", [("ddpm", None), ("ddim", 6), ("dpm-solver++", 6)])
def test_callback_reports_every_step(name, steps):
    T = 15
    d = GaussianDiffusion(get_beta_schedule("linear", T), "eps", "fixed-large", "mse")
    sampler = make_sampler(d, name, steps=steps, eta=0.3)
    infos = []
    x_0 = sample(d, _smooth_fn(T), sampler, _randn(2, 3, 2, 2, seed=0), callback=infos.append,
                 generator=torch.Generator().manual_seed(0))
    assert [info.i for info in infos] == list(range(len(sampler.timesteps)))
    assert [info.t for info in infos] == [int(t) for t in sampler.timesteps]
    assert len(infos) == (T if name == "ddpm" else steps)
    assert torch.equal(infos[-1].x, x_0)
    assert all(info.pred_x_0.shape == x_0.shape for info in infos)
    assert all(info.pred_x_0.abs().max() <= 1 for info in infos)  # images: x_0 clipped


def test_make_sampler_rejects_bad_input():
    d = GaussianDiffusion(get_beta_schedule("linear", 10))
    with pytest.raises(ValueError) as info:
        make_sampler(d, "euler")
    assert all(name in str(info.value) for name in SAMPLERS)
    assert tuple(SAMPLERS[:3]) == ("ddpm", "ddim", "dpm-solver++")
    with pytest.raises(ValueError):
        make_sampler(d, "ddim", steps=5, eta=-0.1)
    with pytest.raises(ValueError):
        make_sampler(d, "ddim", steps=11)
    with pytest.raises(ValueError):
        make_sampler(d, "ddim", steps=5, skip_schedule="cubic")
    with pytest.raises(ValueError):
        make_sampler(d, "dpm-solver++", steps=10)  # at most T - 1: t = 0 is never evaluated
    assert len(make_sampler(d, "ddim").timesteps) == 10
    assert len(make_sampler(d, "dpm-solver++").timesteps) == 9


@pytest.mark.parametrize("name", ["ddim", "dpm-solver++"])
def test_make_sampler_rejects_zero_steps(name):
    d = GaussianDiffusion(get_beta_schedule("linear", 10))
    with pytest.raises(ValueError):
        make_sampler(d, name, steps=0)


@pytest.mark.parametrize("kind", ["linear", "quadratic"])
def test_one_step_ddim_starts_from_the_noisiest_step(kind):
    assert ddim_timesteps(1000, 1, kind).tolist() == [999]


# ---- every combination samples ---------------------------------------------------------------------
@pytest.mark.parametrize("data", ["toy", "images"])
@pytest.mark.parametrize("sampler_name", ["ddpm", "ddim", "dpm-solver++"])
@pytest.mark.parametrize("mean_type,var_type,loss_type", VALID_COMBOS)
def test_every_combination_samples_finite_values(mean_type, var_type, loss_type, sampler_name,
                                                 data):
    T = 10
    torch.manual_seed(0)
    betas = get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2)
    decoder = "continuous" if data == "toy" else "discretized"
    d = GaussianDiffusion(betas, mean_type, var_type, loss_type, decoder=decoder)
    C = 2 if data == "toy" else 3
    if data == "toy":
        net = torch.nn.Linear(C + 1, d.model_out_channels(C))
        x_T = torch.randn(4, C)

        def fn(x, t):
            return net(torch.cat([x, (t.float() / T)[:, None]], dim=1))
    else:
        net = torch.nn.Conv2d(C + 1, d.model_out_channels(C), 1)
        x_T = torch.randn(2, C, 4, 4)

        def fn(x, t):
            tt = (t.float() / T).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
            return net(torch.cat([x, tt], dim=1))

    sampler = make_sampler(d, sampler_name, steps=4, eta=0.5)
    x_0 = sample(d, fn, sampler, x_T, generator=torch.Generator().manual_seed(0))
    assert x_0.shape == x_T.shape and x_0.dtype == torch.float32
    assert torch.isfinite(x_0).all() and not torch.equal(x_0, x_T)
    if data == "images" and (sampler_name != "ddpm" or mean_type != "mean"):
        assert x_0.abs().max() <= 1 + 1e-6  # the last step returns (a mix of) clipped x_0


# ---- the analytic denoiser -------------------------------------------------------------------------
T_ANALYTIC = 1000
MU, S_DATA = [1.0, -0.5, 0.3, 2.0], 0.5


@pytest.fixture(scope="module")
def analytic():
    betas = get_beta_schedule("linear", T_ANALYTIC)
    d = GaussianDiffusion(betas, "eps", "fixed-small", "mse", decoder="continuous")
    data = GaussianData(MU, S_DATA, d.alphas_bar)
    x_T = _randn(256, 4, seed=0)
    ddim_all = sample(d, data.eps, make_sampler(d, "ddim", steps=T_ANALYTIC), x_T,
                      clip_denoised=False)
    return d, data, x_T, ddim_all


def test_ddim_with_all_steps_follows_the_probability_flow_ode(analytic):
    _, data, x_T, ddim_all = analytic
    exact = data.ode_solution(x_T)
    # measured: rms 1.5e-3, max 4.8e-3 (first-order discretization over 1000 steps)
    assert _rms(ddim_all, exact) < 3e-3
    assert (ddim_all - exact).abs().max() < 1e-2
    # the map is affine: the samples' mean and std follow it exactly
    assert _rms(exact.std(0) / x_T.std(0), torch.full((4,), S_DATA, dtype=torch.float64)) < 0.01


@pytest.mark.parametrize("S", [20, 25, 50])
def test_dpm_solver_pp_beats_ddim_at_the_same_number_of_steps(analytic, S):
    d, data, x_T, ddim_all = analytic
    ddim = sample(d, data.eps, make_sampler(d, "ddim", steps=S), x_T, clip_denoised=False)
    dpm = sample(d, data.eps, make_sampler(d, "dpm-solver++", steps=S), x_T, clip_denoised=False)
    err_ddim, err_dpm = _rms(ddim, ddim_all), _rms(dpm, ddim_all)
    # measured rms vs DDIM-1000: S=20 ddim 0.068, dpm 0.021; S=25 0.054 / 0.011;
    # S=50 0.026 / 0.0013
    assert err_dpm < 0.5 * err_ddim


def test_dpm_solver_pp_is_higher_order_than_ddim(analytic):
    """Halving the step: DDIM's error halves (first order); DPM-Solver++(2M)'s falls >= 4x."""
    d, data, x_T, ddim_all = analytic
    errs = {}
    for name in ("ddim", "dpm-solver++"):
        for S in (25, 50):
            sampler = make_sampler(d, name, steps=S, skip_schedule="linspace")
            x = sample(d, data.eps, sampler, x_T, clip_denoised=False)
            errs[name, S] = _rms(x, ddim_all)
    ratio_ddim = errs["ddim", 25] / errs["ddim", 50]
    ratio_dpm = errs["dpm-solver++", 25] / errs["dpm-solver++", 50]
    assert 1.6 < ratio_ddim < 2.6  # measured 2.04
    assert ratio_dpm > 4.0  # measured 8.3


@pytest.mark.parametrize("name,steps", [("ddim", 10), ("dpm-solver++", 10), ("ddpm", None)])
def test_the_three_parameterizations_sample_the_same_chain(analytic, name, steps):
    """Exact eps, x_0 and mean denoisers of the same data drive every sampler identically."""
    _, data, x_T, _ = analytic
    betas = get_beta_schedule("linear", T_ANALYTIC)
    outs = []
    for mean_type in MEAN_TYPES:
        d = GaussianDiffusion(betas, mean_type, "fixed-small", "mse", decoder="continuous")
        outs.append(sample(d, data.fn(mean_type), make_sampler(d, name, steps=steps, eta=0.0),
                           x_T[:16], clip_denoised=False,
                           generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=1e-8)


@pytest.mark.parametrize("var_type", ["fixed-small", "fixed-large"])
def test_ddpm_reproduces_the_data_mean_and_std(var_type):
    """DDPM ancestral sampling with the exact denoiser, from the exact x_T marginal. The output
    is Gaussian with a mean and variance that follow a linear recursion, computed here exactly;
    the samples must match it statistically, and it must be close to (mu, s)."""
    T, N = T_ANALYTIC, 10000
    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    betas = get_beta_schedule("linear", T)
    ref = Ref(betas)
    d = GaussianDiffusion(betas, "eps", var_type, "mse", decoder="continuous")
    data = GaussianData(mu, S_DATA, d.alphas_bar)
    mean_T, std_T = data.marginal(T - 1)
    x_T = mean_T + std_T * _randn(N, 2, seed=5)
    x_0 = sample(d, data.eps, make_sampler(d, "ddpm"), x_T, clip_denoised=False,
                 generator=torch.Generator().manual_seed(6))

    # x_{t-1} = c1 E[x_0 | x_t] + c2 x_t + std z is affine in x_t: propagate mean and variance.
    m, v = mean_T.numpy(), std_T ** 2
    fixed_large = np.concatenate([[ref.post_var[1]], ref.betas[1:]])
    var_table = ref.post_var if var_type == "fixed-small" else fixed_large
    for t in range(T - 1, -1, -1):
        a2 = ref.ab[t]
        k = math.sqrt(a2) * S_DATA ** 2 / (a2 * S_DATA ** 2 + 1 - a2)  # E[x_0|x_t] = mu + k(x - a mu)
        c1 = ref.betas[t] * math.sqrt(ref.ab_prev[t]) / (1 - a2)
        c2 = (1 - ref.ab_prev[t]) * math.sqrt(1 - ref.betas[t]) / (1 - a2)
        A = c1 * k + c2
        m = A * m + c1 * (mu.numpy() - k * math.sqrt(a2) * mu.numpy())
        v = A * A * v + (var_table[t] if t > 0 else 0.0)
    emp_mean, emp_std = x_0.mean(0).numpy(), x_0.std(0).numpy()
    assert np.all(np.abs(emp_mean - m) < 5 * math.sqrt(v / N))
    assert np.all(np.abs(emp_std - math.sqrt(v)) < 5 * math.sqrt(v / (2 * N)))
    # discretization bias of 1000 ancestral steps: the recursion lands within 2% of the data
    np.testing.assert_allclose(m, mu.numpy(), atol=0.01 * S_DATA)
    assert abs(math.sqrt(v) / S_DATA - 1) < 0.02
    assert np.all(np.abs(emp_mean - mu.numpy()) < 0.03) and np.all(np.abs(emp_std / S_DATA - 1)
                                                                   < 0.04)
