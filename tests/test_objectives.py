"""Training objectives: v-prediction, min-SNR weights, zero terminal SNR.

Closed-form identities in float64 (v <-> eps <-> x_0, the paper's weights, equivalent networks
giving the same samples, bits/dim and guidance whatever they predict) and parity with diffusers
(`rescale_zero_terminal_snr`, DDIMScheduler with v_prediction at zero terminal SNR).
"""

import math

import numpy as np
import pytest
import torch

from ddpmkit.build import build_diffusion
from ddpmkit.choices import SAMPLERS
from ddpmkit.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    get_beta_schedule,
    make_sampler,
    rescale_zero_terminal_snr,
    sample,
)
from ddpmkit.diffusion.functions import mean_flat

pytestmark = pytest.mark.usefixtures("one_thread")

T = 40
GAMMA = 5.0


def _betas(zero_snr=False, T=T):
    betas = get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2)
    return rescale_zero_terminal_snr(betas) if zero_snr else betas


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _col(table, t, ndim=4):
    return torch.as_tensor(table, dtype=torch.float64)[t].view(-1, *([1] * (ndim - 1)))


def eps_net(x_t, t):
    """A smooth stand-in network: an eps prediction for (x_t, t), (B, C, H, W)."""
    return 0.6 * torch.tanh(x_t) + 0.02 * torch.sin(3 * x_t + t.view(-1, 1, 1, 1))


def as_mean_type(diffusion, mean_type, net=eps_net):
    """The network that predicts, as `mean_type`, exactly what `net`'s eps implies (float64,
    from the paper's definitions, not from the code under test)."""
    ab = diffusion.alphas_bar

    def fn(x_t, t):
        eps = net(x_t, t)
        a, s = _col(np.sqrt(ab), t), _col(np.sqrt(1 - ab), t)
        x_0 = (x_t - s * eps) / a
        return {"eps": eps, "x_0": x_0, "v": a * eps - s * x_0}[mean_type]
    return fn


# ---- closed-form identities ---------------------------------------------------------------
@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_eps_x_0_round_trips(zero_snr):
    d = GaussianDiffusion(_betas(zero_snr), "v", "fixed-small")
    x_0, eps = _randn((6, 2, 3, 3), 0), _randn((6, 2, 3, 3), 1)
    t = torch.tensor([0, 1, 10, 20, T - 2, T - 1])
    x_t = d.q_sample(x_0, t, eps)
    v = d.v_target(x_0, t, eps)
    a, s = _col(np.sqrt(d.alphas_bar), t), _col(np.sqrt(1 - d.alphas_bar), t)
    torch.testing.assert_close(v, a * eps - s * x_0, rtol=0, atol=1e-15)  # the definition
    pred = d.predict(v, x_t, t, clip_denoised=False)
    torch.testing.assert_close(pred.x_0, x_0, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.eps, eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(d.pred_eps_from_x_0(x_t, t, x_0), eps, rtol=0, atol=1e-12)
    if zero_snr:  # no signal at t = T-1: x_0 = -v and eps = x_t, exactly
        assert torch.equal(pred.x_0[-1], -v[-1]) and torch.equal(pred.eps[-1], x_t[-1])


def _paper_weight(mean_type, snr, gamma):
    """Hang et al. 2023, eq. 7-9 (and eq. 7 over coef1^2 for the posterior mean)."""
    return {"eps": np.minimum(snr, gamma) / snr, "x_0": np.minimum(snr, gamma),
            "v": np.minimum(snr, gamma) / (snr + 1)}[mean_type]


@pytest.mark.parametrize("mean_type", ["eps", "x_0", "v"])
def test_min_snr_weights_are_the_papers(mean_type):
    betas = _betas()
    d = GaussianDiffusion(betas, mean_type, loss_weight="min-snr", min_snr_gamma=GAMMA)
    ab = np.cumprod(1 - betas)
    snr = ab / (1 - ab)
    assert snr.min() < GAMMA < snr.max()  # both branches of the min are exercised
    np.testing.assert_allclose(d.tables["min_snr_weight"], _paper_weight(mean_type, snr, GAMMA),
                               rtol=1e-14)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_min_snr_makes_every_parameterisation_the_same_x_0_loss(zero_snr):
    """Predictions that imply the same x_0^ get the loss min(SNR, gamma) |x_0 - x_0^|^2 from
    every mean type (eps is left out at zero terminal SNR, where it is refused)."""
    betas = _betas(zero_snr)
    x_0, noise = _randn((5, 2, 3, 3), 2), _randn((5, 2, 3, 3), 3)
    t = torch.tensor([0, 3, 17, T - 2, T - 1])
    x_0_hat = x_0 + 0.1 * _randn(x_0.shape, 4)
    ab = np.cumprod(1 - betas)
    snr = _col(ab / (1 - ab), t, 1)
    expected = torch.minimum(snr, torch.tensor(GAMMA)) * mean_flat((x_0_hat - x_0) ** 2)
    for mean_type in ("x_0", "v", "mean") + (() if zero_snr else ("eps",)):
        d = GaussianDiffusion(betas, mean_type, loss_weight="min-snr", min_snr_gamma=GAMMA)
        x_t = d.q_sample(x_0, t, noise)
        out = {"x_0": x_0_hat, "eps": d.pred_eps_from_x_0(x_t, t, x_0_hat),
               "v": d.v_target(x_0_hat, t, d.pred_eps_from_x_0(x_t, t, x_0_hat)),
               "mean": d.q_posterior(x_0_hat, x_t, t).mean}[mean_type]
        loss = d.loss_from_output(out, x_0, x_t, t, noise)
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-14)
    if zero_snr:
        assert expected[-1] == 0  # SNR 0: x_0 at t = T-1 carries no weight


