"""KID and Inception Score: closed forms, a direct sum, and torch-fidelity as an oracle."""

import math

import numpy as np
import pytest
import torch

from ddpmkit.metrics.kid_is import inception_score, kernel_inception_distance


def _features(n, d, seed, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_kid_single_subset_equals_direct_sum():
    x, y = _features(6, 3, 0), _features(6, 3, 1, shift=0.5)

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    got = kernel_inception_distance(x, y, num_subsets=1, subset_size=m)  # subsets = all points
    assert got.mean == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert got.std == 0.0


def test_kid_seed_fixes_subsets():
    x, y = _features(40, 4, 2), _features(30, 4, 3, shift=1.0)
    a = kernel_inception_distance(x, y, num_subsets=5, subset_size=10, seed=7)
    assert a == kernel_inception_distance(x, y, num_subsets=5, subset_size=10, seed=7)
    assert a != kernel_inception_distance(x, y, num_subsets=5, subset_size=10, seed=8)
    assert a.mean > 0.1  # clearly different distributions


def test_kid_matches_torch_fidelity():
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    x, y = _features(120, 32, 4), _features(100, 32, 5, shift=0.2)
    expected = metric_kid.kid_features_to_metric(
        torch.from_numpy(x), torch.from_numpy(y), kid_subsets=20, kid_subset_size=50,
        rng_seed=123, verbose=False)
    got = kernel_inception_distance(x, y, num_subsets=20, subset_size=50, seed=123)
    assert got.mean == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-10)
    assert got.std == pytest.approx(expected["kernel_inception_distance_std"], rel=1e-10)


def test_kid_subset_too_large():
    with pytest.raises(ValueError, match="subset size"):
        kernel_inception_distance(_features(5, 2, 0), _features(9, 2, 1), subset_size=6)


def test_is_closed_forms():
    # the same prediction for every image: p(y|x) = p(y), KL = 0, IS = 1
    assert inception_score(np.zeros((20, 7)), splits=2).mean == pytest.approx(1.0, abs=1e-12)
    # confident predictions of n distinct classes per split: KL = log n, IS = n
    logits = np.full((12, 12), -1e3)
    logits[np.arange(12), np.arange(12)] = 1e3
    score = inception_score(logits, splits=3)
    assert score.mean == pytest.approx(4.0, rel=1e-12) and score.std == pytest.approx(0.0)


def test_is_matches_torch_fidelity():
    metric_isc = pytest.importorskip("torch_fidelity.metric_isc")
    logits = torch.from_numpy(_features(103, 50, 6) * 3).float()
    expected = metric_isc.isc_features_to_metric(logits, splits=10, shuffle=False)
    got = inception_score(logits.numpy(), splits=10, shuffle=False)
    assert got.mean == pytest.approx(expected["inception_score_mean"], rel=1e-10)
    assert got.std == pytest.approx(expected["inception_score_std"], rel=1e-8)
    assert 1 < got.mean < 50


def test_is_needs_an_image_per_split():
    with pytest.raises(ValueError, match="split"):
        inception_score(np.zeros((3, 4)), splits=4)
    assert math.isfinite(inception_score(np.zeros((4, 4)), splits=4).mean)
