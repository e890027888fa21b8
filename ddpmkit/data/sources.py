"""Where each image dataset's files are, how they become a Dataset, and their downloads.

Each `load_<name>(request)` finds the dataset's files under `request.root` (in the folders its
`<name>_dirs(root)` lists, torchvision's layouts first) and returns a Dataset, or None when
they are not there; the registry (`ddpmkit.data.images`) then downloads or reports what it
looked for. Resizing uses PIL's antialiased bilinear filter (what torchvision's `Resize` does on
PIL images) for the reference datasets and bicubic for `folder` and `celebahq`. Folders of any
mode, size and aspect, their conversion rules and their checked, cached file index are in
`ddpmkit.data.folder`; the file readers in `ddpmkit.data.readers`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ddpmkit.data.datasets import CropResize, FileImageDataset, TensorImageDataset
from ddpmkit.data.folder import (
    IMAGE_EXTENSIONS,
    ResizeTo,
    build_index,
    pin_files,
    report_bad_files,
    to_channels,
)
from ddpmkit.data.loaders import available_cpus
from ddpmkit.data.readers import read_celeba_partition, read_cifar_batch, read_idx, resize_uint8
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

# The reference's CelebA crop of the 178x218 aligned faces: (left, top, right, bottom).
CELEBA_CROP_BOX = (15, 40, 15 + 148, 40 + 148)
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}


@dataclass(frozen=True)
class FolderOptions:
    """How a `folder` dataset reads its images (see `ddpmkit.data.folder`)."""

    channels: int | None = None  # None: 1 when every image is grayscale, else 3
    resize_mode: str = "center-crop"
    strict_images: bool = False
    files: tuple[str, ...] | None = None  # a resumed run's files (None: all that decode)
    report: bool = True  # name the undecodable files (training did so once already: False)

    @classmethod
    def from_config(cls, dataset: Mapping[str, Any], files: Sequence[str] | None = None
                    , report: bool = True) -> FolderOptions:
        """The options a (resolved) config's `dataset` section records."""
        return cls(channels=dataset.get("channels"),
                   resize_mode=dataset.get("resize_mode") or "center-crop",
                   strict_images=bool(dataset.get("strict_images")),
                   files=None if files is None else tuple(files), report=report)


@dataclass(frozen=True)
class Request:
    """What `build_dataset` asks a loader for: where, which split, at what size, with flips."""

    root: str
    split: str
    resolution: tuple[int, int]  # (H, W)
    random_flip: bool
    folder: FolderOptions | None = None


def _first_existing(paths: Sequence[str], predicate: Callable[[str], bool]) -> str | None:
    for path in paths:
        if predicate(path):
            return path
    return None


def mnist_dirs(root: str) -> list[str]:
    return [os.path.join(root, "MNIST", "raw"), os.path.join(root, "mnist", "MNIST", "raw"),
            os.path.join(root, "mnist"), os.path.join(root, "MNIST"), root]


def mnist_file(folder: str, prefix: str, kind: str) -> str | None:
    """`kind` is 'images-idx3' or 'labels-idx1'; accepts both spellings and .gz or raw."""
    dotted = kind.replace("-idx", ".idx")
    for stem in (f"{prefix}-{kind}-ubyte", f"{prefix}-{dotted}-ubyte"):
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def load_mnist(req: Request) -> Dataset | None:
    prefix = "train" if req.split == "train" else "t10k"

    def complete(folder: str) -> bool:
        return all(mnist_file(folder, prefix, k) for k in ("images-idx3", "labels-idx1"))

    folder = _first_existing(mnist_dirs(req.root), complete)
    if folder is None:
        return None
    images = read_idx(mnist_file(folder, prefix, "images-idx3"))
    labels = read_idx(mnist_file(folder, prefix, "labels-idx1"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UserError(f"MNIST files in {folder} do not match: images {images.shape}, "
                        f"labels {labels.shape}")
    images = resize_uint8(images[:, None].astype(np.uint8), _square(req, "mnist"))
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                              req.random_flip)


def cifar10_dirs(root: str) -> list[str]:
    return [os.path.join(root, "cifar-10-batches-py"),
            os.path.join(root, "cifar10", "cifar-10-batches-py"),
            os.path.join(root, "CIFAR10", "cifar-10-batches-py")]


def _cifar10_files(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def load_cifar10(req: Request) -> Dataset | None:
    names = _cifar10_files(req.split)
    folder = _first_existing(
        cifar10_dirs(req.root),
        lambda d: all(os.path.isfile(os.path.join(d, n)) for n in names))
    if folder is None:
        return None
    batches = [read_cifar_batch(os.path.join(folder, n)) for n in names]
    images = resize_uint8(np.concatenate([b[0] for b in batches]), _square(req, "cifar10"))
    labels = np.concatenate([b[1] for b in batches])
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels), req.random_flip)


