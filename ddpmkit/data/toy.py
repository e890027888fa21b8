"""2-D toy datasets: `gaussian8`, `gaussian25`, `swissroll`, generated from a seed (no files).

Every dataset is scaled to about unit variance per axis, as in the reference project:

- `gaussian8`: 8 modes at 2 (cos(k pi/4), sin(k pi/4)), k = 0..7, each an isotropic Gaussian
  with std 0.02; everything divided by sqrt(0.02^2 + 2) (the per-axis std of the mixture).
- `gaussian25`: 25 modes on the grid {-4, -2, 0, 2, 4}^2, std 0.05; divided by
  sqrt(0.05^2 + 8).
- `swissroll`: (t cos t, t sin t) with t ~ U(1.5 pi, 4.5 pi), plus Gaussian noise of std 0.25
  on each axis; each axis divided by its exact std (see `_swissroll_axis_std`).

Symbols: `N` number of points, `K` number of mixture modes, `D` = 2 dimensions.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ddpmkit.choices import TOY_DATASETS

# Reference constants (raw units, before scaling to unit variance).
GAUSSIAN8_RADIUS, GAUSSIAN8_STD = 2.0, 0.02
GAUSSIAN25_SPACING, GAUSSIAN25_STD = 2.0, 0.05
SWISSROLL_T_RANGE = (1.5 * math.pi, 4.5 * math.pi)
SWISSROLL_NOISE = 0.25


@dataclass(frozen=True)
class ToyMixture:
    """Mode locations `modes` (K, 2) and per-axis std `std`, both in the scaled data units."""

    modes: torch.Tensor
    std: float


def _gaussian8_raw() -> tuple[np.ndarray, float, float]:
    angles = np.arange(8) * (math.pi / 4)
    modes = GAUSSIAN8_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # Per-axis variance of the mixture: E[cos^2] * r^2 + std^2 = r^2 / 2 + std^2.
    scale = math.sqrt(GAUSSIAN8_STD**2 + GAUSSIAN8_RADIUS**2 / 2)
    return modes, GAUSSIAN8_STD, scale


def _gaussian25_raw() -> tuple[np.ndarray, float, float]:
    grid = GAUSSIAN25_SPACING * np.arange(-2, 3, dtype=np.float64)
    modes = np.stack(np.meshgrid(grid, grid, indexing="ij"), axis=-1).reshape(-1, 2)
    # Per-axis variance: mean of {16, 4, 0, 4, 16} = 8, plus the mode variance.
    scale = math.sqrt(GAUSSIAN25_STD**2 + 8.0)
    return modes, GAUSSIAN25_STD, scale


_MIXTURES = {"gaussian8": _gaussian8_raw, "gaussian25": _gaussian25_raw}


def _swissroll_axis_std() -> tuple[float, float]:
    """Exact per-axis std of (t cos t, t sin t) + noise, t ~ U(a, b) with b - a = 3 pi.

    Over a whole number of half-periods the moments have closed forms:
    E[t^2 cos^2 t] and E[t^2 sin^2 t] = E[t^2]/2 +- E[t^2 cos 2t]/2, E[t cos t], E[t sin t].
    They are evaluated here by integrating the antiderivatives, so no sampling is involved.
    """
    a, b = SWISSROLL_T_RANGE
    length = b - a

    def int_t_cos(t):  # antiderivative of t cos t
        return t * math.sin(t) + math.cos(t)

    def int_t_sin(t):  # antiderivative of t sin t
        return -t * math.cos(t) + math.sin(t)

    def int_t2_cos2t(t):  # antiderivative of t^2 cos 2t
        return t**2 * math.sin(2 * t) / 2 + t * math.cos(2 * t) / 2 - math.sin(2 * t) / 4

    mean_x = (int_t_cos(b) - int_t_cos(a)) / length
    mean_y = (int_t_sin(b) - int_t_sin(a)) / length
    mean_t2 = (b**3 - a**3) / (3 * length)
    mean_t2_cos2t = (int_t2_cos2t(b) - int_t2_cos2t(a)) / length
    var_x = (mean_t2 + mean_t2_cos2t) / 2 - mean_x**2 + SWISSROLL_NOISE**2
    var_y = (mean_t2 - mean_t2_cos2t) / 2 - mean_y**2 + SWISSROLL_NOISE**2
    return math.sqrt(var_x), math.sqrt(var_y)


def toy_mixture(name: str) -> ToyMixture | None:
    """Mode locations and std of a Gaussian-mixture toy dataset (None for `swissroll`)."""
    check_toy_name(name)
    if name not in _MIXTURES:
        return None
    modes, std, scale = _MIXTURES[name]()
    return ToyMixture(modes=torch.from_numpy(modes / scale).float(), std=std / scale)


def check_toy_name(name: str) -> None:
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {', '.join(TOY_DATASETS)}")


def make_toy_data(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` points of toy dataset `name`, float32 (n, 2), drawn only from `generator`.

    Mixture points pick their mode uniformly at random, then add isotropic Gaussian noise.
    """
    return make_labeled_toy_data(name, n, generator)[0]


def make_labeled_toy_data(name: str, n: int, generator: torch.Generator
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(points float32 (n, 2), labels int64 (n,) or None): the points of `make_toy_data` (the
    same draws), with each mixture point's mode index as its label; swissroll has none."""
    check_toy_name(name)
    if n <= 0:
        raise ValueError(f"number of points must be positive, got {n}")
    if name in _MIXTURES:
        modes, std, scale = _MIXTURES[name]()
        modes_t = torch.from_numpy(modes)
        idx = torch.randint(len(modes), (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        x = (modes_t[idx] + std * noise) / scale
        return x.float(), idx
    a, b = SWISSROLL_T_RANGE
    t = a + (b - a) * torch.rand(n, generator=generator, dtype=torch.float64)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) + SWISSROLL_NOISE * noise
    x = x / torch.tensor(_swissroll_axis_std(), dtype=torch.float64)
    return x.float(), None


def toy_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (toy data is always generated on the CPU)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class TensorBatches:
    """Shuffled mini-batches of an in-memory tensor, the same order for the same (seed, epoch).

    The order of epoch `e` depends only on `seed` and `e`, so a resumed run can rebuild it and
    skip the batches it already used (`iter_from`). `drop_last` drops a final partial batch, as
    the reference's data streamer did (size // batch_size batches per epoch).

    Args:
        data: (N, *S) tensor.
        batch_size: points per batch.
        seed: base seed of the shuffle.
        shuffle: reshuffle every epoch (otherwise a fixed order).
        labels: optional (N,) tensor; batches are then `(points, labels)` pairs.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, labels: torch.Tensor | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(data) < batch_size and drop_last:
            raise ValueError(
                f"batch_size {batch_size} is larger than the dataset ({len(data)} points)")
        if labels is not None and labels.shape != (len(data),):
            raise ValueError(f"labels must have shape ({len(data)},), got {tuple(labels.shape)}")
        self.data = data
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.data))
        g = torch.Generator()
        # Distinct, reproducible stream per epoch; the large odd multiplier decorrelates seeds.
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        return torch.randperm(len(self.data), generator=g)

    def iter_from(self, start: int) -> Iterator:
        """Batches of the current epoch, starting at batch index `start`."""
        order = self._order().to(self.data.device)
        for i in range(start, len(self)):
            rows = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.data[rows] if self.labels is None else (self.data[rows], self.labels[rows])

    def __iter__(self) -> Iterator:
        return self.iter_from(0)
