"""Frechet Inception Distance.

Reference: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium". Dowson & Landau 1982 for the Frechet distance between Gaussians.

Symbols: features X (N, D) float; mu (D,) sample mean; sigma (D, D) sample covariance (1 / (N-1),
as numpy.cov and the reference implementations); D = 2048 for Inception pool features.

    FID = ||mu_1 - mu_2||^2 + tr(sigma_1) + tr(sigma_2) - 2 tr((sigma_1 sigma_2)^(1/2))

How the trace term is computed: with symmetric eigendecompositions sigma_i = V_i L_i V_i^T
and A_i = V_i L_i^(1/2) (so sigma_i = A_i A_i^T), the non-zero eigenvalues of sigma_1 sigma_2
are those of A_1^T sigma_2 A_1 = (A_1^T A_2)(A_1^T A_2)^T, hence

    tr((sigma_1 sigma_2)^(1/2)) = sum of the singular values of A_1^T A_2     (nuclear norm)

This avoids the general `sqrtm` of the non-symmetric product (pytorch-fid), which loses
accuracy and can turn complex when the covariances are near-singular, as they are with fewer
images than feature dimensions. It also avoids taking square roots of eigenvalues that are
rounding noise (about eps * ||sigma||): sqrt(1e-14) = 1e-7 per null direction would add up to
~1e-4 over 2048 dimensions. Eigenvalues below the numerical-rank cutoff D * eps * max(L_i)
(numpy's `matrix_rank` default) are set to zero for that reason; singular values come out
with absolute error ~eps * ||A_1^T A_2||, without a square root.
All statistics are float64.
"""

from typing import NamedTuple

import numpy as np


class GaussianStats(NamedTuple):
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64


def feature_statistics(features: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance (float64) of features (N, D), N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {x.shape}")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return GaussianStats(mu=mu, sigma=sigma)


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """A (D, rank) with A A^T = sigma for symmetric PSD sigma (D, D), via eigh; A = V L^(1/2)."""
    eigvals, eigvecs = np.linalg.eigh((sigma + sigma.T) / 2)
    # Eigenvalues below the numerical-rank cutoff (including the slightly negative ones that
    # rounding gives a PSD matrix) are noise; zero them rather than take their square roots.
    cutoff = sigma.shape[0] * np.finfo(np.float64).eps * max(eigvals.max(), 0.0)
    keep = eigvals > cutoff
    return eigvecs[:, keep] * np.sqrt(eigvals[keep])  # (D, rank): the SVD below gets smaller


def trace_sqrt_product(sigma_1: np.ndarray, sigma_2: np.ndarray) -> float:
    """tr((sigma_1 sigma_2)^(1/2)) for symmetric PSD sigma_1, sigma_2 (D, D): ||A_1^T A_2||_*."""
    a_1, a_2 = _psd_factor(sigma_1), _psd_factor(sigma_2)
    return float(np.linalg.svd(a_1.T @ a_2, compute_uv=False).sum())


def frechet_distance(mu_1, sigma_1, mu_2, sigma_2) -> float:
    """Frechet distance between N(mu_1, sigma_1) and N(mu_2, sigma_2); mu (D,), sigma (D, D)."""
    mu_1, mu_2 = np.asarray(mu_1, np.float64), np.asarray(mu_2, np.float64)
    sigma_1, sigma_2 = np.asarray(sigma_1, np.float64), np.asarray(sigma_2, np.float64)
    if mu_1.shape != mu_2.shape or mu_1.ndim != 1:
        raise ValueError(f"mean vectors differ in shape: {mu_1.shape} vs {mu_2.shape}")
    dim = mu_1.shape[0]
    if sigma_1.shape != (dim, dim) or sigma_2.shape != (dim, dim):
        raise ValueError(f"covariances must be ({dim}, {dim}), got {sigma_1.shape} and "
                         f"{sigma_2.shape}")
    diff = mu_1 - mu_2
    return float(diff @ diff + np.trace(sigma_1) + np.trace(sigma_2)
                 - 2.0 * trace_sqrt_product(sigma_1, sigma_2))


def fid_from_features(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """FID between two feature sets (N_1, D) and (N_2, D)."""
    stats_1, stats_2 = feature_statistics(features_1), feature_statistics(features_2)
    return frechet_distance(stats_1.mu, stats_1.sigma, stats_2.mu, stats_2.sigma)
