"""Reference statistics: what the metrics need from the real images, computed once and cached.

A `ReferenceStats` holds the FID Gaussian (mu (D,), sigma (D, D), float64) and the pool features
(N, D) float32 that precision/recall and KID compare against, plus what makes a cache file
trustworthy: the number of images, the extractor's identity (network + weights hash), the
source (dataset/split or folder) and the images' size. `load_or_compute_reference_stats` uses
a cached file only when all of these match, and rewrites it otherwise. A dataset with labels
also stores each image's label (`labels`, (N,) int64), from which per-class statistics
(`class_stats`) come; a file cached without them is recomputed when they are needed.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ddpmkit.errors import UserError
from ddpmkit.metrics.fid import feature_statistics
from ddpmkit.metrics.folder import dataset_batches
from ddpmkit.metrics.inception import FIDInceptionV3, extract_features
from ddpmkit.utils.io import atomic_write

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_KEYS = ("format_version", "mu", "sigma", "features", "num_images", "extractor_id", "source",
         "image_size")


@dataclass(frozen=True)
class ReferenceStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    features: np.ndarray  # (N, D) float32 pool features
    num_images: int
    extractor_id: str
    source: str
    image_size: tuple[int, int]  # (H, W) of the reference images before the resize to 299
    labels: np.ndarray | None = None  # (N,) int64 class of each image, when the source has them


def stats_from_features(features: np.ndarray, extractor_id: str, source: str,
                        image_size: tuple[int, int],
                        labels: np.ndarray | None = None) -> ReferenceStats:
    mu, sigma = feature_statistics(features)
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != (features.shape[0],):
            raise ValueError(f"{features.shape[0]} feature rows but labels of shape "
                             f"{labels.shape}")
    return ReferenceStats(mu=mu, sigma=sigma, features=np.asarray(features, np.float32),
                          num_images=int(features.shape[0]), extractor_id=extractor_id,
                          source=source, image_size=tuple(int(s) for s in image_size),
                          labels=labels)


def class_stats(stats: ReferenceStats, label: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, number of images) of the reference images of one class."""
    if stats.labels is None:
        raise ValueError(f"the reference statistics of {stats.source} hold no labels")
    rows = stats.features[stats.labels == label]
    mu, sigma = feature_statistics(rows)
    return mu, sigma, len(rows)


class _SizeRecorder:
    """Passes image batches through, remembering the (H, W) of the first one; batches may be
    (images, labels) pairs, whose labels are collected."""

    def __init__(self, batches: Iterable):
        self.batches = batches
        self.image_size: tuple[int, int] = (0, 0)
        self.labels: list[np.ndarray] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i, batch in enumerate(self.batches):
            if isinstance(batch, (tuple, list)):
                batch, labels = batch
                self.labels.append(np.asarray(labels, np.int64))
            if i == 0:
                self.image_size = tuple(int(s) for s in batch.shape[-2:])
            yield batch


def compute_reference_stats(model: FIDInceptionV3, batches: Iterable, source: str,
                            progress: bool = False,
                            total: int | None = None) -> ReferenceStats:
    """Statistics of uint8 image batches (B, 3, H, W) under `model`; with (images, labels)
    batches the labels are kept too."""
    recorder = _SizeRecorder(batches)
    features = extract_features(model, recorder, progress=progress, total=total)
    labels = np.concatenate(recorder.labels) if recorder.labels else None
    return stats_from_features(features.pool, model.identity, source, recorder.image_size,
                               labels)


