"""Improved precision and recall.

Reference: Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models", section 2 (eq. 1-3).

Symbols: real features Phi_r (N_r, D), generated features Phi_g (N_g, D); k = nhood size;
NN_k(phi) = the k-th nearest neighbour of phi within its own set (phi itself excluded, i.e. the
(k+1)-th smallest distance counting phi's zero distance to itself); r(phi) = ||phi - NN_k(phi)||.

    f(phi, Phi) = 1  if  ||phi - phi'|| <= r(phi')  for some phi' in Phi     (closed balls, eq. 1)
    precision = mean over phi_g of f(phi_g, Phi_r);   recall = mean over phi_r of f(phi_r, Phi_g)

The balls are closed (`<=`) as in the paper and its reference code (and stylegan2-ada's). prdc
(Naeem et al. 2020) tests `<` instead; the two differ only when a distance equals a radius
exactly, e.g. for duplicated points.

Distances are computed block by block: a (row_batch_size, col_batch_size) matrix at a time, so
memory stays bounded for any N. Squared distances ||a||^2 + ||b||^2 - 2 a.b are compared with
squared radii (same order, no square roots).
"""

from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np
import torch

from ddpmkit.runtime.devices import tf32_disabled

DEFAULT_NHOOD_SIZE = 3
DEFAULT_ROW_BATCH_SIZE = 10000
DEFAULT_COL_BATCH_SIZE = 10000

Features = Union[np.ndarray, torch.Tensor]


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _as_tensor(features: Features, dtype: torch.dtype) -> torch.Tensor:
    x = torch.as_tensor(features)
    if x.dim() != 2:
        raise ValueError(f"features must be (N, D), got {tuple(x.shape)}")
    return x.to(dtype=dtype)


def _squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """||r - c||^2 for rows (R, D) and cols (C, D) -> (R, C)."""
    sq = (rows * rows).sum(1, keepdim=True) + (cols * cols).sum(1) - 2.0 * rows @ cols.t()
    # The expansion can round a tiny distance below zero; true squared distances are >= 0.
    return sq.clamp_min_(0.0)


def _knn_sq_radii(features: torch.Tensor, nhood_size: int, row_batch_size: int,
                  col_batch_size: int, device: torch.device) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set -> (N,)."""
    num = features.shape[0]
    if num <= nhood_size:
        raise ValueError(f"need more than nhood_size={nhood_size} points, got {num}")
    keep = nhood_size + 1  # the point itself (distance 0) is among the smallest
    radii = []
    for rows in features.split(row_batch_size):
        rows = rows.to(device)
        best = None  # (R, keep) smallest squared distances so far
        for cols in features.split(col_batch_size):
            dist = _squared_distances(rows, cols.to(device))
            block_best = dist.topk(min(keep, dist.shape[1]), dim=1, largest=False).values
            del dist
            if best is not None:  # merge two short sorted lists, not the whole block
                block_best = torch.cat([best, block_best], dim=1)
                block_best = block_best.topk(min(keep, block_best.shape[1]), dim=1,
                                             largest=False).values
            best = block_best
        radii.append(best[:, nhood_size].cpu())  # topk sorts ascending: index k = (k+1)-th
    return torch.cat(radii)


def _coverage(probes: torch.Tensor, support: torch.Tensor, support_sq_radii: torch.Tensor,
              row_batch_size: int, col_batch_size: int, device: torch.device) -> float:
    """Fraction of probes inside the union of closed balls around the support points."""
    inside = []
    for rows in probes.split(row_batch_size):
        rows = rows.to(device)
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=device)
        for cols, radii in zip(support.split(col_batch_size),
                               support_sq_radii.split(col_batch_size)):
            dist = _squared_distances(rows, cols.to(device))
            hit |= (dist <= radii.to(device)).any(dim=1)
        inside.append(hit.cpu())
    return torch.cat(inside).double().mean().item()


def knn_radii(features: Features, nhood_size: int = DEFAULT_NHOOD_SIZE,
              row_batch_size: int = DEFAULT_ROW_BATCH_SIZE,
              col_batch_size: int = DEFAULT_COL_BATCH_SIZE,
              device: str | torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> np.ndarray:
    """r(phi) for every point: distance to its k-th nearest neighbour (itself excluded); (N,)."""
    device = torch.device(device or "cpu")
    x = _as_tensor(features, dtype)
    with tf32_disabled():
        return _knn_sq_radii(x, nhood_size, row_batch_size, col_batch_size,
                             device).sqrt().numpy()


def precision_recall(
    real_features: Features,
    fake_features: Features,
    nhood_size: int = DEFAULT_NHOOD_SIZE,
    row_batch_size: int = DEFAULT_ROW_BATCH_SIZE,
    col_batch_size: int = DEFAULT_COL_BATCH_SIZE,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> PrecisionRecall:
    """Improved precision and recall (eq. 1-3); real (N_r, D), fake (N_g, D).

    Work is done on `device` (default CPU) in `dtype`, one (row_batch_size, col_batch_size)
    distance block at a time; features stay on the CPU. TF32 is off.
    """
    if row_batch_size < 1 or col_batch_size < 1 or nhood_size < 1:
        raise ValueError("nhood_size, row_batch_size and col_batch_size must be >= 1")
    device = torch.device(device or "cpu")
    real = _as_tensor(real_features, dtype)
    fake = _as_tensor(fake_features, dtype)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} vs {fake.shape[1]}")
    with tf32_disabled():
        real_radii = _knn_sq_radii(real, nhood_size, row_batch_size, col_batch_size, device)
        fake_radii = _knn_sq_radii(fake, nhood_size, row_batch_size, col_batch_size, device)
        precision = _coverage(fake, real, real_radii, row_batch_size, col_batch_size, device)
        recall = _coverage(real, fake, fake_radii, row_batch_size, col_batch_size, device)
    return PrecisionRecall(precision=precision, recall=recall)
