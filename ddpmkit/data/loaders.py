"""DataLoaders for training and evaluation, and how many worker processes to use."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

# Batches per worker kept in flight; 2 (torch's default) starves fast GPUs on small images.
PREFETCH_FACTOR = 4
# Data-loading processes when none are asked for: enough to keep one GPU fed with these small
# images, and never more than the CPUs this process may use (PyTorch warns beyond that).
MAX_DEFAULT_WORKERS = 4


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_num_workers(limit: int = MAX_DEFAULT_WORKERS) -> int:
    return min(limit, available_cpus())


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int,
                 device, drop_last: bool, sampler: Sampler | None = None,
                 generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader tuned for training: worker processes kept alive across epochs, deeper
    prefetch, pinned memory only when batches go to CUDA. Pass either `shuffle` or a `sampler`
    (e.g. DistributedSampler), not both; `generator` seeds shuffling and the workers' RNGs.
    """
    if sampler is not None and shuffle:
        raise ValueError("pass shuffle=False with a sampler: the sampler decides the order")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    extra = {"persistent_workers": True, "prefetch_factor": PREFETCH_FACTOR} if num_workers else {}
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
        num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
        drop_last=drop_last, generator=generator, **extra)
