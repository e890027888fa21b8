"""Sample-quality metrics for 2-D toy data.

- Histogram KL: KL(P || Q) between 2-D histograms of true points (P) and generated points (Q)
  on a common grid, Q smoothed with a pseudo-count so empty bins stay finite. Even two samples
  of the same distribution score above zero (the estimator's floor, roughly
  (occupied bins) / 2 * (1 / N_true + 1 / N_gen)); `ToyEvaluator` measures that floor with an
  independent true sample of the generated sample's size, so a score can be read against it.
- Mode coverage for Gaussian mixtures (as in Srivastava et al. 2017, VEEGAN): each generated
  point belongs to its nearest mode; it is "high quality" when it lies within 3 standard
  deviations (Euclidean distance < 3 std) of that mode; a mode is covered when it holds at
  least `COVER_FRACTION` of its fair share (N / K) of high-quality points.
  (A 2-D Gaussian puts 1 - exp(-4.5) = 98.9% of its mass within 3 std.)
- Class-conditional samples: the share of points within 3 std of the mode they were asked for
  (`requested_mode_stats`), overall and for the worst mode.

Shapes: points (N, 2); modes (K, 2).
"""
from __future__ import annotations

import numpy as np
import torch

# Pseudo-count added to every bin of the generated histogram: small, so that its total
# (PSEUDOCOUNT * bins^2) stays far below the number of generated points and adds no floor.
PSEUDOCOUNT = 0.01
# A mode counts as covered with at least this fraction of its fair share N/K of points.
COVER_FRACTION = 0.1
# "High quality": within this many standard deviations of the nearest mode.
NUM_STDS = 3.0
# Default grid: bins per axis, and the padding added around the true data's bounding box.
DEFAULT_BINS = 64
RANGE_PADDING = 0.05
# Stand-in coordinate for non-finite generated points.
FAR_AWAY = 1e6

ValueRange = tuple[tuple[float, float], tuple[float, float]]


def _as_numpy(points) -> np.ndarray:
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().double().numpy()
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"expected points of shape (N, 2), got {points.shape}")
    return points


def value_range_of(points, padding: float = RANGE_PADDING) -> ValueRange:
    """The bounding box of `points`, widened by `padding` of its size on every side."""
    x = _as_numpy(points)
    lo, hi = x.min(axis=0), x.max(axis=0)
    pad = padding * (hi - lo)
    return ((float(lo[0] - pad[0]), float(hi[0] + pad[0])),
            (float(lo[1] - pad[1]), float(hi[1] + pad[1])))


def hist2d(points, bins: int, value_range: ValueRange) -> np.ndarray:
    """Counts (bins, bins) of the points inside `value_range`; points outside are not counted."""
    x = _as_numpy(points)
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=bins, range=value_range)
    return counts


def histogram_kl(true_points, gen_points, bins: int = DEFAULT_BINS,
                 value_range: ValueRange | None = None,
                 pseudocount: float = PSEUDOCOUNT) -> float:
    """KL(P_true || Q_gen) of 2-D histograms, in nats.

    P is normalized by its in-range count; Q by the total number of generated points, so
    generated points outside the grid lower Q everywhere (they are mass in the wrong place).
    """
    if value_range is None:
        value_range = value_range_of(true_points)
    p_counts = hist2d(true_points, bins, value_range)
    q_counts = hist2d(gen_points, bins, value_range)
    return _kl_from_counts(p_counts, q_counts, len(_as_numpy(gen_points)), pseudocount)