def save_reference_stats(stats: ReferenceStats, path: str) -> None:
    """Write `stats` as an .npz (atomically: a crash leaves the old file or the new one)."""
    arrays = {
        "format_version": np.int64(FORMAT_VERSION), "mu": stats.mu, "sigma": stats.sigma,
        "features": stats.features, "num_images": np.int64(stats.num_images),
        "extractor_id": np.str_(stats.extractor_id), "source": np.str_(stats.source),
        "image_size": np.asarray(stats.image_size, np.int64)}
    if stats.labels is not None:
        arrays["labels"] = np.asarray(stats.labels, np.int64)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_reference_stats(path: str) -> ReferenceStats:
    """Read a file written by `save_reference_stats` (plain arrays only; nothing is unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _KEYS if k not in data.files]
            if missing:
                raise UserError(f"{path!r} is not a ddpmkit reference statistics file "
                                f"(missing {missing}); delete it to recompute")
            if int(data["format_version"]) != FORMAT_VERSION:
                raise UserError(f"{path!r} has format version {int(data['format_version'])}, "
                                f"expected {FORMAT_VERSION}; delete it to recompute")
            return ReferenceStats(
                mu=data["mu"], sigma=data["sigma"], features=data["features"],
                num_images=int(data["num_images"]), extractor_id=str(data["extractor_id"]),
                source=str(data["source"]),
                image_size=tuple(int(s) for s in data["image_size"]),
                labels=data["labels"] if "labels" in data.files else None)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read reference statistics {path!r}: {exc}; delete it to "
                        "recompute") from exc


def stale_reason(stats: ReferenceStats, extractor_id: str, source: str,
                 num_images: int | None, need_labels: bool = False) -> str | None:
    """Why cached `stats` do not fit the current extractor / source / image count (or lack the
    labels asked for), or None."""
    if need_labels and stats.labels is None:
        return "made without the images' labels, which per-class statistics need"
    if stats.extractor_id != extractor_id:
        return f"made by extractor {stats.extractor_id!r}, now {extractor_id!r}"
    if stats.source != source:
        return f"made from {stats.source!r}, now {source!r}"
    if num_images is not None and stats.num_images != num_images:
        return f"made from {stats.num_images} images, the source now has {num_images}"
    return None


def load_or_compute_reference_stats(
    path: str,
    model: FIDInceptionV3,
    make_batches: Callable[[], Iterable[torch.Tensor]],
    source: str,
    num_images: int | None,
    progress: bool = False,
    total_batches: int | None = None,
    need_labels: bool = False,
) -> ReferenceStats:
    """The cached statistics at `path` if still valid, else computed from `make_batches()` and
    saved there. `num_images` is the source's current image count (None: cannot be checked);
    `need_labels`: a cached file without labels is stale."""
    if os.path.isfile(path):
        try:
            cached = load_reference_stats(path)
        except UserError as exc:
            logger.warning("recomputing reference statistics: %s", exc)
        else:
            reason = stale_reason(cached, model.identity, source, num_images, need_labels)
            if reason is None:
                logger.info("using cached reference statistics %s (%d images)", path,
                            cached.num_images)
                return cached
            logger.warning("cached reference statistics %s are stale (%s); recomputing", path,
                           reason)
    logger.info("computing reference statistics of %s -> %s", source, path)
    stats = compute_reference_stats(model, make_batches(), source, progress=progress,
                                    total=total_batches)
    if num_images is not None and stats.num_images != num_images:
        raise UserError(f"{source} should have {num_images} images but gave "
                        f"{stats.num_images}")
    save_reference_stats(stats, path)
    return stats


def reference_stats_path(precomputed_dir: str, dataset: str, split: str,
                         tf32: bool = False) -> str:
    """The cache file; TF32 statistics get their own, so switching --tf32 recomputes nothing."""
    suffix = "_tf32" if tf32 else ""
    return os.path.join(os.path.expanduser(precomputed_dir),
                        f"inception_{dataset}_{split}{suffix}.npz")


def _open_dataset(dataset: str, root: str, split: str, download: bool):
    """(dataset, None), or (None, why) when it cannot be opened here."""
    try:
        from ddpmkit.data.images import build_dataset
    except ImportError as exc:
        return None, f"dataset loading is unavailable ({exc})"
    try:
        # no random flips: the statistics must not depend on a coin toss
        return build_dataset(dataset, os.path.expanduser(root), split=split, image_size=None,
                             random_flip=False, download=download), None
    except UserError as exc:
        return None, str(exc)


def dataset_reference_stats(
    model: FIDInceptionV3,
    dataset: str,
    root: str,
    precomputed_dir: str,
    split: str = "train",
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    download: bool = False,
    need_labels: bool = False,
) -> ReferenceStats:
    """Statistics of a dataset's split (its real images) and their labels, cached in
    `precomputed_dir`.

    The cache is checked against the extractor, the source and the split's current image count.
    When the dataset cannot be opened (e.g. not downloaded) a cache made by this extractor is
    still used, with a warning that its image count could not be checked.
    """
    source = f"{dataset}/{split}"
    path = reference_stats_path(precomputed_dir, dataset, split, tf32=model.tf32)
    data, why_not = _open_dataset(dataset, root, split, download)
    if data is None:
        if os.path.isfile(path):
            cached = load_reference_stats(path)
            if stale_reason(cached, model.identity, source, None, need_labels) is None:
                logger.warning("cannot open %s (%s); using cached statistics %s without "
                               "checking the image count", source, why_not, path)
                return cached
        raise UserError(f"cannot compute reference statistics of {source}: {why_not}")
    return load_or_compute_reference_stats(
        path, model, lambda: dataset_batches(data, batch_size, num_workers, with_labels=True),
        source, num_images=len(data), progress=progress,
        total_batches=math.ceil(len(data) / batch_size), need_labels=need_labels)