def celeba_dirs(root: str) -> list[str]:
    return [os.path.join(root, "celeba"), os.path.join(root, "CelebA"), root]


def load_celeba(req: Request) -> Dataset | None:
    folder = _first_existing(
        celeba_dirs(req.root),
        lambda d: os.path.isdir(os.path.join(d, "img_align_celeba"))
        and os.path.isfile(os.path.join(d, "list_eval_partition.txt")))
    if folder is None:
        return None
    entries = read_celeba_partition(os.path.join(folder, "list_eval_partition.txt"))
    if req.split != "all":
        entries = [e for e in entries if e[1] == CELEBA_SPLITS[req.split]]
    if not entries:
        raise UserError(f"CelebA split {req.split!r} is empty in "
                        f"{os.path.join(folder, 'list_eval_partition.txt')}")
    files = [name for name, _ in entries]
    transform = CropResize(_square(req, "celeba"), CELEBA_CROP_BOX, Image.BILINEAR)
    return FileImageDataset(os.path.join(folder, "img_align_celeba"), files, [0] * len(files),
                            transform, 3, req.random_flip)


def celebahq_dirs(root: str) -> list[str]:
    return [os.path.join(root, "celeba_hq", "img_celeba_hq"), os.path.join(root, "celeba_hq"),
            os.path.join(root, "celebahq", "img_celeba_hq"), os.path.join(root, "celebahq")]


def _numeric_key(path: str):
    # "2.png" before "10.png"; names that are not numbers sort after, alphabetically.
    stem = os.path.splitext(os.path.basename(path))[0]
    return (0, int(stem), path) if stem.isdigit() else (1, 0, path)


def load_celebahq(req: Request) -> Dataset | None:
    for folder in celebahq_dirs(req.root):
        if os.path.isdir(folder):
            files = [f for f in os.listdir(folder)
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
            if files:
                files.sort(key=_numeric_key)
                transform = ResizeTo(*req.resolution, "center-crop")
                return FileImageDataset(folder, files, [0] * len(files), transform, 3,
                                        req.random_flip)
    return None


def folder_labels(files: Sequence[str]) -> tuple[list[int], list[str]]:
    """(label per file, class names): one class per folder that holds images, named by its
    path relative to the root ("." for the root itself), labels in sorted name order (like
    torchvision's ImageFolder, at any depth)."""
    parents = [os.path.dirname(f) or "." for f in files]
    names = sorted(set(parents))
    index = {name: i for i, name in enumerate(names)}
    return [index[p] for p in parents], names


def _square(req: Request, name: str) -> int:
    height, width = req.resolution
    if height != width:
        raise UserError(f"{name} images are square: pass one --image-size, not "
                        f"{height},{width} (non-square sizes are for --dataset folder)")
    return height


def folder_channels(index, channels: int | None, files: Sequence[str] | None = None) -> int:
    """The channels a folder trains: `channels` if given, else 1 when every image (of `files`,
    a resumed run's, if given) is grayscale (stated in the log), else 3."""
    if channels is not None:
        if channels not in (1, 3):
            raise UserError(f"--channels must be 1 or 3, got {channels}")
        return channels
    gray = dict(zip(index.files, index.grayscale))
    channels = 1 if all(gray.get(f, False) for f in (index.files if files is None else files)) \
        else 3
    logger.info("--channels auto: %s under %s, so the model has %d channel(s)",
                "every image is grayscale" if channels == 1 else "some images have color",
                index.root, channels)
    return channels


def load_folder(req: Request) -> Dataset | None:
    if not os.path.isdir(req.root):
        return None
    options = req.folder or FolderOptions()
    index = build_index(req.root, workers=available_cpus())
    if options.report:
        report_bad_files(index, options.strict_images)
    files = index.files if options.files is None else pin_files(index, options.files)
    labels, _ = folder_labels(files)
    channels = folder_channels(index, options.channels, files)
    return FileImageDataset(req.root, files, labels, ResizeTo(*req.resolution,
                            options.resize_mode), channels, req.random_flip,
                            convert=functools.partial(to_channels, channels=channels))


# Downloads (torchvision's downloaders, where they exist)


def download_mnist(root: str, split: str) -> None:
    from torchvision.datasets import MNIST
    MNIST(root, train=split == "train", download=True)


def download_cifar10(root: str, split: str) -> None:
    from torchvision.datasets import CIFAR10
    CIFAR10(root, train=split == "train", download=True)


def download_celeba(root: str, split: str) -> None:
    from torchvision.datasets import CelebA
    CelebA(root, split="all", target_type=[], download=True)
