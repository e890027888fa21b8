"""Beta schedules, DDIM sub-sequences and the identities that tie the parameterizations together.

The references here are written from the papers in float64 (DDPM, Ho et al. 2020, eq. 4 and 7;
the official DDPM code's `get_beta_schedule`; Improved DDPM, Nichol & Dhariwal 2021, eq. 17;
DDIM, Song et al. 2021, section D.2; the reference project's `const`) and share no code with
the library. The sub-sequences' agreement with the reference and diffusers is in
test_diffusion_parity.py.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpmkit.diffusion import (
    BETA_SCHEDULES,
    SKIP_SCHEDULES,
    GaussianDiffusion,
    ddim_timesteps,
    get_beta_schedule,
    make_sampler,
    sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE_NAMES = ("linear", "quad", "warmup10", "warmup50", "jsd", "cosine", "const")
SKIP_NAMES = ("linear", "quadratic", "linspace", "leading", "trailing", "karras")
MAX_BETA = 0.999        # the clip every schedule applies (Improved DDPM, section 3.2)
COSINE_S = 0.008        # Improved DDPM eq. 17 offset

PROPERTY = settings(max_examples=50, deadline=None)
SHAPES = st.sampled_from([(1, 3), (4, 2), (3, 5), (2, 3, 2, 2), (4, 1, 3, 3)])




# ---- float64 references ------------------------------------------------------------------------
def ref_betas(name, T, beta_start=1e-4, beta_end=0.02):
    """beta_1..beta_T written out term by term from the papers (index 0 is beta_1)."""
    def lin(a, b, n, i):  # the i-th of n evenly spaced points from a to b
        return a if n == 1 else a + (b - a) * i / (n - 1)

    if name == "linear":
        betas = [lin(beta_start, beta_end, T, i) for i in range(T)]
    elif name == "quad":
        betas = [lin(math.sqrt(beta_start), math.sqrt(beta_end), T, i) ** 2 for i in range(T)]
    elif name in ("warmup10", "warmup50"):
        warmup = T // 10 if name == "warmup10" else T // 2
        betas = [lin(beta_start, beta_end, warmup, i) if i < warmup else beta_end
                 for i in range(T)]
    elif name == "jsd":
        betas = [1.0 / (T - i) for i in range(T)]  # 1/T, 1/(T-1), ..., 1
    elif name == "cosine":
        def f(t):
            return math.cos((t / T + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
        betas = [1.0 - f(i + 1) / f(i) for i in range(T)]  # 1 - alphas_bar_t / alphas_bar_{t-1}
    elif name == "const":
        betas = [beta_end] * T
    else:
        raise AssertionError(name)
    return np.minimum(np.array(betas, dtype=np.float64), MAX_BETA)


class Ref:
    """DDPM tables and the eq. 4 / eq. 7 maps, per example t (B,), float64 numpy."""

    def __init__(self, betas):
        self.betas = np.asarray(betas, dtype=np.float64)
        ab, acc = [], 1.0
        for b in self.betas:
            acc *= 1.0 - b
            ab.append(acc)
        self.ab = np.array(ab)
        self.ab_prev = np.concatenate([[1.0], self.ab[:-1]])

    def _b(self, table, t, ndim):
        return table[t].reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x_0, t, eps):  # eq. 4
        ab = self._b(self.ab, t, x_0.ndim)
        return np.sqrt(ab) * x_0 + np.sqrt(1.0 - ab) * eps

    def coef1(self, t):  # eq. 7, the weight of x_0 in mu~_t
        return self.betas[t] * np.sqrt(self.ab_prev[t]) / (1.0 - self.ab[t])

    def posterior_mean(self, x_0, x_t, t):  # eq. 7
        n = x_0.ndim
        c1 = self.coef1(t).reshape(-1, *([1] * (n - 1)))
        ab, ab_prev = self._b(self.ab, t, n), self._b(self.ab_prev, t, n)
        alpha = 1.0 - self._b(self.betas, t, n)
        c2 = (1.0 - ab_prev) * np.sqrt(alpha) / (1.0 - ab)
        return c1 * x_0 + c2 * x_t


def _per_example(values, ndim):
    return torch.as_tensor(np.asarray(values, dtype=np.float64)).view(-1, *([1] * (ndim - 1)))


def _assert_close(actual, expected, tol):
    """|actual - expected| <= tol elementwise; tol broadcasts (e.g. (B, 1, ...) per example)."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape
    err = (actual - expected).abs()
    bad = err > tol
    assert not bad.any(), f"max error {err.max().item():.3e}; worst excess {(err - tol).max():.3e}"


