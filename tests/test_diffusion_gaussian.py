"""GaussianDiffusion against float64 references written from the DDPM paper (Ho et al. 2020).

Forward process eq. 4; posterior eq. 6-7 (derived here again by Gaussian conditioning); mean from
eps eq. 11; the MSE target eq. 14; the variational bound eq. 5 with the discretized decoder
eq. 13; Gaussian KL in closed form. None of the references call library code.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule
from ddpmkit.diffusion.functions import (
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN_TYPES = ("eps", "x_0", "mean", "v")
VAR_TYPES = ("fixed-small", "fixed-large", "learned")
LOSS_TYPES = ("mse", "kl")
VALID_COMBOS = [(m, v, lo) for m in MEAN_TYPES for v in VAR_TYPES for lo in LOSS_TYPES
                if not (lo == "mse" and v == "learned")]
HALF_BIN = 1.0 / 255.0   # 8-bit pixels scaled to [-1, 1]: bins of width 2/255
LOG_FLOOR = 1e-12        # the official code's clamp before taking logs
LN2 = math.log(2.0)
# max |Phi_tanh(z) - Phi(z)| of the tanh approximation (Page 1977); measured in a test below.
TANH_CDF_MAX_ERR = 1.8e-4




# ---- float64 references -------------------------------------------------------------------------
class Ref:
    """DDPM in float64 numpy, written from the paper; t is per example (B,)."""

    def __init__(self, betas):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.T = len(self.betas)
        self.alphas = 1.0 - self.betas
        self.ab = np.cumprod(self.alphas)
        self.ab_prev = np.concatenate([[1.0], self.ab[:-1]])
        # eq. 7: beta~_t
        self.post_var = self.betas * (1.0 - self.ab_prev) / (1.0 - self.ab)
        self.post_var_clipped = self.post_var.copy()
        self.post_var_clipped[0] = self.post_var[1]
        self.fixed_large = self.betas.copy()
        self.fixed_large[0] = self.post_var[1]
        self.coef1 = self.betas * np.sqrt(self.ab_prev) / (1.0 - self.ab)
        self.coef2 = (1.0 - self.ab_prev) * np.sqrt(self.alphas) / (1.0 - self.ab)

    @staticmethod
    def b(values, ndim):
        return np.asarray(values, dtype=np.float64).reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x_0, t, eps):  # eq. 4
        ab = self.b(self.ab[t], x_0.ndim)
        return np.sqrt(ab) * x_0 + np.sqrt(1.0 - ab) * eps

    def posterior_bayes(self, x_0, x_t, t):
        """q(x_{t-1} | x_t, x_0) by conditioning N(sqrt(ab_prev) x_0, 1 - ab_prev) on the step
        x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t). At t = 0 it is the point mass at x_0."""
        n = x_0.ndim
        mean = np.empty_like(x_0)
        var = np.empty(len(t))
        for i, ti in enumerate(t):
            if ti == 0:
                mean[i], var[i] = x_0[i], 0.0
                continue
            prior_var = 1.0 - self.ab_prev[ti]
            precision = 1.0 / prior_var + self.alphas[ti] / self.betas[ti]
            var[i] = 1.0 / precision
            mean[i] = var[i] * (np.sqrt(self.ab_prev[ti]) * x_0[i] / prior_var
                                + np.sqrt(self.alphas[ti]) * x_t[i] / self.betas[ti])
        return mean, np.broadcast_to(self.b(var, n), x_0.shape)

    def posterior_mean(self, x_0, x_t, t):  # eq. 7
        n = x_0.ndim
        return self.b(self.coef1[t], n) * x_0 + self.b(self.coef2[t], n) * x_t

    def mean_from_eps(self, x_t, t, eps):  # eq. 11
        n = x_t.ndim
        return (x_t - self.b(self.betas[t] / np.sqrt(1.0 - self.ab[t]), n) * eps) \
            / self.b(np.sqrt(self.alphas[t]), n)

    def p_mean_var(self, mean_type, var_type, out, x_t, t, clip):
        """(mean, logvar, pred_x_0) of p(x_{t-1} | x_t) for the network output `out`."""
        n = x_t.ndim
        if var_type == "learned":
            out, logvar = np.split(out, 2, axis=1)
        else:
            table = self.post_var_clipped if var_type == "fixed-small" else self.fixed_large
            logvar = np.broadcast_to(self.b(np.log(table[t]), n), x_t.shape)
        if mean_type == "mean":
            mean = out
            pred_x_0 = (out - self.b(self.coef2[t], n) * x_t) / self.b(self.coef1[t], n)
            pred_x_0 = np.clip(pred_x_0, -1, 1) if clip else pred_x_0
        else:
            ab = self.b(self.ab[t], n)
            if mean_type == "eps":
                pred_x_0 = (x_t - np.sqrt(1.0 - ab) * out) / np.sqrt(ab)
            elif mean_type == "v":  # Salimans & Ho 2022, appendix D: x_0 = alpha z - sigma v
                pred_x_0 = np.sqrt(ab) * x_t - np.sqrt(1.0 - ab) * out
            else:
                pred_x_0 = out
            pred_x_0 = np.clip(pred_x_0, -1, 1) if clip else pred_x_0
            mean = self.posterior_mean(pred_x_0, x_t, t)
        return mean, logvar, pred_x_0


def ref_kl(m1, lv1, m2, lv2):
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) = log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2."""
    s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
    return np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5


