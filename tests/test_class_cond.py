"""Class conditioning and classifier-free guidance: networks, the guidance formula, label
dropout in training, the labels plan of generation, toy metrics, per-class FID."""

import hashlib

import numpy as np
import pytest
import torch
from helpers import randomize_, rel_error, tiny_config

from ddpmkit.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    get_beta_schedule,
    guidance_combine,
    make_sampler,
    sample,
)
from ddpmkit.errors import UserError
from ddpmkit.models.loading import build_from_config
from ddpmkit.models.toy import ToyMLP, timestep_embedding
from ddpmkit.models.unet import UNet, build_model


def _conditional_config(num_classes=4):
    config = tiny_config()
    config["model"]["num_classes"] = num_classes
    return config


def _keys(model):
    return "\n".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items())


def _sum(tensors):
    flat = torch.cat([t.detach().flatten() for t in tensors]).double()
    return float(flat.sum()), float(flat.abs().sum())


# ---- unconditional networks are what they were ---------------------------------------------
# Measured with the code before class conditioning existed (same seeds and inputs).
UNET_KEYS = (128, "68453cecd3aa056c4c6d9b9e00a315f34208fe8698ae40a020e74b80a43865ec")
UNET_INIT = (662.8716895627258, 9096.378589579312)
UNET_OUT = (7.325345608405769, 155.5231654671952, 1.8332515954971313)
UNET_DDIM = (-2.807058685924858, 289.75904395012185)
TOY_KEYS = (24, "bbf0e805f28aa07531446d46030c5c8471283bbcbe72be2f3f13e59e84206f5d")
TOY_INIT = (78.0273413141258, 341.95285781053826)
TOY_OUT = (-1.8503194004297256, 4.725296512246132)


def test_unconditional_unet_keeps_its_keys_weights_and_outputs():
    torch.manual_seed(0)
    model, diffusion = build_from_config(tiny_config())
    assert (len(model.state_dict()), hashlib.sha256(_keys(model).encode()).hexdigest()) \
        == UNET_KEYS
    assert _sum(model.parameters()) == pytest.approx(UNET_INIT, rel=1e-9)
    assert model.num_classes is None and not hasattr(model, "class_embed")
    randomize_(model, seed=3)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0, 7])
    with torch.no_grad():
        out = model(x, t).double()
    assert (float(out.sum()), float(out.abs().sum()), float(out[1, 2, 3, 4])) == \
        pytest.approx(UNET_OUT, rel=1e-5)
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    # linspace: the DDIM spacing called `linear` when the constant was measured
    x_0 = sample(diffusion, model.eval(),
                 make_sampler(diffusion, "ddim", steps=4, skip_schedule="linspace"), x_T)
    assert _sum([x_0]) == pytest.approx(UNET_DDIM, rel=1e-5)


def test_unconditional_toy_mlp_keeps_its_keys_weights_and_outputs():
    torch.manual_seed(0)
    toy = ToyMLP(2, 16, 2, fourier_features=4)
    assert (len(toy.state_dict()), hashlib.sha256(_keys(toy).encode()).hexdigest()) == TOY_KEYS
    assert _sum(toy.parameters()) == pytest.approx(TOY_INIT, rel=1e-9)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = toy(torch.randn(5, 2, generator=g), torch.tensor([0, 3, 3, 9, 1]))
    assert _sum([out]) == pytest.approx(TOY_OUT, rel=1e-5)


# ---- conditional networks ------------------------------------------------------------------
def test_conditional_unet_adds_one_embedding_and_keeps_the_rest():
    torch.manual_seed(0)
    plain, _ = build_from_config(tiny_config())
    torch.manual_seed(0)
    cond, _ = build_from_config(_conditional_config(4))
    plain_sd, cond_sd = plain.state_dict(), cond.state_dict()
    assert list(cond_sd) == [*plain_sd, "class_embed.weight"]
    assert cond_sd["class_embed.weight"].shape == (5, 64)  # (K + 1, 4 * hid_channels)
    for key, value in plain_sd.items():  # created last: the other weights draw as before
        assert torch.equal(value, cond_sd[key]), key