# ---- names and validation -------------------------------------------------------------------
def test_schedule_names_are_the_documented_ones():
    assert tuple(BETA_SCHEDULES) == SCHEDULE_NAMES
    assert tuple(SKIP_SCHEDULES) == SKIP_NAMES


def test_unknown_schedule_names_raise_listing_the_choices():
    with pytest.raises(ValueError) as info:
        get_beta_schedule("sigmoid", 10)
    assert all(name in str(info.value) for name in SCHEDULE_NAMES)
    with pytest.raises(ValueError) as info:
        ddim_timesteps(10, 5, "cubic")
    assert all(name in str(info.value) for name in SKIP_NAMES)


@pytest.mark.parametrize("T", [0, -3, 2.5, True, "10"])
def test_bad_number_of_steps_raises(T):
    with pytest.raises(ValueError):
        get_beta_schedule("linear", T)
    with pytest.raises(ValueError):
        ddim_timesteps(T, 1)


@pytest.mark.parametrize("S", [0, -1, 11, 2.0, True])
def test_bad_number_of_sampling_steps_raises(S):
    with pytest.raises(ValueError):
        ddim_timesteps(10, S, "linear")


@pytest.mark.parametrize("start,end", [(0.0, 0.02), (0.02, 0.01), (1e-4, 1.0), (-1e-4, 0.02)])
def test_bad_beta_range_raises(start, end):
    with pytest.raises(ValueError):
        get_beta_schedule("linear", 10, beta_start=start, beta_end=end)


# ---- beta schedules ---------------------------------------------------------------------------
@PROPERTY
@given(name=st.sampled_from(SCHEDULE_NAMES), T=st.integers(1, 1000),
       beta_start=st.floats(1e-5, 1e-2), ratio=st.floats(1.0, 50.0))
def test_betas_match_the_papers(name, T, beta_start, ratio):
    beta_end = min(beta_start * ratio, 0.5)
    betas = get_beta_schedule(name, T, beta_start=beta_start, beta_end=beta_end)
    assert isinstance(betas, np.ndarray) and betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas, ref_betas(name, T, beta_start, beta_end),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_betas_at_T_1000_match_the_papers(name):
    np.testing.assert_allclose(get_beta_schedule(name, 1000), ref_betas(name, 1000),
                               rtol=1e-12, atol=1e-15)


@PROPERTY
@given(name=st.sampled_from(SCHEDULE_NAMES), T=st.integers(2, 1000))
def test_betas_in_open_unit_interval_and_alphas_bar_strictly_decreasing(name, T):
    betas = get_beta_schedule(name, T)
    assert np.all(np.isfinite(betas)) and np.all(betas > 0) and np.all(betas < 1)
    diffusion = GaussianDiffusion(betas, decoder="continuous")
    for table_name, table in diffusion.tables.items():
        assert np.all(np.isfinite(table)), table_name
    ab = diffusion.alphas_bar
    assert np.all(ab > 0) and np.all(ab <= 1)
    assert np.all(np.diff(ab) < 0)
    np.testing.assert_allclose(ab, Ref(betas).ab, rtol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_jsd_last_beta_of_one_is_clipped(T):
    betas = get_beta_schedule("jsd", T)
    assert betas[-1] == MAX_BETA  # 1/(T - (T-1)) = 1 would make alphas_bar_T = 0
    np.testing.assert_allclose(betas[:-1], [1.0 / (T - i) for i in range(T - 1)], rtol=1e-15)


@pytest.mark.parametrize("decoder", ["discretized", "continuous"])
@pytest.mark.parametrize("sampler_name", ["ddpm", "ddim", "dpm-solver++"])
def test_sampling_with_jsd_is_finite(decoder, sampler_name):
    T = 20
    diffusion = GaussianDiffusion(get_beta_schedule("jsd", T), "eps", "fixed-large", "mse",
                                  decoder=decoder)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)

    def denoise_fn(x, t):  # a smooth, deliberately imperfect eps predictor
        return 0.7 * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1)

    sampler = make_sampler(diffusion, sampler_name, steps=8, eta=0.5)
    x_0 = sample(diffusion, denoise_fn, sampler, x_T, generator=torch.Generator().manual_seed(1))
    assert x_0.shape == x_T.shape and torch.isfinite(x_0).all()
    assert not torch.equal(x_0, x_T)


