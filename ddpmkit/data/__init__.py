"""Datasets: image datasets and loaders (and the 2-D toy data)."""

from ddpmkit.data.images import (
    DATASET_NAMES,
    DEFAULT_ROOT,
    build_dataset,
    build_loader,
    dataset_info,
)

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_ROOT",
    "build_dataset",
    "build_loader",
    "dataset_info",
]

from ddpmkit.data.toy import (  # the 2-D toy datasets
    TOY_DATASETS,
    TensorBatches,
    make_labeled_toy_data,
    make_toy_data,
    toy_generator,
    toy_mixture,
)

__all__ += ["TOY_DATASETS", "TensorBatches", "make_labeled_toy_data", "make_toy_data",
            "toy_generator", "toy_mixture"]
