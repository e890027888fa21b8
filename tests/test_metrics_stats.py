"""Reference statistics cache, image sources, and `compute_metrics`."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.errors import UserError
from ddpmkit.metrics.evaluate import compute_metrics
from ddpmkit.metrics.fid import fid_from_features
from ddpmkit.metrics.folder import (
    choose_subset,
    dataset_batches,
    folder_batches,
    list_images,
)
from ddpmkit.metrics.inception import (
    FIDInceptionV3,
    InceptionFeatures,
    randomize_weights_,
)
from ddpmkit.metrics.stats import (
    load_or_compute_reference_stats,
    load_reference_stats,
    reference_stats_path,
    save_reference_stats,
    stale_reason,
    stats_from_features,
)
from ddpmkit.utils.images import quantize


@pytest.fixture(scope="module")
def model():
    m = randomize_weights_(FIDInceptionV3(), torch.Generator().manual_seed(1))
    m.identity = "test-extractor"
    return m.eval().requires_grad_(False)


def _uint8(n, size=8, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _fake_features(n, seed, shift=0.0, d=16):
    rng = np.random.default_rng(seed)
    return InceptionFeatures(pool=(rng.normal(size=(n, d)) + shift).astype(np.float32),
                             logits_unbiased=rng.normal(size=(n, 10)).astype(np.float32))


def _stats(features, **kw):
    args = {"extractor_id": "x", "source": "s", "image_size": (8, 8)}
    args.update(kw)
    return stats_from_features(features.pool, **args)


# ----------------------------------------------------------------------------- cache file

def test_save_load_round_trip(tmp_path):
    stats = _stats(_fake_features(12, 0), image_size=(32, 28))
    path = str(tmp_path / "sub" / "ref.npz")
    save_reference_stats(stats, path)
    loaded = load_reference_stats(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert (loaded.num_images, loaded.extractor_id, loaded.source, loaded.image_size) == \
        (12, "x", "s", (32, 28))
    assert [f for f in os.listdir(tmp_path / "sub")] == ["ref.npz"]  # no temp file left


def test_unreadable_cache_is_user_error(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="delete it"):
        load_reference_stats(str(path))
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(UserError, match="missing"):
        load_reference_stats(str(tmp_path / "other.npz"))


def test_stale_reasons():
    stats = _stats(_fake_features(5, 0))
    assert stale_reason(stats, "x", "s", 5) is None
    assert stale_reason(stats, "x", "s", None) is None
    assert "extractor" in stale_reason(stats, "y", "s", 5)
    assert "images" in stale_reason(stats, "x", "s", 6)
    assert "made from" in stale_reason(stats, "x", "t", 5)


def test_load_or_compute_uses_and_refreshes_the_cache(model, tmp_path):
    images = torch.from_numpy(_uint8(3)).permute(0, 3, 1, 2)
    calls = []

    def make_batches():
        calls.append(1)
        return [images]

    path = str(tmp_path / "ref.npz")
    first = load_or_compute_reference_stats(path, model, make_batches, "toy/train", 3)
    assert len(calls) == 1 and first.num_images == 3 and first.image_size == (8, 8)
    assert first.extractor_id == "test-extractor" and first.features.shape == (3, 2048)
    assert first.sigma.shape == (2048, 2048) and first.mu.dtype == np.float64
    again = load_or_compute_reference_stats(path, model, make_batches, "toy/train", 3)
    assert len(calls) == 1  # served from the cache
    np.testing.assert_array_equal(again.features, first.features)
    # the source now has a different number of images: stale, recomputed (and found wrong)
    with pytest.raises(UserError, match="should have 4 images"):
        load_or_compute_reference_stats(path, model, make_batches, "toy/train", 4)
    assert len(calls) == 2
    # another extractor: stale, recomputed and rewritten
    model.identity = "other-extractor"
    try:
        load_or_compute_reference_stats(path, model, make_batches, "toy/train", 3)
    finally:
        model.identity = "test-extractor"
    assert len(calls) == 3
    assert load_reference_stats(path).extractor_id == "other-extractor"


def test_tf32_statistics_have_their_own_cache_file(tmp_path):
    strict = reference_stats_path(str(tmp_path), "cifar10", "train")
    tf32 = reference_stats_path(str(tmp_path), "cifar10", "train", tf32=True)
    assert strict.endswith("inception_cifar10_train.npz") and tf32 != strict
    assert os.path.dirname(tf32) == os.path.dirname(strict)


# ----------------------------------------------------------------------------- image sources

def test_folder_batches(tmp_path):
    for i, array in enumerate(_uint8(5, size=6, seed=2)):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert len(list_images(str(tmp_path))) == 5
    batches = list(folder_batches(str(tmp_path), batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, 6, 6), (2, 3, 6, 6), (1, 3, 6, 6)]
    assert batches[0].dtype == torch.uint8
    np.testing.assert_array_equal(batches[0][0].permute(1, 2, 0).numpy(), _uint8(5, 6, 2)[0])
    subset = torch.cat(list(folder_batches(str(tmp_path), 8, max_images=3, seed=0)))
    assert subset.shape[0] == 3


def test_folder_grey_and_mixed_sizes(tmp_path):
    Image.fromarray(_uint8(1, 5, channels=1)[0, :, :, 0]).save(tmp_path / "a.png")
    (batch,) = folder_batches(str(tmp_path), 4)
    assert batch.shape == (1, 3, 5, 5) and torch.equal(batch[0, 0], batch[0, 2])
    Image.fromarray(_uint8(1, 7)[0]).save(tmp_path / "b.png")
    with pytest.raises(UserError, match="different sizes"):
        list(folder_batches(str(tmp_path), 4))
    with pytest.raises(UserError, match="does not exist"):
        list_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        list_images(str(tmp_path / "empty"))


def test_quantize_inverts_the_dataset_scaling():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = u.float() / 127.5 - 1.0
    assert torch.equal(quantize(x), u)
    assert torch.equal(quantize(u), u)


def test_dataset_batches_take_images_of_pairs():
    u = torch.from_numpy(_uint8(5)).permute(0, 3, 1, 2)
    dataset = torch.utils.data.TensorDataset(u.float() / 127.5 - 1, torch.zeros(5))
    batches = list(dataset_batches(dataset, batch_size=2))
    assert torch.equal(torch.cat(batches), u)


def test_choose_subset_is_fixed_by_seed():
    a = choose_subset(100, 10, seed=3)
    assert np.array_equal(a, choose_subset(100, 10, seed=3)) and np.all(np.diff(a) > 0)
    assert choose_subset(10, 10, seed=3) is None and choose_subset(10, None, seed=3) is None


# ----------------------------------------------------------------------------- compute_metrics

def test_compute_metrics_all():
    samples, real = _fake_features(40, 1), _fake_features(50, 2, shift=0.1)
    ref = _stats(real)
    results = compute_metrics(samples, ref, metrics=["fid", "pr", "kid", "is"], nhood_size=3,
                              kid_subsets=3, kid_subset_size=20, is_splits=2)
    assert list(results) == ["fid", "precision", "recall", "kid_mean", "kid_std", "is_mean",
                             "is_std"]
    assert results["fid"] == pytest.approx(fid_from_features(samples.pool, real.pool), rel=1e-12)
    assert all(isinstance(v, float) for v in results.values())
    same = compute_metrics(real, ref, metrics=["fid", "pr"])
    assert abs(same["fid"]) < 1e-9 and same["precision"] == same["recall"] == 1.0


def test_compute_metrics_reference_subset_for_pr():
    samples, real = _fake_features(10, 3), _fake_features(30, 4)
    ref = _stats(real)
    full = compute_metrics(samples, ref, ["pr"], nhood_size=2)
    sub = compute_metrics(samples, ref, ["pr"], nhood_size=2, pr_reference_size=10, seed=5)
    picked = choose_subset(30, 10, seed=5)
    expected = compute_metrics(samples, _stats(InceptionFeatures(real.pool[picked], None)),
                               ["pr"], nhood_size=2)
    assert sub == expected and sub != full


def test_compute_metrics_errors():
    samples = _fake_features(20, 0)
    assert set(compute_metrics(samples, None, ["is"], is_splits=2)) == {"is_mean", "is_std"}
    with pytest.raises(ValueError, match="reference"):
        compute_metrics(samples, None, ["fid"])
    with pytest.raises(ValueError, match="unknown"):
        compute_metrics(samples, _stats(samples), ["bpd"])