# ---- eq. 4 inverted, and the three parameterizations ------------------------------------------
def _draw(shape, T, seed):
    rng = np.random.default_rng(seed)
    B = shape[0]
    t = rng.integers(0, T, size=B)
    t[0] = 0                    # always cover both ends of the chain
    t[-1] = T - 1 if B > 1 else t[-1]
    return rng.standard_normal(shape), rng.standard_normal(shape), t


@PROPERTY
@given(name=st.sampled_from(SCHEDULE_NAMES), T=st.integers(2, 1000), shape=SHAPES,
       seed=st.integers(0, 2 ** 32 - 1))
def test_x_0_recovered_from_x_t_and_eps(name, T, shape, seed):
    betas = get_beta_schedule(name, T)
    diffusion = GaussianDiffusion(betas, decoder="continuous")
    ref = Ref(betas)
    x_0, eps, t = _draw(shape, T, seed)
    x_t = diffusion.q_sample(torch.from_numpy(x_0), torch.from_numpy(t), torch.from_numpy(eps))
    _assert_close(x_t, ref.q_sample(x_0, t, eps), 1e-12)
    x_0_back = diffusion.pred_x_0_from_eps(x_t, torch.from_numpy(t), torch.from_numpy(eps))
    # Dividing by sqrt(alphas_bar) (down to ~1e-5 at the end of jsd/cosine) amplifies rounding.
    tol = 1e-12 * _per_example(1.0 / np.sqrt(ref.ab[t]), len(shape))
    _assert_close(x_0_back, x_0, tol)


@PROPERTY
@given(name=st.sampled_from(SCHEDULE_NAMES), T=st.integers(2, 1000), shape=SHAPES,
       seed=st.integers(0, 2 ** 32 - 1))
def test_three_parameterizations_give_the_same_posterior_mean(name, T, shape, seed):
    """eps, x_0 and mean outputs built from the same true x_0 give the same p(x_{t-1} | x_t)."""
    betas = get_beta_schedule(name, T)
    ref = Ref(betas)
    x_0, eps, t = _draw(shape, T, seed)
    x_t = ref.q_sample(x_0, t, eps)
    mean = ref.posterior_mean(x_0, x_t, t)
    n = len(shape)
    inv_sqrt_ab = 1.0 / np.sqrt(ref.ab[t])
    inv_c1 = 1.0 / ref.coef1(t)
    inv_sqrt_recipm1 = 1.0 / np.sqrt(1.0 / ref.ab[t] - 1.0)
    # Error bounds follow the conditioning of each inversion (1e-12 relative, per example).
    tol_x_0 = {"eps": 1e-12 * (1 + inv_sqrt_ab), "x_0": np.zeros_like(inv_c1), "mean": 1e-12 * (1 + inv_c1)}
    outputs = {"eps": eps, "x_0": x_0, "mean": mean}
    for mean_type, out in outputs.items():
        diffusion = GaussianDiffusion(betas, mean_type, "fixed-small", "mse", decoder="continuous")
        p = diffusion.p_mean_var(torch.from_numpy(out), torch.from_numpy(x_t),
                                 torch.from_numpy(t), clip_denoised=False)
        _assert_close(p.mean, mean, _per_example(1e-12 * (1 + inv_sqrt_ab), n))
        _assert_close(p.pred_x_0, x_0, _per_example(tol_x_0[mean_type] + 1e-13, n))
        tol_eps = (tol_x_0[mean_type] + 1e-12 * inv_sqrt_ab + 1e-13) * (1 + inv_sqrt_recipm1)
        _assert_close(p.pred_eps, eps, _per_example(tol_eps, n))