def test_conditional_unet_forward_labels_and_no_class():
    torch.manual_seed(0)
    model = randomize_(build_from_config(_conditional_config(4))[0], seed=1).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 5, 9])
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 1, 2]))
        b = model(x, t, torch.tensor([0, 3, 2]))
        none = model(x, t)
        null = model(x, t, torch.tensor([4, 4, 4]))
    assert a.shape == (3, 3, 8, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # per sample
    assert rel_error(a[1], b[1]) > 1e-3  # the label matters
    assert torch.equal(none, null)  # y None is the "no class" label K
    # The embedding is added to the time embedding: zeroing it gives the unconditional net.
    plain = UNet(3, 16, 3, [1, 2], 1, [False, True], num_groups=8)
    state = {k: v for k, v in model.state_dict().items() if k != "class_embed.weight"}
    plain.load_state_dict(state)
    with torch.no_grad():
        model.class_embed.weight.zero_()
        assert torch.allclose(model(x, t, torch.tensor([0, 1, 2])), plain.eval()(x, t),
                              atol=1e-6)


def test_labels_for_an_unconditional_network_and_bad_num_classes():
    model = UNet(3, 16, 3, [1], 1, False, num_groups=8)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([0]), torch.tensor([0]))
    assert UNet(3, 16, 3, [1], 1, False, num_groups=8, num_classes=0).num_classes is None
    config = _conditional_config(-2)
    with pytest.raises(UserError, match="num_classes"):
        build_model(config["model"], 3)
    with pytest.raises(ValueError, match="unconditional"):
        ToyMLP(2, 8, 1)(torch.randn(2, 2), torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_toy_class_path_equals_projecting_the_summed_embedding():
    """The MLP projects class embeddings once per class; the result must be that of
    temb_proj(temb + c_y) per sample (float64)."""
    torch.manual_seed(0)
    model = ToyMLP(2, 16, 2, num_classes=5).double()
    x, t, y = torch.randn(6, 2).double(), torch.tensor([0, 3, 3, 9, 1, 3]), \
        torch.tensor([0, 5, 2, 2, 4, 1])
    temb = model.temb(timestep_embedding(t, 16).double()) + model.class_embed(y)  # (B, F)
    h = model.in_fc(x)
    for layer in model.layers:
        h = layer(h, layer.temb_proj(temb))
    expected = model.out_fc(model.out_norm(h))
    assert rel_error(model(x, t, y), expected) < 1e-12


# ---- the guidance formula ------------------------------------------------------------------
class RecordingNet:
    """A float64 stand-in for a conditional network: output depends on x, t and y."""

    def __init__(self, out_channels):
        self.calls = []
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(6, out_channels, dtype=torch.float64, generator=g)

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        feats = torch.stack([x[:, 0], x[:, 1], torch.sin(x[:, 0] * (1 + y)), y.double(),
                             t.double() / 10, torch.cos(x[:, 1] * (2 + y))], dim=1)
        return feats @ self.weight


@pytest.mark.parametrize("w", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("learned", [False, True])
def test_guidance_formula_against_a_float64_reference(w, learned):
    net = RecordingNet(4 if learned else 2)
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.tensor([3, 3, 3, 3, 3])
    y = torch.tensor([0, 1, 2, 1, 0])
    guided = classifier_free_guidance(net, y, 3, w, learned_variance=learned)(x, t)
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 3))
    if learned:  # mean channels guided, log-variance channels the conditional ones
        expected = torch.cat([(1 + w) * cond[:, :2] - w * uncond[:, :2], cond[:, 2:]], dim=1)
    else:
        expected = (1 + w) * cond - w * uncond
    assert rel_error(guided, expected) < 1e-14
    batch, labels = net.calls[0]  # one network call per step: the batch doubled
    if w == 0:
        assert batch == 5 and torch.equal(labels, y)
    else:
        assert batch == 10 and torch.equal(labels, torch.tensor([0, 1, 2, 1, 0, 3, 3, 3, 3, 3]))
    with pytest.raises(ValueError, match=">= 0"):
        classifier_free_guidance(net, y, 3, -1.0)