def _kl_from_counts(p_counts: np.ndarray, q_counts: np.ndarray, n_gen: int,
                    pseudocount: float) -> float:
    p = p_counts / p_counts.sum()
    q = (q_counts + pseudocount) / (n_gen + pseudocount * q_counts.size)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def mode_stats(gen_points, modes, std: float, num_stds: float = NUM_STDS,
               cover_fraction: float = COVER_FRACTION) -> dict[str, object]:
    """Mode coverage of generated points for a Gaussian mixture with isotropic `std`.

    Returns `modes_covered` (int), `num_modes` (K), `high_quality` (share of points within
    `num_stds` std of their nearest mode) and `mode_counts` (high-quality points per mode).
    """
    x = torch.as_tensor(_as_numpy(gen_points))
    m = torch.as_tensor(_as_numpy(modes))
    n, k = len(x), len(m)
    counts = torch.zeros(k, dtype=torch.long)
    good = 0
    chunk = 65536  # bounds the (chunk, K) distance matrix
    for i in range(0, n, chunk):
        d = torch.cdist(x[i:i + chunk], m)  # (chunk, K)
        dmin, idx = d.min(dim=1)
        ok = dmin < num_stds * std
        good += int(ok.sum())
        counts += torch.bincount(idx[ok], minlength=k)
    threshold = cover_fraction * n / k
    return {
        "modes_covered": int((counts.double() >= threshold).sum()),
        "num_modes": k,
        "high_quality": good / max(n, 1),
        "mode_counts": counts.tolist(),
    }


def requested_mode_stats(gen_points, labels, modes, std: float,
                         num_stds: float = NUM_STDS) -> dict[str, float]:
    """Points asked for mode labels[i] that lie within `num_stds` std of that mode.

    Returns `on_requested_mode` (share of all points) and `worst_requested_mode` (the lowest
    share among the modes that were asked for). labels: (N,) ints in [0, K).
    """
    x = torch.as_tensor(_as_numpy(gen_points))
    m = torch.as_tensor(_as_numpy(modes))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if y.shape != (len(x),):
        raise ValueError(f"expected {len(x)} labels, got shape {tuple(y.shape)}")
    ok = (x - m[y]).norm(dim=1) < num_stds * std  # non-finite points are never within
    asked = torch.bincount(y, minlength=len(m)).double()
    hits = torch.bincount(y[ok], minlength=len(m)).double()
    shares = hits[asked > 0] / asked[asked > 0]
    return {"on_requested_mode": float(ok.double().mean()),
            "worst_requested_mode": float(shares.min())}


class ToyEvaluator:
    """Scores generated toy points against a fixed true sample.

    Args:
        true_points: (N_true, 2) points of the data distribution (the grid and P come from them).
        reference_points: an independent true sample with as many points as each generated set
            will have; KL(true || reference) is reported as the estimator's floor.
        modes, std: mixture modes (K, 2) and std, for mode coverage (None for swissroll).
        bins: histogram bins per axis.
    """

    def __init__(self, true_points, reference_points=None, modes=None, std: float | None = None,
                 bins: int = DEFAULT_BINS):
        self.bins = bins
        self.value_range = value_range_of(true_points)
        self.true_counts = hist2d(true_points, bins, self.value_range)
        self.num_true = len(_as_numpy(true_points))
        self.modes = None if modes is None else _as_numpy(modes)
        self.std = std
        self.kl_floor: float | None = None
        if reference_points is not None:
            self.kl_floor = self.kl(reference_points)

    @classmethod
    def for_dataset(cls, name: str, true_points, reference_points=None,
                    bins: int = DEFAULT_BINS) -> ToyEvaluator:
        """An evaluator for the toy dataset `name`: mode coverage with its mixture's modes and
        std (none for swissroll, which has no modes)."""
        from ddpmkit.data.toy import toy_mixture

        mixture = toy_mixture(name)
        return cls(true_points, reference_points, bins=bins,
                   modes=None if mixture is None else mixture.modes,
                   std=None if mixture is None else mixture.std)

    def kl(self, gen_points) -> float:
        x = _as_numpy(gen_points)
        q_counts = hist2d(x, self.bins, self.value_range)
        return _kl_from_counts(self.true_counts, q_counts, len(x), PSEUDOCOUNT)

    def evaluate(self, gen_points) -> dict[str, object]:
        """`kl` (and `kl_floor`), plus the mode statistics for mixtures."""
        x = _as_numpy(gen_points)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            # Diverged samples are far from everything: off the grid and far from every mode.
            x = np.where(finite[:, None], x, FAR_AWAY)
        out: dict[str, object] = {"kl": self.kl(x)}
        if not finite.all():
            out["non_finite"] = int((~finite).sum())
        if self.kl_floor is not None:
            out["kl_floor"] = self.kl_floor
        if self.modes is not None and self.std is not None:
            out.update(mode_stats(x, self.modes, self.std))
        return out