# ---- DDIM sub-sequences ---------------------------------------------------------------------------
def _check_subsequence(steps, T, S):
    assert isinstance(steps, np.ndarray) and np.issubdtype(steps.dtype, np.integer)
    assert steps.shape == (S,)
    assert np.all(np.diff(steps) > 0)
    assert steps[0] >= 0 and steps[-1] < T


@st.composite
def steps_and_subsequence(draw):
    T = draw(st.integers(1, 1000))
    return T, draw(st.integers(1, T))


@PROPERTY
@given(T_S=steps_and_subsequence(), kind=st.sampled_from(SKIP_NAMES[:-1]))  # karras: a table
def test_ddim_subsequence_has_exactly_S_increasing_steps(T_S, kind):
    T, S = T_S
    steps = ddim_timesteps(T, S, kind)
    _check_subsequence(steps, T, S)
    if S == 1:  # a single step starts from the noisiest step
        assert steps.tolist() == [T - 1]
        return
    if kind == "trailing":  # from the top down in steps of T / S, rounded, minus one
        assert abs(steps[0] - (T / S - 1)) <= 0.5 + 1e-9 and steps[-1] == T - 1
    else:
        assert steps[0] == 0
    if kind == "linear":
        # floor(i T / S): the reference's range(0, T, T // S) when S divides T
        assert steps.tolist() == [i * T // S for i in range(S)]
    elif kind == "linspace":
        # Evenly spaced from 0 to T-1: each step is the nearest integer to i (T-1) / (S-1).
        ideal = np.array([Fraction(i * (T - 1), max(S - 1, 1)) for i in range(S)], dtype=float)
        assert np.all(np.abs(steps - ideal) <= 0.5 + 1e-9)
    elif kind == "quadratic":
        # i^2 spacing up to 0.8 T (DDIM D.2). Where plain rounding already gives distinct steps
        # below T, nothing needs nudging and the steps are that rounding (up to ties).
        ideal = np.array([float(Fraction(i * i * 4 * T, 5 * max(S - 1, 1) ** 2))
                          for i in range(S)])
        rounded = np.floor(ideal + 0.5)
        if np.all(np.diff(rounded) > 1) and rounded[-1] < T:
            assert np.all(np.abs(steps - ideal) <= 0.5 + 1e-4)


@pytest.mark.parametrize("kind", SKIP_NAMES[:-1])
@pytest.mark.parametrize("S", [10, 50, 100, 300, 999, 1000])
def test_ddim_subsequence_regressions_at_T_1000(S, kind):
    """The reference returned 334 steps for S = 300 (range(0, T, T // S)) and repeated the first
    quadratic steps (int(x^2) of a linspace)."""
    steps = ddim_timesteps(1000, S, kind)
    _check_subsequence(steps, 1000, S)
    assert len(np.unique(steps)) == S
    if S == 1000:
        np.testing.assert_array_equal(steps, np.arange(1000))
    if kind in ("linspace", "trailing") and S > 1:
        assert steps[-1] == 999 and steps[0] == (0 if kind == "linspace" else 1000 // S - 1)
    if kind == "linear" and S > 1:
        assert steps[0] == 0 and steps[-1] == (S - 1) * 1000 // S
    if kind == "leading" and S > 1:
        assert steps[0] == 0 and steps[-1] == (S - 1) * (1000 // S)


def test_quadratic_subsequence_is_denser_near_zero():
    lin, quad = ddim_timesteps(1000, 10, "linear"), ddim_timesteps(1000, 10, "quadratic")
    assert quad[1] < lin[1] and quad[-1] == 800  # 0.8 T, as in DDIM section D.2
    np.testing.assert_array_equal(lin, [0, 100, 200, 300, 400, 500, 600, 700, 800, 900])
    np.testing.assert_array_equal(ddim_timesteps(1000, 10, "linspace"),
                                  [0, 111, 222, 333, 444, 555, 666, 777, 888, 999])