@pytest.mark.parametrize("mean_type", ["x_0", "mean"])
def test_guiding_x_0_or_mean_outputs_guides_the_implied_eps(mean_type):
    """(1 + w) and -w sum to one, so the combination commutes with the affine maps between
    eps, x_0 and the posterior mean (float64, no clipping)."""
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 50, 1e-4, 0.2),
                                  model_mean_type=mean_type, decoder="continuous")
    x_t = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([1, 10, 30, 49])
    cond, uncond = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    w = 2.5
    eps = [diffusion.p_mean_var(o, x_t, t, clip_denoised=False).pred_eps for o in (cond, uncond)]
    guided = diffusion.p_mean_var(guidance_combine(cond, uncond, w), x_t, t,
                                  clip_denoised=False).pred_eps
    assert rel_error(guided, (1 + w) * eps[0] - w * eps[1]) < 1e-10


# ---- training: label dropout -------------------------------------------------------------
def _toy_trainer(tmp_path, class_dropout, labels=True, world_size=1, rank=0):
    from ddpmkit.data.toy import TensorBatches, make_labeled_toy_data, toy_generator
    from ddpmkit.training.trainer import Trainer

    torch.manual_seed(0)
    x, y = make_labeled_toy_data("gaussian8", 64, toy_generator(0))
    data = TensorBatches(x, 16, labels=y if labels else None)
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 10, 1e-3, 0.2),
                                  decoder="continuous")
    return Trainer(ToyMLP(2, 8, 1, num_classes=8), diffusion, data, epochs=1, progress=False,
                   class_dropout=class_dropout, world_size=world_size, rank=rank)


def test_label_dropout_replaces_labels_by_no_class_from_the_trainer_stream(tmp_path):
    seen = []
    trainer = _toy_trainer(tmp_path, 0.5)
    original = trainer.denoiser
    trainer.denoiser = lambda y: seen.append((trainer.labels.clone(), y.clone())) or original(y)
    state = trainer.generator.get_state()
    trainer.fit()
    # Replay the trainer's draws: t, noise, then one uniform per example decides the dropout.
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    dropped = 0
    for labels, y in seen:
        torch.randint(10, (16,), generator=g)
        torch.randn(16, 2, generator=g)
        u = torch.rand(16, generator=g)
        assert torch.equal(y, torch.where(u < 0.5, torch.full_like(labels, 8), labels))
        dropped += int((y == 8).sum())
    assert len(seen) == 4 and 0 < dropped < 64
    none = _toy_trainer(tmp_path, 0.0)
    plain = none.denoiser
    none.denoiser = lambda y: seen.append((none.labels.clone(), y.clone())) or plain(y)
    none.fit()
    assert all(torch.equal(labels, y) for labels, y in seen[4:])


def test_conditional_training_needs_labels_and_a_valid_rate(tmp_path):
    trainer = _toy_trainer(tmp_path, 0.1, labels=False)
    with pytest.raises(UserError, match="no labels"):
        trainer.fit()
    with pytest.raises(ValueError, match="class_dropout"):
        _toy_trainer(tmp_path, 1.0)


