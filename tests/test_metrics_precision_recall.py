"""Improved precision/recall: limits, brute force, batching, and prdc as an oracle."""

import numpy as np
import pytest
import torch

from ddpmkit.metrics.precision_recall import knn_radii, precision_recall


def _points(n, d, seed, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) + shift


def test_identical_sets_score_one():
    x = _points(60, 8, 0)
    assert precision_recall(x, x.copy(), nhood_size=3) == (1.0, 1.0)


def test_far_apart_sets_score_zero():
    assert precision_recall(_points(50, 8, 1), _points(40, 8, 2, shift=100.0)) == (0.0, 0.0)


def test_radii_match_brute_force():
    x = _points(70, 5, 3).astype(np.float64)
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    expected = np.sort(dist, axis=1)[:, 3]  # column 0 is the point itself
    got = knn_radii(x, nhood_size=3, row_batch_size=16, col_batch_size=9, dtype=torch.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_brute_force_definition():
    real, fake = _points(80, 4, 4), _points(60, 4, 5, shift=0.5)
    k = 3

    def inside(probes, support):
        d_ss = np.sqrt(((support[:, None] - support[None]) ** 2).sum(-1))
        radii = np.sort(d_ss, axis=1)[:, k]
        d_ps = np.sqrt(((probes[:, None] - support[None]) ** 2).sum(-1))
        return (d_ps <= radii[None]).any(1).mean()

    r64, f64 = real.astype(np.float64), fake.astype(np.float64)
    got = precision_recall(real, fake, nhood_size=k, dtype=torch.float64)
    assert got.precision == pytest.approx(inside(f64, r64), abs=1e-12)
    assert got.recall == pytest.approx(inside(r64, f64), abs=1e-12)
    assert 0 < got.precision < 1 and 0 < got.recall < 1


@pytest.mark.parametrize("rows, cols", [(7, 5), (1, 1000), (1000, 3)])
def test_batch_sizes_do_not_change_the_result(rows, cols):
    real, fake = _points(45, 6, 6), _points(38, 6, 7, shift=0.4)
    full = precision_recall(real, fake, nhood_size=2)
    assert precision_recall(real, fake, nhood_size=2, row_batch_size=rows,
                            col_batch_size=cols) == full


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_prdc(k, capsys):
    prdc = pytest.importorskip("prdc")
    real, fake = _points(200, 16, 8), _points(150, 16, 9, shift=0.3)
    expected = prdc.compute_prdc(real.astype(np.float64), fake.astype(np.float64), nearest_k=k)
    for dtype in (torch.float64, torch.float32):
        got = precision_recall(real, fake, nhood_size=k, row_batch_size=64, col_batch_size=50,
                               dtype=dtype)
        assert got.precision == expected["precision"]
        assert got.recall == expected["recall"]
    assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1


def test_closed_balls_unlike_prdc(capsys):
    # A real point repeated k + 1 times has k-NN radius 0. A generated copy of it lies on that
    # zero-radius ball: inside under the paper's closed balls (<=), outside under prdc's `<`.
    prdc = pytest.importorskip("prdc")
    k = 2
    real = np.concatenate([np.zeros((k + 1, 3)), 50.0 + 10.0 * np.eye(3)])
    fake = np.array([[0.0, 0.0, 0.0], [-40.0, 0.0, 0.0], [0.0, -40.0, 0.0], [0.0, 0.0, -40.0]])
    ours = precision_recall(real, fake, nhood_size=k, dtype=torch.float64)
    theirs = prdc.compute_prdc(real, fake, nearest_k=k)
    assert ours.precision == 0.25  # the copy of the repeated point counts
    assert theirs["precision"] == 0.0


def test_input_errors():
    x = _points(5, 3, 10)
    with pytest.raises(ValueError, match="nhood_size"):
        precision_recall(x, x, nhood_size=5)
    with pytest.raises(ValueError, match="feature sizes"):
        precision_recall(x, _points(5, 4, 11), nhood_size=2)
    with pytest.raises(ValueError):
        precision_recall(x, x, nhood_size=2, row_batch_size=0)