def ref_tanh_cdf(z):
    """Page (1977): Phi(z) ~ (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) / 2."""
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))


def ref_bin_probability(x, mean, log_scale, cdf, sf):
    """DDPM eq. 13: the mass of N(mean, scale^2) on x's pixel bin [x - 1/255, x + 1/255], the
    first bin reaching down to -inf and the last up to +inf."""
    scale = np.exp(log_scale)
    k = np.rint((x + 1.0) * 255.0 / 2.0)  # pixel level 0..255
    upper = (x + HALF_BIN - mean) / scale
    lower = (x - HALF_BIN - mean) / scale
    inner = cdf(upper) - cdf(lower)
    return np.where(k == 0, cdf(upper), np.where(k == 255, sf(lower), inner))


def ref_discretized_ll_tanh(x, mean, log_scale):
    p = ref_bin_probability(x, mean, log_scale, ref_tanh_cdf, lambda z: 1.0 - ref_tanh_cdf(z))
    return np.log(np.maximum(p, LOG_FLOOR))


def ref_continuous_ll(x, mean, log_scale):
    return norm.logpdf(x, loc=mean, scale=np.exp(log_scale))


def ref_vb_bits(ref, mean_type, var_type, decoder, out, x_0, x_t, t, clip):
    """L_{t-1} (eq. 5) in bits/dim per example: KL to the posterior, or the decoder NLL at t=0."""
    mean, logvar, _ = ref.p_mean_var(mean_type, var_type, out, x_t, t, clip)
    true_mean, true_var = ref.posterior_bayes(x_0, x_t, t)
    result = np.empty(len(t))
    for i, ti in enumerate(t):
        if ti == 0:
            if decoder == "discretized":
                ll = ref_discretized_ll_tanh(x_0[i], mean[i], 0.5 * logvar[i])
            else:
                ll = ref_continuous_ll(x_0[i], mean[i], 0.5 * logvar[i])
            result[i] = -ll.mean() / LN2
        else:
            kl = ref_kl(true_mean[i], np.log(true_var[i]), mean[i], logvar[i])
            result[i] = kl.mean() / LN2
    return result


# ---- helpers -------------------------------------------------------------------------------------
def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _pixels(rng, shape):
    """Data on the 8-bit grid in [-1, 1], as the discretized decoder expects."""
    return rng.integers(0, 256, size=shape) / 127.5 - 1.0


def _smooth_fn(var_type, T):
    """A deterministic, t-dependent stand-in for a network (a learned variance gets a log-variance
    half of plausible size)."""
    def fn(x, t):
        tt = (t.to(x.dtype) / T).view(-1, *([1] * (x.ndim - 1)))
        out = 0.6 * torch.tanh(x) + 0.3 * tt - 0.1 * x * tt
        if var_type == "learned":
            out = torch.cat([out, -4.0 + 2.0 * tt + 0.3 * torch.sin(x)], dim=1)
        return out
    return fn