def test_image_label_dropout_is_drawn_for_the_global_batch():
    """Two processes' slots of the global draws are exactly one process's draws."""
    from ddpmkit.training.images import ImageTrainer

    def draws(rank, world):
        trainer = ImageTrainer.__new__(ImageTrainer)
        trainer.global_batch, trainer.micro_batch = 8, 8 // world
        trainer.world_size, trainer.rank, trainer.micro_index = world, rank, 0
        trainer.device, trainer.num_classes = torch.device("cpu"), 3
        trainer.diffusion = GaussianDiffusion(get_beta_schedule("linear", 10, 1e-3, 0.2))
        trainer.generator = torch.Generator().manual_seed(7)
        return trainer._draw(torch.Size([8 // world, 1, 4, 4]))["drop"][trainer._slots()]

    one = draws(0, 1)
    two = torch.empty(8)
    two[0::2], two[1::2] = draws(0, 2), draws(1, 2)
    assert torch.equal(one, two)


# ---- generation: the labels plan ---------------------------------------------------------
def test_class_labels_plan():
    from ddpmkit.sampling import class_grid_indices, class_labels

    every = class_labels(3)
    assert every.classes == (0, 1, 2) and every.of([0, 1, 2, 3, 7]) == [0, 1, 2, 0, 1]
    picked = class_labels(10, ["7", "cat", " 2"], names=[str(i) for i in range(3)] +
                          ["cat"] + [str(i) for i in range(4, 10)])
    assert picked.classes == (7, 3, 2) and picked.of(range(4)) == [7, 3, 2, 7]
    assert "mod 3" in picked.rule
    for bad, message in ((["10"], "out of range"), (["-1"], "out of range"),
                         (["dog"], "not a number")):
        with pytest.raises(UserError, match=message):
            class_labels(10, bad)
    assert class_grid_indices(3, 9, 100) == ([0, 3, 6, 1, 4, 7, 2, 5, 8], 3)
    assert class_grid_indices(3, 64, 7) == ([0, 3, 1, 4, 2, 5], 2)  # index 6 + 3 > 7
    assert class_grid_indices(3, 64, 2) == ([0, 1], 1)


def test_labels_file_round_trip(tmp_path):
    from ddpmkit.sampling import class_labels, read_labels_file, write_labels_file

    path = write_labels_file(str(tmp_path), class_labels(3, ["2", "0"]), 5,
                             names=["a,b", 'say "c"', "d"])
    assert open(path).read().splitlines() == [
        "file,label,class", '000000.png,2,d', '000001.png,0,"a,b"', '000002.png,2,d',
        '000003.png,0,"a,b"', '000004.png,2,d']
    by_file, names = read_labels_file(str(tmp_path))
    assert by_file == {"000000.png": 2, "000001.png": 0, "000002.png": 2, "000003.png": 0,
                       "000004.png": 2}
    assert names == {2: "d", 0: "a,b"}
    write_labels_file(str(tmp_path), class_labels(3), 1, names=['say "c"'] * 3)
    assert read_labels_file(str(tmp_path))[1] == {0: 'say "c"'}
    assert read_labels_file(str(tmp_path / "none")) is None


def test_guided_sampling_is_per_sample_whatever_the_batch(one_thread):
    from ddpmkit.sampling import Guidance, class_labels, sample_indexed

    torch.manual_seed(0)
    model, diffusion = build_from_config(_conditional_config(3))
    model = randomize_(model, seed=2).eval()
    sampler = make_sampler(diffusion, "ddim", steps=3, eta=1.0)
    guidance = Guidance(model, class_labels(3), 2.0)
    whole = sample_indexed(diffusion, guidance, sampler, range(5), (3, 8, 8), 0, "cpu")
    parts = torch.cat([sample_indexed(diffusion, guidance, sampler, idx, (3, 8, 8), 0, "cpu")
                       for idx in ([3, 4], [0], [1, 2])])
    parts = parts[torch.tensor([2, 3, 4, 0, 1])]  # rows back in index order 0..4
    # Equal up to float rounding: CPU convolution kernels differ with the batch size (as for
    # unconditional sampling; the PNGs come out the same, see the generate CLI test).
    assert (whole - parts).abs().max() < 1e-4
    assert (whole[:3] - whole[3:].repeat(2, 1, 1, 1)[:3]).abs().max() > 0.1  # not all alike
    # sample i asked for class i mod 3 with guidance 2: the same as guiding by hand.
    from ddpmkit.sampling import IndexedNoise

    noise = IndexedNoise(0)
    idx = torch.tensor([4])
    x_T = noise.normal(idx, 0, (3, 8, 8))
    fn = classifier_free_guidance(model, torch.tensor([1]), 3, 2.0)
    by_hand = sample(diffusion, fn, sampler, x_T, noise_fn=noise.step_noise_fn(idx))
    assert (by_hand[0] - whole[4]).abs().max() < 1e-4


def test_bf16_guided_denoiser_follows_fp32(one_thread):
    from ddpmkit.sampling import Guidance, class_labels, make_denoise_fn

    torch.manual_seed(0)
    model = randomize_(build_from_config(_conditional_config(3))[0], seed=2).eval()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([2, 2, 2, 2])
    outs = []
    for precision in ("fp32", "bf16"):
        net = make_denoise_fn(model, precision, "cpu")
        guided = Guidance(net, class_labels(3), 1.5).bind([0, 1, 2, 3], "cpu")
        with torch.no_grad():
            outs.append(guided(x, t))
    assert outs[1].dtype == torch.float32
    assert rel_error(outs[1], outs[0]) < 3e-2


@pytest.mark.slow
def test_compiled_guided_denoiser_equals_eager(one_thread):
    from ddpmkit.sampling import Guidance, class_labels, make_denoise_fn

    torch.manual_seed(0)
    model = randomize_(build_from_config(_conditional_config(3))[0], seed=2).eval()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([2, 2, 2, 2])
    eager = Guidance(model, class_labels(3), 1.5).bind([0, 1, 2, 3], "cpu")
    net = make_denoise_fn(model, "fp32", "cpu", compile_model=True)
    with torch.no_grad():
        expected = eager(x, t)
        for indices in ([0, 1, 2, 3], [1, 2, 0, 1]):  # new labels: no recompile, new result
            got = Guidance(net, class_labels(3), 1.5).bind(indices, "cpu")(x, t)
            want = Guidance(model, class_labels(3), 1.5).bind(indices, "cpu")(x, t)
            assert rel_error(got, want) < 1e-5
    assert rel_error(Guidance(net, class_labels(3), 1.5).bind([0, 1, 2, 3], "cpu")(x, t),
                     expected) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_guided_denoiser_takes_new_labels_each_call():
    from ddpmkit.sampling import Guidance, class_labels, make_denoise_fn

    torch.manual_seed(0)
    model = randomize_(build_from_config(_conditional_config(3))[0], seed=2).cuda().eval()
    x, t = torch.randn(4, 3, 8, 8, device="cuda"), torch.full((4,), 2, device="cuda")
    graphed = make_denoise_fn(model, "bf16", "cuda", cuda_graph=True)
    plain = make_denoise_fn(model, "bf16", "cuda")
    for indices in ([0, 1, 2, 0], [2, 2, 1, 0]):
        got = Guidance(graphed, class_labels(3), 1.5).bind(indices, "cuda")(x, t)
        want = Guidance(plain, class_labels(3), 1.5).bind(indices, "cuda")(x, t)
        assert rel_error(got, want) < 1e-2
    assert graphed.num_graphs == 1


# ---- metrics ---------------------------------------------------------------------------------
def test_requested_mode_share():
    from ddpmkit.metrics.toy import requested_mode_stats

    modes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    points = torch.tensor([[0.05, 0.0], [1.0, 0.2], [0.0, 1.0], [0.0, 0.0], [float("nan"), 0]])
    labels = [0, 1, 2, 1, 2]  # the 4th sits on mode 0 but was asked for mode 1; the 5th diverged
    stats = requested_mode_stats(points, labels, modes, std=0.1)  # within 0.3
    assert stats["on_requested_mode"] == pytest.approx(3 / 5)
    assert stats["worst_requested_mode"] == pytest.approx(1 / 2)


def test_per_class_fid_is_fid_of_each_class_subset():
    from ddpmkit.metrics.evaluate import per_class_fid
    from ddpmkit.metrics.fid import fid_from_features
    from ddpmkit.metrics.stats import stats_from_features

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(30, 6)).astype(np.float32)
    ref_labels = np.arange(30) % 3
    samples = (rng.normal(size=(12, 6)) + 0.3).astype(np.float32)
    labels = np.arange(12) % 3
    stats = stats_from_features(ref, "x", "toy/train", (8, 8), labels=ref_labels)
    results = per_class_fid(samples, labels, stats)
    for k in range(3):
        expected = fid_from_features(samples[labels == k], ref[ref_labels == k])
        assert results[f"fid_class_{k}"] == pytest.approx(expected, rel=1e-6)
    assert results["fid_class_mean"] == pytest.approx(
        np.mean([results[f"fid_class_{k}"] for k in range(3)]))
    no_labels = stats_from_features(ref, "x", "toy/train", (8, 8))
    with pytest.raises(ValueError, match="no labels"):
        per_class_fid(samples, labels, no_labels)


def test_reference_labels_survive_the_cache(tmp_path):
    from ddpmkit.metrics.stats import (
        load_reference_stats,
        save_reference_stats,
        stale_reason,
        stats_from_features,
    )

    features = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    path = str(tmp_path / "s.npz")
    save_reference_stats(stats_from_features(features, "x", "s", (8, 8), labels=[0, 1, 0, 1, 1]),
                         path)
    loaded = load_reference_stats(path)
    assert loaded.labels.tolist() == [0, 1, 0, 1, 1]
    save_reference_stats(stats_from_features(features, "x", "s", (8, 8)), path)
    old = load_reference_stats(path)
    assert old.labels is None
    assert stale_reason(old, "x", "s", 5) is None
    assert "labels" in stale_reason(old, "x", "s", 5, need_labels=True)