@pytest.mark.parametrize("mean_type", ["eps", "x_0", "mean", "v"])
def test_uniform_weight_is_the_unweighted_mse_bit_for_bit(mean_type):
    """`uniform` (the default) is the DDPM loss as it was: mean over dims of (out - target)^2,
    no multiplication by a weight (float32, as training runs)."""
    d = GaussianDiffusion(_betas(), mean_type, "fixed-large", "mse")
    explicit = GaussianDiffusion(_betas(), mean_type, "fixed-large", "mse", loss_weight="uniform")
    x_0 = _randn((4, 2, 3, 3), 5).float().clamp(-1, 1)
    noise = _randn((4, 2, 3, 3), 6).float()
    t = torch.tensor([0, 7, 19, 39])
    x_t = d.q_sample(x_0, t, noise)
    target = {"eps": noise, "x_0": x_0, "mean": d.q_posterior(x_0, x_t, t).mean,
              "v": d.v_target(x_0, t, noise)}[mean_type]
    expected = mean_flat((eps_net(x_t, t) - target) ** 2)
    for diffusion in (d, explicit):
        loss = diffusion.training_losses(eps_net, x_0, t, noise)
        assert loss.dtype == torch.float32 and torch.equal(loss, expected)


# ---- one model, any parameterisation ----------------------------------------------------------
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("mean_type", ["x_0", "v"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_gives_the_same_samples_for_any_parameterisation(name, mean_type, clip):
    """An eps network and the x_0 / v network that predicts the same thing sample the same
    images with every sampler (each reads the output through `GaussianDiffusion.predict`)."""
    x_T = _randn((2, 2, 4, 4), 7)
    results = []
    for m in ("eps", mean_type):
        d = GaussianDiffusion(_betas(), m, "fixed-small")
        results.append(sample(d, as_mean_type(d, m), make_sampler(d, name), x_T,
                              clip_denoised=clip, generator=torch.Generator().manual_seed(8)))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-10)
    assert (results[0] - x_T).abs().max() > 0.1


@pytest.mark.parametrize("var_type", ["fixed-small", "fixed-large"])
def test_bits_per_dim_of_a_v_network_equal_its_eps_twin(var_type):
    x_0 = (torch.randint(0, 256, (3, 2, 4, 4), generator=torch.Generator().manual_seed(9))
           .double() / 127.5 - 1)
    results = []
    for m in ("eps", "v"):
        d = GaussianDiffusion(_betas(), m, var_type)
        results.append(d.bpd(as_mean_type(d, m), x_0, generator=torch.Generator().manual_seed(1)))
    for name in ("total", "prior", "terms", "x_0_mse"):
        torch.testing.assert_close(getattr(results[1], name), getattr(results[0], name),
                                   rtol=1e-9, atol=1e-10)


def test_guiding_a_v_network_is_guiding_its_eps():
    """Ho & Salimans eq. 6 on eps, and the same formula on the raw v output, give the same
    x_0 and eps (v is affine in eps at fixed x_t, t)."""
    d_eps = GaussianDiffusion(_betas(), "eps", "fixed-small")
    d_v = GaussianDiffusion(_betas(), "v", "fixed-small")

    def cond_net(x_t, t, y):  # labels 0..2, label 3 = "no class"
        return eps_net(x_t, t) + 0.1 * y.view(-1, 1, 1, 1) * torch.cos(x_t)

    def v_cond_net(x_t, t, y):
        return as_mean_type(d_v, "v", lambda x, s: cond_net(x, s, y))(x_t, t)

    x_t, t, y = _randn((3, 2, 3, 3), 10), torch.tensor([2, 20, 35]), torch.tensor([0, 1, 2])
    guided_eps = classifier_free_guidance(cond_net, y, 3, 2.0)(x_t, t)
    guided_v = classifier_free_guidance(v_cond_net, y, 3, 2.0)(x_t, t)
    pred = d_v.predict(guided_v, x_t, t, clip_denoised=False)
    torch.testing.assert_close(pred.eps, guided_eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.x_0, d_eps.predict(guided_eps, x_t, t, False).x_0,
                               rtol=0, atol=1e-12)


# ---- zero terminal SNR ------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,T_", [("linear", 1000), ("quad", 1000), ("cosine", 100),
                                         ("linear", 10)])