def _assert_close(actual, expected, atol=1e-10, rtol=0.0):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol,
                               atol=atol)


@pytest.fixture(scope="module")
def betas():
    return get_beta_schedule("linear", 50, beta_start=1e-3, beta_end=0.2)


# ---- tables and the forward process -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "quad", "warmup10", "warmup50", "jsd", "cosine"])
def test_tables_match_the_paper(name):
    betas = get_beta_schedule(name, 40)
    d, ref = GaussianDiffusion(betas, decoder="continuous"), Ref(betas)
    expected = {
        "alphas_bar": ref.ab, "alphas_bar_prev": ref.ab_prev, "posterior_var": ref.post_var,
        "posterior_logvar_clipped": np.log(ref.post_var_clipped),
        "posterior_mean_coef1": ref.coef1, "posterior_mean_coef2": ref.coef2,
        "fixed_large_var": ref.fixed_large, "fixed_large_logvar": np.log(ref.fixed_large),
        "sqrt_alphas_bar": np.sqrt(ref.ab), "sqrt_one_minus_alphas_bar": np.sqrt(1 - ref.ab),
        "sqrt_recip_alphas_bar": 1 / np.sqrt(ref.ab),
        "sqrt_recipm1_alphas_bar": np.sqrt(1 / ref.ab - 1),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(d.tables[key], value, rtol=1e-12, err_msg=key)
    assert d.T == 40 and d.posterior_var[0] == 0.0


def test_q_sample_is_eq_4(betas):
    rng = np.random.default_rng(0)
    d, ref = GaussianDiffusion(betas), Ref(betas)
    for shape in [(5, 3), (4, 2, 3, 3)]:
        x_0, eps = rng.standard_normal(shape), rng.standard_normal(shape)
        t = rng.permutation(len(betas))[: shape[0]]
        _assert_close(d.q_sample(_t(x_0), _t(t), _t(eps)), ref.q_sample(x_0, t, eps), 1e-12)
        q = d.q_mean_var(_t(x_0), _t(t))
        _assert_close(q.mean, Ref.b(np.sqrt(ref.ab[t]), len(shape)) * x_0, 1e-12)
        _assert_close(q.var, np.broadcast_to(Ref.b(1 - ref.ab[t], len(shape)), shape), 1e-12)
        # float32 data stays float32 and agrees to float32 precision
        x32 = d.q_sample(_t(x_0).float(), _t(t), _t(eps).float())
        assert x32.dtype == torch.float32
        _assert_close(x32, ref.q_sample(x_0, t, eps), 1e-5)


def test_q_posterior_is_eq_6_7(betas):
    """Eq. 7's closed form against Gaussian conditioning, t = 0 (a point mass) included."""
    rng = np.random.default_rng(1)
    d, ref = GaussianDiffusion(betas), Ref(betas)
    shape = (6, 2, 3)
    x_0, eps = rng.standard_normal(shape), rng.standard_normal(shape)
    t = np.array([0, 1, 2, 17, 48, 49])
    x_t = ref.q_sample(x_0, t, eps)
    mean, var = ref.posterior_bayes(x_0, x_t, t)
    post = d.q_posterior(_t(x_0), _t(x_t), _t(t))
    _assert_close(post.mean, mean, 1e-12)
    _assert_close(post.var, var, 1e-14)
    clipped = var.copy()
    clipped[0] = ref.post_var[1]  # the log-variance at t = 0 borrows beta~_1
    _assert_close(post.logvar, np.log(clipped), 1e-12)


def test_mean_from_eps_is_eq_11(betas):
    rng = np.random.default_rng(2)
    d, ref = GaussianDiffusion(betas, "eps", "fixed-large"), Ref(betas)
    shape = (5, 3, 2, 2)
    x_t, eps_pred = rng.standard_normal(shape), rng.standard_normal(shape)
    t = np.array([0, 3, 10, 30, 49])
    p = d.p_mean_var(_t(eps_pred), _t(x_t), _t(t), clip_denoised=False)
    _assert_close(p.mean, ref.mean_from_eps(x_t, t, eps_pred), 1e-11)


def test_clipping_clips_pred_x_0_before_the_mean(betas):
    rng = np.random.default_rng(3)
    ref = Ref(betas)
    shape = (4, 3, 2, 2)
    x_t, out = 3 * rng.standard_normal(shape), 3 * rng.standard_normal(shape)
    t = np.array([0, 5, 25, 49])
    for mean_type in MEAN_TYPES:
        d = GaussianDiffusion(betas, mean_type, "fixed-large")
        p = d.p_mean_var(_t(out), _t(x_t), _t(t), clip_denoised=True)
        mean, _, pred_x_0 = ref.p_mean_var(mean_type, "fixed-large", out, x_t, t, clip=True)
        assert p.pred_x_0.abs().max() <= 1.0
        assert (p.pred_x_0.abs() == 1.0).any()  # the inputs are wide enough to be clipped
        _assert_close(p.pred_x_0, pred_x_0, 1e-10)
        _assert_close(p.mean, mean, 1e-10)
        # eps follows from the clipped x_0 (eq. 4 solved for eps)
        ab = Ref.b(ref.ab[t], 4)
        _assert_close(p.pred_eps, (x_t - np.sqrt(ab) * pred_x_0) / np.sqrt(1 - ab), 1e-9)


@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_variances_of_each_type(betas, var_type):
    """fixed-small: beta~_t (log clipped at t=0); fixed-large: beta_t with the first entry
    replaced by beta~_1 (official DDPM code); learned: exp of the second half of the output."""
    rng = np.random.default_rng(4)
    ref = Ref(betas)
    T = len(betas)
    d = GaussianDiffusion(betas, "eps", var_type, "kl" if var_type == "learned" else "mse")
    x_t = rng.standard_normal((T, 2))
    out = rng.standard_normal((T, d.model_out_channels(2)))
    p = d.p_mean_var(_t(out), _t(x_t), _t(np.arange(T)), clip_denoised=False)
    if var_type == "fixed-small":
        _assert_close(p.var[:, 0], ref.post_var, 1e-15)
        _assert_close(p.logvar[:, 0], np.log(ref.post_var_clipped), 1e-12)
    elif var_type == "fixed-large":
        expected = np.concatenate([[ref.post_var[1]], ref.betas[1:]])
        _assert_close(p.var[:, 0], expected, 1e-15)
        _assert_close(p.logvar[:, 0], np.log(expected), 1e-12)
        assert p.var[0, 0] != ref.betas[0]
    else:
        assert d.model_out_channels(2) == 4
        _assert_close(p.logvar, out[:, 2:], 0)
        _assert_close(p.var, np.exp(out[:, 2:]), 1e-15)
        mean, _, _ = ref.p_mean_var("eps", "learned", out, x_t, np.arange(T), clip=False)
        _assert_close(p.mean, mean, 1e-10)


# ---- losses -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_mse_loss_regresses_on_the_eq_14_target(betas, mean_type):
    rng = np.random.default_rng(5)
    ref = Ref(betas)
    d = GaussianDiffusion(betas, mean_type, "fixed-large", "mse")
    shape = (4, 3, 2, 2)
    x_0, noise = _pixels(rng, shape), rng.standard_normal(shape)
    t = np.array([0, 1, 20, 49])
    fn = _smooth_fn("fixed-large", len(betas))
    loss = d.training_losses(fn, _t(x_0), _t(t), _t(noise))
    x_t = ref.q_sample(x_0, t, noise)
    out = fn(_t(x_t), _t(t)).numpy()
    ab = Ref.b(ref.ab[t], 4)
    target = {"eps": noise, "x_0": x_0, "mean": ref.posterior_bayes(x_0, x_t, t)[0],
              "v": np.sqrt(ab) * noise - np.sqrt(1 - ab) * x_0}[mean_type]
    assert loss.shape == (4,)
    _assert_close(loss, ((out - target) ** 2).mean(axis=(1, 2, 3)), 1e-10)


@pytest.mark.parametrize("decoder", ["discretized", "continuous"])
@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_kl_loss_is_the_variational_bound_term(betas, mean_type, var_type, decoder):
    rng = np.random.default_rng(6)
    ref = Ref(betas)
    d = GaussianDiffusion(betas, mean_type, var_type, "kl", decoder=decoder)
    shape = (5, 2, 2, 2)
    x_0, noise = _pixels(rng, shape), rng.standard_normal(shape)
    t = np.array([0, 0, 1, 25, 49])
    fn = _smooth_fn(var_type, len(betas))
    loss = d.training_losses(fn, _t(x_0), _t(t), _t(noise))
    x_t = ref.q_sample(x_0, t, noise)
    out = fn(_t(x_t), _t(t)).numpy()
    expected = ref_vb_bits(ref, mean_type, var_type, decoder, out, x_0, x_t, t, clip=False)
    # The discretized decoder takes the log of a bin probability that can be ~1e-12, a
    # difference of tanh values near 1: one ulp of tanh (torch's vectorized one against
    # numpy's, which differ by CPU) moves it by up to ~1e-9 relative (measured 8.6e-10).
    rtol = 1e-8 if decoder == "discretized" else 0.0
    _assert_close(loss, expected, 1e-9, rtol=rtol)


def test_normal_kl_closed_form_and_torch_distributions():
    rng = np.random.default_rng(7)
    m1, m2 = rng.standard_normal((2, 3, 4))
    lv1, lv2 = rng.uniform(-6, 2, size=(2, 3, 4))
    kl = normal_kl(_t(m1), _t(lv1), _t(m2), _t(lv2))
    _assert_close(kl, ref_kl(m1, lv1, m2, lv2), 1e-12)
    dist = torch.distributions
    expected = dist.kl_divergence(dist.Normal(_t(m1), _t(np.exp(0.5 * lv1))),
                                  dist.Normal(_t(m2), _t(np.exp(0.5 * lv2))))
    _assert_close(kl, expected.numpy(), 1e-12)
    assert (kl >= 0).all()
    _assert_close(normal_kl(_t(m1), _t(lv1), _t(m1), _t(lv1)), np.zeros_like(m1), 1e-15)
    # broadcasting against scalars, as the prior term does
    _assert_close(normal_kl(_t(m1), _t(lv1), torch.tensor(0.0, dtype=torch.float64),
                            torch.tensor(0.0, dtype=torch.float64)),
                  ref_kl(m1, lv1, 0.0, 0.0), 1e-12)


# ---- decoders ----------------------------------------------------------------------------------------
def test_tanh_cdf_approximation_error_bound():
    z = np.linspace(-8, 8, 160001)
    approx = approx_standard_normal_cdf(_t(z)).numpy()
    _assert_close(approx, ref_tanh_cdf(z), 1e-15)
    err = np.abs(approx - norm.cdf(z)).max()
    assert 1e-4 < err <= TANH_CDF_MAX_ERR


def _decoder_cases():
    """Every pixel level several times: means anywhere in [-1.2, 1.2] (mostly far from x) and
    means within a few bins of x (large bin masses), scales from 0.2 bins to 0.8."""
    rng = np.random.default_rng(8)
    x = np.tile(np.arange(256) / 127.5 - 1.0, 8)
    far = rng.uniform(-1.2, 1.2, size=x.shape)
    near = x + rng.uniform(-0.02, 0.02, size=x.shape)
    mean = np.where(np.arange(x.size) % 2 == 0, far, near)
    log_scale = rng.uniform(math.log(0.002), math.log(0.8), size=x.shape)
    log_scale = np.where(np.arange(x.size) % 4 == 1, np.log(0.01), log_scale)
    return x, mean, log_scale


def test_discretized_decoder_is_exactly_the_tanh_approximation():
    x, mean, log_scale = _decoder_cases()
    ll = discretized_gaussian_log_likelihood(_t(x), _t(mean), _t(log_scale)).numpy()
    expected = ref_discretized_ll_tanh(x, mean, log_scale)
    # A tail bin's mass is a difference of two CDF values near 1 (or near 0): its absolute
    # rounding error is ~1e-16 whatever its size, so log p carries ~1e-16 / p.
    tol = 1e-10 + 1e-15 / np.exp(expected)
    assert np.all(np.abs(ll - expected) <= tol), np.abs(ll - expected).max()
    assert np.mean(np.exp(expected) > 1e-3) > 0.3  # not only clamped tails


def test_discretized_decoder_integrates_the_gaussian_over_each_bin():
    """Against the exact normal CDF (scipy): equal up to the tanh approximation's error."""
    x, mean, log_scale = _decoder_cases()
    ll = discretized_gaussian_log_likelihood(_t(x), _t(mean), _t(log_scale)).numpy()
    exact = ref_bin_probability(x, mean, log_scale, norm.cdf, norm.sf)
    p = np.exp(ll)
    # a bin mass is a difference of two CDF values: at most twice the CDF error, plus the floor
    assert np.all(np.abs(p - exact) <= 2 * TANH_CDF_MAX_ERR + LOG_FLOOR)
    big = exact > 0.05
    assert big.sum() > 100
    assert np.all(np.abs(ll[big] - np.log(exact[big])) <= 2 * TANH_CDF_MAX_ERR / exact[big] + 1e-9)
    # edge bins take the tails: x = -1 and x = 1 under a mean far outside [-1, 1]
    edge = discretized_gaussian_log_likelihood(
        _t(np.array([-1.0, 1.0])), _t(np.array([-3.0, 3.0])), _t(np.log([0.5, 0.5])))
    _assert_close(edge, np.log(norm.cdf([(-1 + HALF_BIN + 3) / 0.5] * 2)), 4e-4)


@pytest.mark.parametrize("mean,scale", [(0.0, 0.3), (0.7, 0.05), (-0.95, 0.01), (0.2, 2.0)])
def test_discretized_decoder_masses_sum_to_one(mean, scale):
    x = np.arange(256) / 127.5 - 1.0
    ll = discretized_gaussian_log_likelihood(_t(x), _t(np.full(256, mean)),
                                             _t(np.full(256, math.log(scale))))
    assert abs(ll.exp().sum().item() - 1.0) < 256 * LOG_FLOOR + 1e-12


def test_continuous_decoder_is_the_gaussian_density():
    rng = np.random.default_rng(9)
    x, mean = rng.standard_normal((2, 50))
    log_scale = rng.uniform(-3, 1, size=50)
    ll = continuous_gaussian_log_likelihood(_t(x), _t(mean), _t(log_scale))
    _assert_close(ll, ref_continuous_ll(x, mean, log_scale), 1e-12)


def test_mean_flat():
    x = torch.arange(24, dtype=torch.float64).view(2, 3, 4)
    _assert_close(mean_flat(x), [5.5, 17.5], 0)


# ---- bits/dim -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean_type,var_type,decoder", [
    ("eps", "fixed-large", "discretized"),
    ("x_0", "fixed-small", "discretized"),
    ("mean", "learned", "discretized"),
    ("eps", "fixed-small", "continuous"),
    ("x_0", "learned", "continuous"),
])
def test_bpd_is_the_sum_of_the_bound_terms(mean_type, var_type, decoder):
    """bpd equals prior + sum of L_t computed step by step here, with the same noise (drawn for
    t = T-1 down to 0 from the generator)."""
    T = 8
    betas = get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2)
    ref = Ref(betas)
    loss_type = "kl" if var_type == "learned" else "mse"
    d = GaussianDiffusion(betas, mean_type, var_type, loss_type, decoder=decoder)
    clip = decoder == "discretized"
    rng = np.random.default_rng(10)
    x_0 = _pixels(rng, (3, 2, 2, 2))
    B = x_0.shape[0]
    fn = _smooth_fn(var_type, T)

    result = d.bpd(fn, _t(x_0), generator=torch.Generator().manual_seed(11))

    g = torch.Generator().manual_seed(11)
    terms, mses = np.zeros((B, T)), np.zeros((B, T))
    for step in reversed(range(T)):
        noise = torch.randn(x_0.shape, generator=g, dtype=torch.float64).numpy()
        t = np.full(B, step)
        x_t = ref.q_sample(x_0, t, noise)
        out = fn(_t(x_t), _t(t)).numpy()
        terms[:, step] = ref_vb_bits(ref, mean_type, var_type, decoder, out, x_0, x_t, t, clip)
        pred_x_0 = ref.p_mean_var(mean_type, var_type, out, x_t, t, clip)[2]
        mses[:, step] = ((pred_x_0 - x_0) ** 2).mean(axis=(1, 2, 3))
    ab_T = ref.ab[-1]
    prior = ref_kl(np.sqrt(ab_T) * x_0, np.log(1 - ab_T), 0.0, 0.0).mean(axis=(1, 2, 3)) / LN2

    assert result.terms.shape == (B, T) and result.total.shape == (B,)
    _assert_close(result.prior, prior, 1e-10)
    _assert_close(result.terms, terms, 1e-9)
    _assert_close(result.total, prior + terms.sum(axis=1), 1e-9)
    _assert_close(result.x_0_mse, mses, 1e-10)
    _assert_close(d.prior_bpd(_t(x_0)), prior, 1e-10)
    assert np.all(terms[:, 1:] >= 0)


