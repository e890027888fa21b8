"""The two kinds of image dataset that every image dataset is, and the crop-and-resize transform.

Items are `(image, label)`: image a float32 tensor (C, H, W) in [-1, 1] (x / 127.5 - 1 of the
uint8 pixels), label an int (0 where the dataset has none). `TensorImageDataset` holds small
datasets in memory as uint8 tensors; `FileImageDataset` decodes a file per item (use worker
processes). Random flips draw from torch's RNG, which DataLoader seeds per worker from its
`generator`, so a seeded loader gives the same flips every run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ddpmkit.errors import UserError


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
