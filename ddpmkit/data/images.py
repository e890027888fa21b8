"""Image datasets and loaders: `mnist`, `cifar10`, `celeba`, `celebahq`, `folder`.

Every dataset yields `(image, label)`: image a float32 tensor (C, H, W) in [-1, 1] (x / 127.5 - 1
of the uint8 pixels), label an int (0 where the dataset has none). Transforms follow the
reference project (and DDPM, Ho et al. 2020, appendix B):

| name       | on-disk layout under ROOT (torchvision's)          | transform                      |
|------------|----------------------------------------------------|--------------------------------|
| `mnist`    | MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] | resize 28 -> 32, 1 channel |
| `cifar10`  | cifar-10-batches-py/{data_batch_1..5,test_batch}   | random horizontal flip         |
| `celeba`   | celeba/img_align_celeba/*.jpg + list_eval_partition.txt | crop 148 at (40,15), resize 64 |
| `celebahq` | celeba_hq/img_celeba_hq/*.png (256x256)            | random horizontal flip         |
| `folder`   | ROOT itself: any tree of images (`data.folder`)    | --resize-mode to --image-size  |

MNIST and CIFAR-10 are small and are held in memory as uint8 tensors; the others are decoded
from files per item (use worker processes).

This module is the registry (what each dataset is, `build_dataset`); the pieces live beside it:
`data.datasets` (the Dataset classes), `data.sources` (finding, reading and downloading each
dataset's files), `data.folder` (any folder of images), `data.readers` (IDX for MNIST, safely
unpickled CIFAR-10 batches, CelebA's partition list) and `data.loaders` (DataLoaders, workers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from torch.utils.data import Dataset

from ddpmkit.choices import IMAGE_DATASETS
from ddpmkit.config.schema import size_hw
from ddpmkit.data.folder import IMAGE_EXTENSIONS, build_index
from ddpmkit.data.loaders import (  # noqa: F401  (build_loader, default_num_workers: this API)
    available_cpus,
    build_loader,
    default_num_workers,
)
from ddpmkit.data.readers import read_idx  # noqa: F401  (part of this module's API)
from ddpmkit.data.sources import (  # noqa: F401  (folder_channels: part of this module's API)
    FolderOptions,
    Request,
    celeba_dirs,
    celebahq_dirs,
    cifar10_dirs,
    download_celeba,
    download_cifar10,
    download_mnist,
    folder_channels,
    folder_labels,
    load_celeba,
    load_celebahq,
    load_cifar10,
    load_folder,
    load_mnist,
    mnist_dirs,
    mnist_file,
)
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "~/datasets"


@dataclass(frozen=True)
class ImageDatasetSpec:
    """What the trainer needs to know about a dataset besides its files."""

    name: str
    channels: int
    resolution: int | None  # None: set by --image-size (folder)
    random_flip: bool  # the default; DDPM flips CIFAR-10 and faces
    splits: tuple[str, ...]
    train_split: str  # the split the reference trained on
    layout: str  # the expected layout, for error messages
    load: Callable[[Request], Dataset | None]
    candidates: Callable[[str], list[str]]  # folders looked in, for error messages
    download: Callable[[str, str], None] | None = None


DATASETS: dict[str, ImageDatasetSpec] = {
    spec.name: spec for spec in (
        ImageDatasetSpec(
            "mnist", 1, 32, False, ("train", "test"), "train",
            "MNIST/raw/{train,t10k}-images-idx3-ubyte[.gz] and "
            "{train,t10k}-labels-idx1-ubyte[.gz] (torchvision's MNIST layout); split 'test' "
            "needs only the t10k files",
            load_mnist, mnist_dirs, download_mnist),
        ImageDatasetSpec(
            "cifar10", 3, 32, True, ("train", "test"), "train",
            "cifar-10-batches-py/data_batch_1..5 and test_batch (torchvision's CIFAR-10 python "
            "version)",
            load_cifar10, cifar10_dirs, download_cifar10),
        ImageDatasetSpec(
            "celeba", 3, 64, True, ("train", "valid", "test", "all"), "all",
            "celeba/img_align_celeba/*.jpg (the 178x218 aligned faces) and "
            "celeba/list_eval_partition.txt (torchvision's CelebA layout)",
            load_celeba, celeba_dirs, download_celeba),
        ImageDatasetSpec(
            "celebahq", 3, 256, True, ("train", "all"), "train",
            "celeba_hq/img_celeba_hq/*.png (the 30,000 CelebA-HQ faces at 256x256; larger "
            "images are resized)",
            load_celebahq, celebahq_dirs),
        ImageDatasetSpec(
            "folder", 3, None, False, ("train", "all"), "train",
            f"ROOT itself: any tree of {'/'.join(IMAGE_EXTENSIONS)} images",
            load_folder, lambda root: [root]),
    )
}
DATASET_NAMES = IMAGE_DATASETS  # the registry's keys, in this order (a test checks)


def get_spec(name: str) -> ImageDatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown image dataset {name!r}; choose one of "
                        f"{', '.join(DATASET_NAMES)}") from None


# Class names in label order of the datasets that have labels (a folder's come from its
# subfolders). CIFAR-10's are those of its batches.meta.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}


def dataset_classes(name: str, root: str = DEFAULT_ROOT) -> list[str]:
    """Class names in label order of a dataset with labels (UserError for one without):
    mnist's digits, cifar10's classes, or a folder's subfolders (at least two)."""
    get_spec(name)
    if name in CLASS_NAMES:
        return list(CLASS_NAMES[name])
    if name != "folder":
        raise UserError(f"dataset {name!r} has no class labels; class-conditional training "
                        f"needs one of {', '.join(CLASS_NAMES)} or folder")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise UserError(f"image folder {root} does not exist; pass --root pointing at a "
                        "folder of images")
    _, names = folder_labels(build_index(root, workers=available_cpus()).files)
    if len(names) < 2:
        raise UserError(f"class-conditional training on a folder needs one subfolder of images "
                        f"per class, at least two; every image under {root} is in {names[0]!r}")
    return names


