"""All image metrics from features: one call for the eval CLI and for training's `--eval`.

    features = extract_features(model, batches)                     # samples
    ref = load_or_compute_reference_stats(...)                      # real images, cached
    results = compute_metrics(features, ref, metrics=("fid", "pr"))

Result keys: fid; precision, recall; kid_mean, kid_std; is_mean, is_std; and from
`per_class_fid`: fid_class_<k> per class k, fid_class_mean.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ddpmkit.metrics.fid import feature_statistics, frechet_distance
from ddpmkit.metrics.folder import choose_subset
from ddpmkit.metrics.inception import InceptionFeatures
from ddpmkit.metrics.kid_is import (
    DEFAULT_IS_SPLITS,
    DEFAULT_KID_SUBSET_SIZE,
    DEFAULT_KID_SUBSETS,
    DEFAULT_RNG_SEED,
    DEFAULT_SEED,
    inception_score,
    kernel_inception_distance,
)
from ddpmkit.metrics.precision_recall import (
    DEFAULT_COL_BATCH_SIZE,
    DEFAULT_NHOOD_SIZE,
    DEFAULT_ROW_BATCH_SIZE,
    precision_recall,
)
from ddpmkit.metrics.stats import ReferenceStats, class_stats

logger = logging.getLogger(__name__)

METRICS = ("fid", "pr", "kid", "is")
NEEDS_REFERENCE = frozenset({"fid", "pr", "kid"})


def check_metrics(metrics: Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")


def compute_metrics(
    sample_features: InceptionFeatures,
    ref_stats: ReferenceStats | None,
    metrics: Sequence[str] = ("fid", "pr"),
    *,
    nhood_size: int = DEFAULT_NHOOD_SIZE,
    row_batch_size: int = DEFAULT_ROW_BATCH_SIZE,
    col_batch_size: int = DEFAULT_COL_BATCH_SIZE,
    pr_reference_size: int | None = None,
    kid_subsets: int = DEFAULT_KID_SUBSETS,
    kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE,
    is_splits: int = DEFAULT_IS_SPLITS,
    seed: int = DEFAULT_SEED,
    rng_seed: int = DEFAULT_RNG_SEED,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """The requested metrics of the samples against the reference; a flat dict of floats.

    `ref_stats` may be None when only "is" is asked for. Precision/recall uses a fixed-seed
    subset of `pr_reference_size` reference features when the reference has more (the
    reference implementation compares equal-sized sets); None uses them all. `device` runs
    the distance / kernel computations. `seed` draws the precision/recall subset, `rng_seed`
    the KID subsets and the IS shuffle, as torch-fidelity's `rng_seed` does: with its default
    (2020) KID and IS are torch-fidelity's for input1 = samples, input2 = reference.
    """
    check_metrics(metrics)
    if ref_stats is None and NEEDS_REFERENCE.intersection(metrics):
        raise ValueError(f"metrics {sorted(NEEDS_REFERENCE.intersection(metrics))} need "
                         "reference statistics")
    if ref_stats is not None and ref_stats.features.shape[1] != sample_features.pool.shape[1]:
        raise ValueError("sample and reference features differ in size")
    results: dict[str, float] = {}
    for metric in dict.fromkeys(metrics):  # each once, in the order asked
        if metric == "fid":
            mu, sigma = feature_statistics(sample_features.pool)
            results["fid"] = frechet_distance(mu, sigma, ref_stats.mu, ref_stats.sigma)
        elif metric == "pr":
            real = ref_stats.features
            subset = choose_subset(len(real), pr_reference_size, seed)
            if subset is not None:
                logger.info("precision/recall against %d of %d reference images", len(subset),
                            len(real))
                real = real[subset]
            pr = precision_recall(real, sample_features.pool, nhood_size=nhood_size,
                                  row_batch_size=row_batch_size, col_batch_size=col_batch_size,
                                  device=device)
            results["precision"], results["recall"] = pr.precision, pr.recall
        elif metric == "kid":
            kid = kernel_inception_distance(sample_features.pool, ref_stats.features,
                                            num_subsets=kid_subsets, subset_size=kid_subset_size,
                                            seed=rng_seed, device=device)
            results["kid_mean"], results["kid_std"] = kid.mean, kid.std
        elif metric == "is":
            score = inception_score(sample_features.logits_unbiased, splits=is_splits,
                                    seed=rng_seed)
            results["is_mean"], results["is_std"] = score.mean, score.std
    return {k: float(v) for k, v in results.items()}


def per_class_fid(sample_pool: np.ndarray, sample_labels: Sequence[int],
                  ref_stats: ReferenceStats) -> dict[str, float]:
    """FID of each class's samples against the reference images of that class: keys
    `fid_class_<k>` for every class k with at least two samples, and their mean
    `fid_class_mean`. sample_pool: (N, D) pool features; sample_labels: (N,)."""
    labels = np.asarray(sample_labels, np.int64)
    if labels.shape != (len(sample_pool),):
        raise ValueError(f"{len(sample_pool)} samples but labels of shape {labels.shape}")
    results: dict[str, float] = {}
    for k in np.unique(labels):
        rows = sample_pool[labels == k]
        if len(rows) < 2:
            logger.warning("class %d has %d sample(s): no FID for it (needs two)", k, len(rows))
            continue
        mu_ref, sigma_ref, count = class_stats(ref_stats, int(k))
        if count < 2:
            raise ValueError(f"the reference {ref_stats.source} has {count} image(s) of class "
                             f"{k}: no statistics for it")
        mu, sigma = feature_statistics(rows)
        results[f"fid_class_{int(k)}"] = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    if results:
        results["fid_class_mean"] = float(np.mean(list(results.values())))
    return results