# ---- every combination builds and trains -------------------------------------------------------------
class ToyNet(torch.nn.Module):
    """Linear on (B, D) data with t/T appended."""

    def __init__(self, D, out, T):
        super().__init__()
        self.T, self.lin = T, torch.nn.Linear(D + 1, out)

    def forward(self, x, t):
        return self.lin(torch.cat([x, (t.to(x.dtype) / self.T)[:, None]], dim=1))


class ImageNet(torch.nn.Module):
    """1x1 convolution on (B, C, H, W) images with a t/T channel."""

    def __init__(self, C, out, T):
        super().__init__()
        self.T, self.conv = T, torch.nn.Conv2d(C + 1, out, 1)

    def forward(self, x, t):
        tt = (t.to(x.dtype) / self.T).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.conv(torch.cat([x, tt], dim=1))


@pytest.mark.parametrize("data", ["toy", "images"])
@pytest.mark.parametrize("mean_type,var_type,loss_type", VALID_COMBOS)
def test_every_combination_computes_a_loss_with_gradients(mean_type, var_type, loss_type, data):
    T = 10
    torch.manual_seed(0)
    betas = get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2)
    g = torch.Generator().manual_seed(0)
    if data == "toy":
        d = GaussianDiffusion(betas, mean_type, var_type, loss_type, decoder="continuous")
        C = 2
        x_0 = torch.randn(4, C, generator=g)
        net = ToyNet(C, d.model_out_channels(C), T)
    else:
        d = GaussianDiffusion(betas, mean_type, var_type, loss_type, decoder="discretized")
        C = 3
        x_0 = torch.randint(0, 256, (4, C, 4, 4), generator=g).float() / 127.5 - 1
        net = ImageNet(C, d.model_out_channels(C), T)
    assert d.model_out_channels(C) == (2 * C if var_type == "learned" else C)
    t = torch.tensor([0, 1, 5, T - 1])
    loss = d.training_losses(net, x_0, t, torch.randn(x_0.shape, generator=g))
    assert loss.shape == (4,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    weight = net.lin.weight if data == "toy" else net.conv.weight
    assert weight.grad[:C].abs().sum() > 0  # the mean part is trained
    if var_type == "learned":
        assert weight.grad[C:].abs().sum() > 0  # and so is the log-variance part


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_mse_with_learned_variance_raises_naming_the_allowed_values(mean_type):
    with pytest.raises(ValueError) as info:
        GaussianDiffusion(get_beta_schedule("linear", 10), mean_type, "learned", "mse")
    message = str(info.value)
    assert "kl" in message and "fixed-small" in message and "fixed-large" in message


@pytest.mark.parametrize("kwargs,choices", [
    ({"model_mean_type": "velocity"}, MEAN_TYPES),
    ({"model_var_type": "fixed"}, VAR_TYPES),
    ({"loss_type": "l1"}, LOSS_TYPES),
    ({"decoder": "bernoulli"}, ("discretized", "continuous")),
])
def test_unknown_names_raise_listing_the_choices(kwargs, choices):
    with pytest.raises(ValueError) as info:
        GaussianDiffusion(get_beta_schedule("linear", 10), **kwargs)
    assert all(choice in str(info.value) for choice in choices)


@pytest.mark.parametrize("bad", [[0.1], [0.0, 0.1], [1.0, 0.1], [0.1, 1.5], [[0.1, 0.2]],
                                 [0.1, float("nan")]])
def test_bad_betas_raise(bad):
    with pytest.raises(ValueError):
        GaussianDiffusion(np.array(bad))