def dataset_info(name: str, image_size: int | Sequence[int] | None = None
                 ) -> tuple[int, int | list[int]]:
    """(channels, resolution) of the images `build_dataset(name, ..., image_size)` yields:
    resolution as given (S, or [H, W] for non-square folders) or the dataset's own; channels
    the dataset's (a folder's are decided from its images, see `folder_channels`)."""
    spec = get_spec(name)
    resolution = image_size or spec.resolution
    if resolution is None:
        raise UserError(f"dataset {name!r} needs an image size: pass --image-size S or H,W")
    if min(size_hw(resolution)) < 1:
        raise UserError(f"image size must be positive, got {resolution}")
    return spec.channels, resolution


def build_dataset(name: str, root: str = DEFAULT_ROOT, split: str = "train",
                  image_size: int | Sequence[int] | None = None, download: bool = False,
                  random_flip: bool | None = None, folder: FolderOptions | None = None
                  ) -> Dataset:
    """The dataset `name` found under `root`: items (image float32 (C, H, W) in [-1, 1], label).

    root: the folder that holds torchvision-style dataset folders (default ~/datasets); for
        `folder`, the image folder itself.
    split: one of the dataset's splits (see DATASETS[name].splits).
    image_size: output size S or (H, W); defaults to the dataset's (required for `folder`).
    download: fetch with torchvision when the files are missing (mnist, cifar10, celeba).
    random_flip: random horizontal flips; None takes the dataset's default.
    folder: channels, resize mode, bad-file policy and pinned files of a `folder` dataset.
    Missing files raise UserError naming the folders looked in and the expected layout.
    """
    spec = get_spec(name)
    _, resolution = dataset_info(name, image_size)
    if split not in spec.splits:
        raise UserError(f"dataset {name!r} has no split {split!r}; choose one of "
                        f"{', '.join(spec.splits)}")
    root = os.path.abspath(os.path.expanduser(str(root)))
    flip = spec.random_flip if random_flip is None else bool(random_flip)
    request = Request(root, split, size_hw(resolution), flip, folder)

    dataset = spec.load(request)
    if dataset is None and download and spec.download is not None:
        logger.info("downloading %s to %s", name, root)
        try:
            spec.download(root, split)
        except Exception as exc:  # network, integrity and missing-dependency errors alike
            raise UserError(f"downloading {name} to {root} failed: {exc}. Without network "
                            f"access, place the files as: {spec.layout}") from exc
        dataset = spec.load(request)
    if dataset is None:
        raise UserError(_missing_message(spec, root, split, download))
    logger.info("%s (%s): %d images from %s", name, split, len(dataset), root)
    return dataset


def _missing_message(spec: ImageDatasetSpec, root: str, split: str, download: bool) -> str:
    looked = ", ".join(spec.candidates(root))
    if spec.name == "folder":
        return f"image folder {root} does not exist; pass --root pointing at a folder of images"
    if spec.download is None:
        hint = ("This dataset has no automatic download: build the images with the ProGAN "
                "(Karras et al. 2018) CelebA-HQ scripts or take them from CelebAMask-HQ.")
    elif download:
        hint = "The download finished but the files are still not in place."
    else:
        hint = "Pass --download to fetch it with torchvision (needs network access)."
    message = (f"dataset {spec.name!r} (split {split!r}) not found under {root}: looked in "
               f"{looked}. Expected layout under --root: {spec.layout}. {hint} "
               f"Or pass --root DIR for the folder that holds it.")
    if spec.name == "mnist" and split == "train" and any(
            mnist_file(d, "t10k", "images-idx3") for d in spec.candidates(root)):
        message += " (Only the MNIST test files are there; use split 'test' to read them.)"
    return message
