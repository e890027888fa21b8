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
from files per item (use worker processes). Resizing uses PIL's antialiased bilinear filter
(what torchvision's `Resize` does on PIL images) for the reference datasets and bicubic for
`folder` and `celebahq`. Folders of any mode, size and aspect, their conversion rules and their
checked, cached file index are in `ddpmkit.data.folder`. Random flips draw from torch's RNG,
which DataLoader seeds per worker from its `generator`, so a seeded loader gives the same flips
every run.

The file readers (IDX for MNIST, safely unpickled CIFAR-10 batches, CelebA's partition list)
are in `ddpmkit.data.readers`.
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
from torch.utils.data import DataLoader, Dataset, Sampler

from ddpmkit.choices import IMAGE_DATASETS
from ddpmkit.config.schema import size_hw
from ddpmkit.data.folder import (
    IMAGE_EXTENSIONS,
    ResizeTo,
    build_index,
    pin_files,
    report_bad_files,
    to_channels,
)
from ddpmkit.data.readers import (  # noqa: F401  (read_idx: part of this module's API)
    read_celeba_partition,
    read_cifar_batch,
    read_idx,
    resize_uint8,
)
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "~/datasets"

# The reference's CelebA crop of the 178x218 aligned faces: (left, top, right, bottom).
CELEBA_CROP_BOX = (15, 40, 15 + 148, 40 + 148)
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
# Batches per worker kept in flight; 2 (torch's default) starves fast GPUs on small images.
PREFETCH_FACTOR = 4


# --------------------------------------------------------------------------------------------
# Dataset classes


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images_uint8.to(torch.float32).div_(127.5).sub_(1.0)


def _maybe_flip(image: torch.Tensor, random_flip: bool) -> torch.Tensor:
    if random_flip and torch.rand(()) < 0.5:
        return image.flip(-1)
    return image


class TensorImageDataset(Dataset):
    """Images held in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, random_flip: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = _maybe_flip(self.images[index], self.random_flip)
        return to_unit_range(image), int(self.labels[index])


class CropResize:
    """PIL transform: optional crop box, then resize to size x size if not already that size."""

    def __init__(self, size: int, box: tuple[int, int, int, int] | None = None,
                 resample: int = Image.BILINEAR):
        self.size, self.box, self.resample = size, box, resample

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.box is not None:
            image = image.crop(self.box)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), self.resample)
        return image


class FileImageDataset(Dataset):
    """Images decoded from files per item: root + relative paths, one label per file."""

    def __init__(self, root: str, files: Sequence[str], labels: Sequence[int],
                 transform: Callable[[Image.Image], Image.Image], channels: int = 3,
                 random_flip: bool = False,
                 convert: Callable[[Image.Image], Image.Image] | None = None):
        if len(files) != len(labels):
            raise ValueError("files and labels must have the same length")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root = root
        # A numpy string array, not a list of str objects: DataLoader workers read it without
        # touching Python refcounts, so forked workers do not copy the parent's pages.
        self.files = np.asarray(files, dtype=np.str_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.mode = "L" if channels == 1 else "RGB"
        self.random_flip = random_flip
        # To the model's mode: PIL's plain conversion unless a rule set is given (folders').
        self.convert = convert or functools.partial(Image.Image.convert, mode=self.mode)

    def __len__(self) -> int:
        return len(self.files)

    def load_uint8(self, index: int) -> torch.Tensor:
        """The transformed image as uint8 (C, H, W), before flip and scaling."""
        path = os.path.join(self.root, str(self.files[index]))
        try:
            with Image.open(path) as image:
                image = self.transform(self.convert(image))
        except OSError as exc:  # missing file, truncated or undecodable image
            raise UserError(f"cannot read image {path}: {exc}") from exc
        array = np.array(image, dtype=np.uint8)  # (H, W) or (H, W, C); a writable copy
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1)  # (C, H, W)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = _maybe_flip(self.load_uint8(index), self.random_flip)
        return to_unit_range(image), int(self.labels[index])


# --------------------------------------------------------------------------------------------
# Dataset builders: each finds its files under `root` or returns None (then the registry
# downloads or reports what it looked for).


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
class _Request:
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


def _mnist_dirs(root: str) -> list[str]:
    return [os.path.join(root, "MNIST", "raw"), os.path.join(root, "mnist", "MNIST", "raw"),
            os.path.join(root, "mnist"), os.path.join(root, "MNIST"), root]


def _mnist_file(folder: str, prefix: str, kind: str) -> str | None:
    """`kind` is 'images-idx3' or 'labels-idx1'; accepts both spellings and .gz or raw."""
    dotted = kind.replace("-idx", ".idx")
    for stem in (f"{prefix}-{kind}-ubyte", f"{prefix}-{dotted}-ubyte"):
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def _load_mnist(req: _Request) -> Dataset | None:
    prefix = "train" if req.split == "train" else "t10k"

    def complete(folder: str) -> bool:
        return all(_mnist_file(folder, prefix, k) for k in ("images-idx3", "labels-idx1"))

    folder = _first_existing(_mnist_dirs(req.root), complete)
    if folder is None:
        return None
    images = read_idx(_mnist_file(folder, prefix, "images-idx3"))
    labels = read_idx(_mnist_file(folder, prefix, "labels-idx1"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UserError(f"MNIST files in {folder} do not match: images {images.shape}, "
                        f"labels {labels.shape}")
    images = resize_uint8(images[:, None].astype(np.uint8), _square(req, "mnist"))
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                              req.random_flip)


def _cifar10_dirs(root: str) -> list[str]:
    return [os.path.join(root, "cifar-10-batches-py"),
            os.path.join(root, "cifar10", "cifar-10-batches-py"),
            os.path.join(root, "CIFAR10", "cifar-10-batches-py")]


def _cifar10_files(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _load_cifar10(req: _Request) -> Dataset | None:
    names = _cifar10_files(req.split)
    folder = _first_existing(
        _cifar10_dirs(req.root),
        lambda d: all(os.path.isfile(os.path.join(d, n)) for n in names))
    if folder is None:
        return None
    batches = [read_cifar_batch(os.path.join(folder, n)) for n in names]
    images = resize_uint8(np.concatenate([b[0] for b in batches]), _square(req, "cifar10"))
    labels = np.concatenate([b[1] for b in batches])
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels), req.random_flip)


def _celeba_dirs(root: str) -> list[str]:
    return [os.path.join(root, "celeba"), os.path.join(root, "CelebA"), root]


def _load_celeba(req: _Request) -> Dataset | None:
    folder = _first_existing(
        _celeba_dirs(req.root),
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


def _celebahq_dirs(root: str) -> list[str]:
    return [os.path.join(root, "celeba_hq", "img_celeba_hq"), os.path.join(root, "celeba_hq"),
            os.path.join(root, "celebahq", "img_celeba_hq"), os.path.join(root, "celebahq")]


def _numeric_key(path: str):
    # "2.png" before "10.png"; names that are not numbers sort after, alphabetically.
    stem = os.path.splitext(os.path.basename(path))[0]
    return (0, int(stem), path) if stem.isdigit() else (1, 0, path)


def _load_celebahq(req: _Request) -> Dataset | None:
    for folder in _celebahq_dirs(req.root):
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


def _square(req: _Request, name: str) -> int:
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


def _load_folder(req: _Request) -> Dataset | None:
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


# --------------------------------------------------------------------------------------------
# Downloads (torchvision's downloaders, where they exist)


def _download_mnist(root: str, split: str) -> None:
    from torchvision.datasets import MNIST
    MNIST(root, train=split == "train", download=True)


def _download_cifar10(root: str, split: str) -> None:
    from torchvision.datasets import CIFAR10
    CIFAR10(root, train=split == "train", download=True)


def _download_celeba(root: str, split: str) -> None:
    from torchvision.datasets import CelebA
    CelebA(root, split="all", target_type=[], download=True)


# --------------------------------------------------------------------------------------------
# Registry


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
    load: Callable[[_Request], Dataset | None]
    candidates: Callable[[str], list[str]]  # folders looked in, for error messages
    download: Callable[[str, str], None] | None = None


DATASETS: dict[str, ImageDatasetSpec] = {
    spec.name: spec for spec in (
        ImageDatasetSpec(
            "mnist", 1, 32, False, ("train", "test"), "train",
            "MNIST/raw/{train,t10k}-images-idx3-ubyte[.gz] and "
            "{train,t10k}-labels-idx1-ubyte[.gz] (torchvision's MNIST layout); split 'test' "
            "needs only the t10k files",
            _load_mnist, _mnist_dirs, _download_mnist),
        ImageDatasetSpec(
            "cifar10", 3, 32, True, ("train", "test"), "train",
            "cifar-10-batches-py/data_batch_1..5 and test_batch (torchvision's CIFAR-10 python "
            "version)",
            _load_cifar10, _cifar10_dirs, _download_cifar10),
        ImageDatasetSpec(
            "celeba", 3, 64, True, ("train", "valid", "test", "all"), "all",
            "celeba/img_align_celeba/*.jpg (the 178x218 aligned faces) and "
            "celeba/list_eval_partition.txt (torchvision's CelebA layout)",
            _load_celeba, _celeba_dirs, _download_celeba),
        ImageDatasetSpec(
            "celebahq", 3, 256, True, ("train", "all"), "train",
            "celeba_hq/img_celeba_hq/*.png (the 30,000 CelebA-HQ faces at 256x256; larger "
            "images are resized)",
            _load_celebahq, _celebahq_dirs),
        ImageDatasetSpec(
            "folder", 3, None, False, ("train", "all"), "train",
            f"ROOT itself: any tree of {'/'.join(IMAGE_EXTENSIONS)} images",
            _load_folder, lambda root: [root]),
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
    request = _Request(root, split, size_hw(resolution), flip, folder)

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
            _mnist_file(d, "t10k", "images-idx3") for d in spec.candidates(root)):
        message += " (Only the MNIST test files are there; use split 'test' to read them.)"
    return message


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
