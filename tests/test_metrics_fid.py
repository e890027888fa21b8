"""FID: closed forms, robustness to singular covariances, and pytorch-fid / torch-fidelity."""

import numpy as np
import pytest
import torch

from ddpmkit.metrics.fid import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    trace_sqrt_product,
)


def _features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def test_statistics_match_numpy_cov():
    x = _features(50, 6, 0).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError):
        feature_statistics(x[:1])


def test_diagonal_gaussians_closed_form():
    # FID(N(m1, diag a), N(m2, diag b)) = |m1 - m2|^2 + sum (sqrt a - sqrt b)^2,
    # also when some variances are zero (singular covariances)
    rng = np.random.default_rng(1)
    d = 20
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0, 3, size=d), rng.uniform(0, 3, size=d)
    a[:4] = 0.0
    b[2:6] = 0.0
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(m1, np.diag(a), m2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_scaled_identity_closed_form():
    # sigma_1 = s I: tr((s sigma_2)^(1/2)) = sqrt(s) * sum sqrt(eig(sigma_2))
    sigma_2 = np.cov(_features(40, 8, 2), rowvar=False)
    expected = np.sqrt(2.5) * np.sqrt(np.linalg.eigvalsh(sigma_2)).sum()
    assert trace_sqrt_product(2.5 * np.eye(8), sigma_2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n, d", [(200, 16), (10, 64)])  # the second: rank-deficient
def test_fid_of_a_set_with_itself_is_zero(n, d):
    x = _features(n, d, 3)
    trace = np.trace(np.cov(x, rowvar=False))
    assert abs(fid_from_features(x, x)) < 1e-12 * trace


def test_symmetric_and_positive():
    x, y = _features(100, 12, 4), _features(80, 12, 5, shift=0.3)
    assert fid_from_features(x, y) == pytest.approx(fid_from_features(y, x), rel=1e-10)
    assert fid_from_features(x, y) > 0


@pytest.mark.parametrize("n", [30, 99])
def test_near_singular_covariances_are_accurate(n):
    # fewer samples than dimensions: both covariances singular. Independent reference: with
    # centred features X_i, sigma_i = X_i^T X_i / (n_i - 1), so tr((sigma_1 sigma_2)^(1/2)) is
    # the nuclear norm of X_1 X_2^T / sqrt((n_1 - 1)(n_2 - 1)).
    x, y = _features(n, 100, 6), _features(n + 5, 100, 7, shift=0.1)
    (m1, s1), (m2, s2) = feature_statistics(x), feature_statistics(y)
    xc, yc = x - m1, y - m2
    nuclear = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((n - 1) * (n + 4))
    reference = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    assert trace_sqrt_product(s1, s2) == pytest.approx(nuclear, rel=1e-10)
    assert fid_from_features(x, y) == pytest.approx(reference, rel=1e-10)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # its sqrtm(disp=...) call
def test_matches_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    x, y = _features(500, 64, 8), _features(400, 64, 9, shift=0.2)
    (m1, s1), (m2, s2) = feature_statistics(x), feature_statistics(y)
    expected = fid_score.calculate_frechet_distance(m1, s1, m2, s2)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-6)


def test_matches_torch_fidelity():
    metric_fid = pytest.importorskip("torch_fidelity.metric_fid")
    x, y = _features(500, 64, 10), _features(400, 64, 11, shift=-0.2)
    stats_x = metric_fid.fid_features_to_statistics(torch.from_numpy(x))
    stats_y = metric_fid.fid_features_to_statistics(torch.from_numpy(y))
    expected = metric_fid.fid_statistics_to_metric(stats_x, stats_y, verbose=False)
    assert fid_from_features(x, y) == pytest.approx(
        expected["frechet_inception_distance"], rel=1e-6)


def test_shape_errors():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