def test_rescale_zero_terminal_snr_matches_diffusers(schedule, T_):
    diffusers_ddim = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    betas = get_beta_schedule(schedule, T_)
    ours = rescale_zero_terminal_snr(betas)
    theirs = diffusers_ddim.rescale_zero_terminal_snr(torch.from_numpy(betas.copy())).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    ab, ab_before = np.cumprod(1 - ours), np.cumprod(1 - betas)
    assert ours[-1] == 1 and ab[-1] == 0  # Lin et al.: SNR exactly 0 at t = T-1
    assert math.isclose(ab[0], ab_before[0], rel_tol=1e-13) and np.all(np.diff(ab) < 0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_v_at_zero_terminal_snr_matches_diffusers(eta):
    """Lin et al.'s setting: v_prediction, rescaled betas, trailing steps from t = T-1, where
    alphas_bar = 0; float64 tables on both sides."""
    diffusers = pytest.importorskip("diffusers")
    T_, S = 1000, 10
    d = GaussianDiffusion(_betas(True, T_), "v", "fixed-small", decoder="continuous")
    theirs = diffusers.DDIMScheduler(
        num_train_timesteps=T_, trained_betas=_betas(False, T_), rescale_betas_zero_snr=True,
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing",
        prediction_type="v_prediction")
    theirs.alphas_cumprod = torch.from_numpy(d.alphas_bar.copy())
    theirs.set_timesteps(S)
    sampler = make_sampler(d, "ddim", steps=S, eta=eta, skip_schedule="trailing",
                           eps_from="model", step_to="stride")
    np.testing.assert_array_equal(theirs.timesteps.numpy(), sampler.timesteps)
    assert sampler.timesteps[0] == T_ - 1
    net = as_mean_type(GaussianDiffusion(_betas(False, T_), "v"), "v")  # any smooth v network
    noises = [_randn((2, 2, 3, 3), 100 + i) for i in range(S)]
    x_T = _randn((2, 2, 3, 3), 11)
    ours = sample(d, net, sampler, x_T, noise_fn=lambda i, x: noises[i])
    x = x_T
    for i, t in enumerate(theirs.timesteps):
        x = theirs.step(net(x, torch.full((2,), int(t))), int(t), x, eta=eta,
                        variance_noise=noises[i]).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)
    assert torch.isfinite(ours).all() and (ours - x_T).abs().max() > 0.1


