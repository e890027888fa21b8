"""Kernel Inception Distance and Inception Score.

References:
- Binkowski et al. 2018, "Demystifying MMD GANs" (KID: unbiased MMD^2 with the cubic polynomial
  kernel, averaged over random subsets).
- Salimans et al. 2016, "Improved Techniques for Training GANs" (IS).

Symbols: X (N_x, D), Y (N_y, D) pool features; m = subset size; d = D;
k(x, y) = (x.y / d + 1)^3;
    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2
KID = mean of MMD^2_u over `num_subsets` subset pairs drawn without replacement (std reported
too). Subsets are drawn as `numpy.random.RandomState(seed).choice`, X's then Y's for each
subset, the scheme of the KID authors' code and of torch-fidelity: with X the samples (its
`input1`), Y the reference (`input2`) and its default seed 2020, the subsets are
torch-fidelity's.

logits (N, C): p(y|x) = softmax(logits); the rows are shuffled by
`RandomState(seed).permutation` (torch-fidelity's default, seed 2020), then for each of
`splits` consecutive chunks IS = exp(mean_x KL(p(y|x) || p(y))) with p(y) the chunk's mean of
p(y|x); mean and std over chunks. The logits are the pool features times the final layer's
weight without its bias, as in the IS authors' code (`InceptionFeatures.logits_unbiased`).

All arithmetic in float64, where torch-fidelity computes the KID kernels in float32 (KID moved
by 1e-5 between the two on 1,500 CIFAR-10 images a side; see the README), and p(y) in the log
domain, so that a class no image predicts adds 0 rather than torch-fidelity's NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

DEFAULT_KID_SUBSETS = 100
DEFAULT_KID_SUBSET_SIZE = 1000
DEFAULT_SEED = 1234
# torch-fidelity's default `rng_seed`, for the KID subsets and the IS shuffle
DEFAULT_RNG_SEED = 2020
KID_DEGREE = 3
KID_COEF0 = 1.0
DEFAULT_IS_SPLITS = 10


class MeanStd(NamedTuple):
    mean: float
    std: float


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = KID_DEGREE,
                      gamma: float | None = None, coef0: float = KID_COEF0) -> torch.Tensor:
    """(gamma x.y + coef0)^degree for x (M, D), y (M', D) -> (M, M'); gamma defaults to 1 / D."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.t() * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: torch.Tensor, k_xy: torch.Tensor, k_yy: torch.Tensor) -> float:
    """Unbiased MMD^2 from the three (m, m) kernel matrices (diagonals of k_xx, k_yy dropped)."""
    m = k_xx.shape[0]
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    return ((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m)).item()


def kernel_inception_distance(
    features_x,
    features_y,
    num_subsets: int = DEFAULT_KID_SUBSETS,
    subset_size: int = DEFAULT_KID_SUBSET_SIZE,
    seed: int = DEFAULT_RNG_SEED,
    device: str | torch.device | None = None,
) -> MeanStd:
    """KID (mean, std over subsets) between features (N_x, D) and (N_y, D). Each subset of x is
    drawn before y's: pass the samples as x for torch-fidelity's subsets."""
    x = torch.as_tensor(np.asarray(features_x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(features_y), dtype=torch.float64)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if subset_size < 2 or num_subsets < 1:
        raise ValueError("need subset_size >= 2 and num_subsets >= 1")
    if subset_size > min(len(x), len(y)):
        raise ValueError(f"KID subset size {subset_size} exceeds the number of features "
                         f"({len(x)} and {len(y)}); use a smaller subset size")
    device = torch.device(device or "cpu")
    rng = np.random.RandomState(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        idx_x = torch.from_numpy(rng.choice(len(x), subset_size, replace=False))
        idx_y = torch.from_numpy(rng.choice(len(y), subset_size, replace=False))
        sub_x, sub_y = x[idx_x].to(device), y[idx_y].to(device)
        values[i] = mmd2_unbiased(polynomial_kernel(sub_x, sub_x), polynomial_kernel(sub_x, sub_y),
                                  polynomial_kernel(sub_y, sub_y))
    return MeanStd(mean=float(values.mean()), std=float(values.std()))


def inception_score(logits, splits: int = DEFAULT_IS_SPLITS, shuffle: bool = True,
                    seed: int = DEFAULT_RNG_SEED) -> MeanStd:
    """Inception Score (mean, std over `splits` chunks) from logits (N, C), the rows shuffled
    with `seed` first unless `shuffle` is False."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.dim() != 2:
        raise ValueError(f"logits must be (N, C), got {tuple(z.shape)}")
    num = z.shape[0]
    if splits < 1 or num < splits:
        raise ValueError(f"Inception Score needs at least one image per split: {num} images, "
                         f"{splits} splits")
    if shuffle:
        z = z[torch.from_numpy(np.random.RandomState(seed).permutation(num))]
    log_p = torch.log_softmax(z, dim=1)  # log p(y|x), (N, C)
    scores = []
    for i in range(splits):
        chunk = log_p[i * num // splits:(i + 1) * num // splits]  # (n, C)
        # log p(y) = log mean_x p(y|x), in the log domain so that it stays finite when every
        # p(y|x) of a class underflows (then that class adds 0 * finite = 0 to the KL)
        log_p_y = torch.logsumexp(chunk, dim=0, keepdim=True) - math.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_p_y)).sum(dim=1)  # KL(p(y|x) || p(y)), (n,)
        scores.append(kl.mean().exp().item())
    return MeanStd(mean=float(np.mean(scores)), std=float(np.std(scores)))
