"""Same timesteps and same DDIM chains as the reference project, the DDIM authors and diffusers.

The reference (ddpm-torch) picks DDIM sub-sequences as `range(0, T, T // S)` ("linear", also the
DDIM authors' "uniform") and as round(linspace(0, sqrt(0.8 T), S)^2) in float32 torch
("quadratic"); both are written out here from their definitions. diffusers' lists come from
its DDIMScheduler itself, and its chain is run step by step with our float64 tables, so the two
chains must agree to ~1e-10.
"""

import math

import numpy as np
import pytest
import torch

from ddpmkit.diffusion import (
    DDIM_EPS_SOURCES,
    DDIM_STEP_TARGETS,
    SKIP_SCHEDULES,
    GaussianDiffusion,
    ddim_timesteps,
    get_beta_schedule,
    make_sampler,
    sample,
    solver_timesteps,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_linear(T, S):
    return np.arange(0, T, T // S)


def reference_quadratic(T, S):
    return torch.pow(torch.linspace(0, math.sqrt(T * 0.8), S), 2).round().to(torch.int64).numpy()


def ddim_authors_quadratic(T, S):
    return np.array([int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2])


# ---- linear: the reference's and the DDIM authors' spacing -------------------------------------
def test_linear_50_of_1000_is_0_20_to_980():
    assert ddim_timesteps(1000, 50, "linear").tolist() == list(range(0, 1000, 20))
    assert ddim_timesteps(1000, 10, "linear").tolist() == list(range(0, 1000, 100))
    assert ddim_timesteps(1000, 100, "linear")[-1] == 990  # not 999: t = T - 1 is not evaluated


@pytest.mark.parametrize("T", [10, 100, 1000, 4000])
def test_linear_is_the_reference_wherever_S_divides_T(T):
    divisors = [S for S in range(2, T + 1) if T % S == 0]
    for S in divisors:
        np.testing.assert_array_equal(ddim_timesteps(T, S, "linear"), reference_linear(T, S))


@pytest.mark.parametrize("T,S,expected", [
    # the reference returns 334 steps for 300 (stride 3); here stride 10/3, rounded down
    (1000, 300, [0, 3, 6, 10, 13, 16, 20]),
    (1000, 30, [0, 33, 66, 100, 133, 166, 200]),
    (10, 3, [0, 3, 6]),
    (10, 4, [0, 2, 5, 7]),
    (100, 7, [0, 14, 28, 42, 57, 71, 85]),
])
def test_linear_when_S_does_not_divide_T_keeps_the_stride_T_over_S(T, S, expected):
    steps = ddim_timesteps(T, S, "linear")
    assert len(steps) == S and len(reference_linear(T, S)) > S
    assert steps[:len(expected)].tolist() == expected
    assert steps.tolist() == [i * T // S for i in range(S)]


# ---- quadratic: the reference's, without its repeats ------------------------------------------
@pytest.mark.parametrize("T", [10, 50, 100, 250, 999, 1000, 4000])
def test_quadratic_is_the_reference_wherever_it_has_S_distinct_steps(T):
    checked = 0
    for S in range(2, T + 1):
        theirs = reference_quadratic(T, S)
        if len(np.unique(theirs)) < S:
            continue
        checked += 1
        np.testing.assert_array_equal(ddim_timesteps(T, S, "quadratic"), theirs, err_msg=str(S))
    assert checked >= 3


def test_quadratic_pinned_lists_at_T_1000():
    # S = 9 has exact .5 ties (12.5, 112.5, ...), which float32 rounds down to even here
    assert ddim_timesteps(1000, 9, "quadratic").tolist() == \
        [0, 12, 50, 112, 200, 312, 450, 612, 800]
    assert ddim_timesteps(1000, 10, "quadratic").tolist() == \
        [0, 10, 40, 89, 158, 247, 356, 484, 632, 800]
    # the DDIM authors' code rounds down instead (a documented difference)
    assert ddim_authors_quadratic(1000, 10).tolist() == \
        [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]


def test_quadratic_repeats_of_the_reference_move_up_by_one():
    theirs = reference_quadratic(1000, 50)
    assert theirs[:6].tolist() == [0, 0, 1, 3, 5, 8]  # the reference evaluates t = 0 twice
    ours = ddim_timesteps(1000, 50, "quadratic")
    assert ours[:6].tolist() == [0, 1, 2, 3, 5, 8]
    np.testing.assert_array_equal(ours[4:], theirs[4:])
    assert len(np.unique(ddim_timesteps(1000, 300, "quadratic"))) == 300


# ---- diffusers' spacings ------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("T", [37, 100, 1000])
def test_diffusers_spacings_are_diffusers_timesteps(spacing, T):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    longer = 0
    for S in range(2, T + 1, 1 if T < 1000 else 7):
        scheduler.set_timesteps(S)
        theirs = scheduler.timesteps.numpy()
        ours = ddim_timesteps(T, S, spacing)[::-1]
        if len(theirs) == S + 1:
            # np.arange's float steps sometimes give diffusers' trailing one more step, t = -1
            assert spacing == "trailing" and theirs[-1] == -1
            longer += 1
            theirs = theirs[:S]
        np.testing.assert_array_equal(ours, theirs, err_msg=f"S={S}")
    assert longer == 0 or spacing == "trailing"


def test_linspace_is_ddpmkits_former_linear_but_at_exact_ties():
    """Former `linear`: floor(x + 0.5) of linspace(0, T - 1, S); `linspace` rounds half to even
    (diffusers), which differs only where i (T - 1) / (S - 1) is exactly k + 1/2."""
    for T, S in [(1000, 50), (1000, 10), (1000, 100), (1000, 7), (50, 11)]:
        former = np.floor(np.linspace(0, T - 1, S) + 0.5).astype(np.int64)
        ours = ddim_timesteps(T, S, "linspace")
        ties = (np.linspace(0, T - 1, S) % 1) == 0.5
        np.testing.assert_array_equal(ours[~ties], former[~ties])
        np.testing.assert_array_equal(ours[ties], former[ties] - (former[ties] % 2))
    assert ddim_timesteps(1000, 7, "linspace").tolist() == [0, 166, 333, 500, 666, 832, 999]


@pytest.mark.parametrize("kind", [k for k in SKIP_SCHEDULES if k != "karras"])  # no table
def test_every_spacing_gives_exactly_S_distinct_steps(kind):
    for T in (2, 3, 10, 97, 1000):
        for S in range(1, T + 1, max(1, T // 40)):
            steps = ddim_timesteps(T, S, kind)
            assert steps.shape == (S,) and np.all(np.diff(steps) > 0)
            assert steps[0] >= 0 and steps[-1] < T
    assert ddim_timesteps(1000, 1, kind).tolist() == [999]


# ---- DPM-Solver++: its timesteps did not move ---------------------------------------------------
@pytest.mark.parametrize("T,S,expected", [
    (1000, 20, [999, 902, 809, 722, 639, 562, 490, 422, 360, 302, 250, 202, 160, 122, 90, 62,
                40, 22, 10, 2]),
    (1000, 10, [999, 809, 639, 490, 360, 250, 160, 90, 40, 10]),
    (100, 25, [99, 91, 84, 77, 70, 63, 57, 51, 46, 41, 36, 31, 27, 23, 19, 16, 13, 10, 8, 6, 5,
               4, 3, 2, 1]),
    (10, 7, [9, 7, 5, 4, 3, 2, 1]),
])
def test_dpm_solver_default_timesteps_are_pinned(T, S, expected):
    d = GaussianDiffusion(get_beta_schedule("linear", T, 1e-3, 0.2))
    assert make_sampler(d, "dpm-solver++", steps=S).timesteps.tolist() == expected
    assert solver_timesteps(T, S)[:0:-1].tolist() == expected


def test_dpm_solver_other_spacings_are_ddim_timesteps_of_S_plus_1():
    assert solver_timesteps(1000, 20, "linspace").tolist() == \
        ddim_timesteps(1000, 21, "linspace").tolist()
    d = GaussianDiffusion(get_beta_schedule("linear", 1000))
    sampler = make_sampler(d, "dpm-solver++", steps=20, skip_schedule="linspace")
    assert sampler.timesteps.tolist()[:3] == [999, 949, 899]


# ---- DDIM chains equal diffusers' DDIMScheduler -------------------------------------------------
def _fn(T):
    """A smooth, t-dependent stand-in for a network."""
    def fn(x, t):
        tt = (t.to(x.dtype) / T).view(-1, *([1] * (x.ndim - 1)))
        return 0.6 * torch.tanh(x) + 0.3 * tt - 0.1 * x * tt
    return fn


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _diffusers_chain(diffusion, spacing, S, fn, x_T, eta, noises, clip, clipped_eps,
                     mean_type="eps"):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=diffusion.T, trained_betas=diffusion.betas, clip_sample=clip,
        set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing,
        prediction_type={"eps": "epsilon", "x_0": "sample", "v": "v_prediction"}[mean_type])
    scheduler.alphas_cumprod = torch.from_numpy(diffusion.alphas_bar.copy())  # float64 tables
    scheduler.set_timesteps(S)
    assert len(scheduler.timesteps) == S
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        out = fn(x, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(out, int(t), x, eta=eta, variance_noise=noises[i],
                           use_clipped_model_output=clipped_eps).prev_sample
    return x


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("spacing,S", [("leading", 10), ("leading", 30), ("trailing", 10),
                                       ("trailing", 30), ("linspace", 10), ("linspace", 30)])
def test_ddim_chain_equals_diffusers_with_the_switches_set(spacing, S, eta, clip):
    """DDIMPipeline's defaults: clip_sample on, the network's eps after clipping
    (use_clipped_model_output False), the next step at t - T // S."""
    T = 1000
    d = GaussianDiffusion(get_beta_schedule("linear", T), "eps", "fixed-small", "mse",
                          decoder="discretized" if clip else "continuous")
    sampler = make_sampler(d, "ddim", steps=S, eta=eta, skip_schedule=spacing,
                           eps_from="model", step_to="stride")
    fn = _fn(T)
    x_T = 1.5 * _randn((2, 3, 4, 4), 0)
    noises = [_randn(x_T.shape, 100 + i) for i in range(S)]
    ours = sample(d, fn, sampler, x_T, clip_denoised=clip, noise_fn=lambda i, x: noises[i])
    theirs = _diffusers_chain(d, spacing, S, fn, x_T, eta, noises, clip, clipped_eps=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    assert (ours - x_T).abs().max() > 0.1


@pytest.mark.parametrize("mean_type", ["eps", "x_0", "v"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_clipped_eps_equals_diffusers_use_clipped_model_output(spacing, mean_type):
    T, S = 1000, 20
    d = GaussianDiffusion(get_beta_schedule("linear", T), mean_type, "fixed-small", "mse")
    fn = _fn(T)
    x_T = 2 * _randn((2, 3, 4, 4), 1)
    noises = [None] * S
    for eps_from, clipped_eps in (("clipped", True), ("model", False)):
        sampler = make_sampler(d, "ddim", steps=S, skip_schedule=spacing, eps_from=eps_from,
                               step_to="stride")
        ours = sample(d, fn, sampler, x_T, clip_denoised=True)
        theirs = _diffusers_chain(d, spacing, S, fn, x_T, 0.0, noises, True, clipped_eps,
                                  mean_type)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_the_switches_matter():
    """ddpmkit's defaults (eps from the clipped x_0, the next evaluated step) make another
    chain than diffusers' pipeline on linspace steps, where t - T // S is not the next step."""
    T, S = 1000, 10
    d = GaussianDiffusion(get_beta_schedule("linear", T), "eps", "fixed-small", "mse")
    fn = _fn(T)
    x_T = 2 * _randn((2, 3, 4, 4), 2)
    theirs = _diffusers_chain(d, "linspace", S, fn, x_T, 0.0, [None] * S, True, False)
    results = {}
    for eps_from in DDIM_EPS_SOURCES:
        for step_to in DDIM_STEP_TARGETS:
            sampler = make_sampler(d, "ddim", steps=S, skip_schedule="linspace",
                                   eps_from=eps_from, step_to=step_to)
            results[eps_from, step_to] = sample(d, fn, sampler, x_T, clip_denoised=True)
    torch.testing.assert_close(results["model", "stride"], theirs, rtol=0, atol=1e-10)
    for key in (("clipped", "next"), ("clipped", "stride"), ("model", "next")):
        assert (results[key] - theirs).abs().max() > 1e-3, key


def test_stride_targets_and_noise_on_the_last_step():
    d = GaussianDiffusion(get_beta_schedule("linear", 1000))
    sampler = make_sampler(d, "ddim", steps=10, eta=1.0, skip_schedule="linspace",
                           step_to="stride")
    assert sampler.timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert sampler.targets.tolist() == [899, 788, 677, 566, 455, 344, 233, 122, 11, -1]
    assert [sampler.needs_noise(i) for i in range(10)] == [True] * 9 + [False]
    nxt = make_sampler(d, "ddim", steps=10, eta=1.0, skip_schedule="linspace")
    assert nxt.targets.tolist() == [888, 777, 666, 555, 444, 333, 222, 111, 0, -1]
    # trailing with T / S not whole: diffusers' last step can land on t = 0, not clean data
    trailing = make_sampler(d, "ddim", steps=600, eta=1.0, skip_schedule="trailing",
                            step_to="stride")
    assert trailing.timesteps[-1] == 1 and trailing.targets[-1] == 0
    assert trailing.needs_noise(599)


def test_bad_switches_are_refused():
    d = GaussianDiffusion(get_beta_schedule("linear", 10))
    with pytest.raises(ValueError, match="clipped, model"):
        make_sampler(d, "ddim", steps=5, eps_from="raw")
    with pytest.raises(ValueError, match="next, stride"):
        make_sampler(d, "ddim", steps=5, step_to="previous")
    with pytest.raises(ValueError, match="DDIM settings"):
        make_sampler(d, "dpm-solver++", steps=5, eps_from="model")


# ---- the reference's const beta schedule --------------------------------------------------------
def test_const_schedule_is_beta_end_everywhere():
    betas = get_beta_schedule("const", 1000, beta_start=1e-4, beta_end=0.02)
    assert betas.dtype == np.float64 and betas.tolist() == [0.02] * 1000
    assert get_beta_schedule("const", 5, beta_start=0.5, beta_end=0.1).tolist() == [0.1] * 5
    with pytest.raises(ValueError, match="beta_end"):
        get_beta_schedule("const", 10, beta_end=1.0)
    d = GaussianDiffusion(get_beta_schedule("const", 100, beta_end=0.05))
    np.testing.assert_allclose(d.alphas_bar, 0.95 ** np.arange(1, 101), rtol=1e-13)