@pytest.mark.parametrize("var_type,loss_type", [("fixed-small", "mse"), ("fixed-large", "mse"),
                                                ("learned", "kl")])
@pytest.mark.parametrize("mean_type", ["x_0", "mean", "v"])
def test_zero_terminal_snr_samples_and_bounds_are_finite(mean_type, var_type, loss_type):
    d = GaussianDiffusion(_betas(True), mean_type, var_type, loss_type)
    assert d.zero_terminal_snr and d.alphas_bar[-1] == 0

    def net(x_t, t):
        out = as_mean_type(GaussianDiffusion(_betas(), "x_0"), "x_0")(x_t, t).clamp(-1, 1)
        if mean_type == "v":
            out = d.v_target(out, t, d.pred_eps_from_x_0(x_t, t, out))
        elif mean_type == "mean":
            out = d.q_posterior(out, x_t, t).mean
        return torch.cat([out, -2 + 0 * out], 1) if var_type == "learned" else out

    x_T = _randn((2, 2, 4, 4), 12)
    for name in SAMPLERS:
        if var_type == "learned" and name != "ddpm":
            continue  # the deterministic samplers use no variance
        x = sample(d, net, make_sampler(d, name), x_T, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all(), name
    x_0 = _randn((2, 2, 4, 4), 13).clamp(-1, 1)
    result = d.bpd(net, x_0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(result.prior, torch.zeros(2, dtype=torch.float64))  # q(x_T|x_0) = N(0, I)
    assert torch.isfinite(result.total).all()
    if var_type == "fixed-large":  # beta_{T-1} = 1 is the variance of x_T itself
        t = torch.full((2,), T - 1)
        assert torch.equal(d.p_mean_var(net(x_T, t), x_T, t).var, torch.ones_like(x_T))


@pytest.mark.parametrize("kwargs,needle", [
    ({"betas": _betas(True), "model_mean_type": "eps"}, "zero terminal SNR"),
    ({"loss_type": "kl", "loss_weight": "min-snr"}, "kl"),
    ({"loss_weight": "min-snr", "min_snr_gamma": 0.0}, "gamma"),
    ({"loss_weight": "min-snr", "min_snr_gamma": float("nan")}, "gamma"),
    ({"loss_weight": "snr"}, "min-snr"),
    ({"betas": np.append(1.0, _betas()[1:])}, "the last may be 1"),
])
def test_ill_defined_objectives_are_refused(kwargs, needle):
    kwargs = {"betas": _betas(), **kwargs}
    with pytest.raises(ValueError, match=needle):
        GaussianDiffusion(**kwargs)


def test_configs_without_the_objective_keys_build_the_old_diffusion():
    old = build_diffusion({"timesteps": 20, "model_mean_type": "eps"})
    assert (old.loss_weight, old.zero_terminal_snr) == ("uniform", False)
    new = build_diffusion({"timesteps": 20, "model_mean_type": "v", "loss_weight": "min-snr",
                           "min_snr_gamma": 3.0, "zero_terminal_snr": True})
    assert (new.model_mean_type, new.min_snr_gamma, new.alphas_bar[-1]) == ("v", 3.0, 0.0)
    np.testing.assert_allclose(new.betas, rescale_zero_terminal_snr(old.betas), rtol=0, atol=0)
