"""Image sources for evaluation: a folder of image files, or a dataset, as uint8 batches.

Images reach the Inception network as uint8 RGB (B, 3, H, W) at their own size; the network's
preprocessing resizes them to 299 x 299. Nothing here resizes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ddpmkit.data.folder import IMAGE_EXTENSIONS, to_channels
from ddpmkit.errors import UserError
from ddpmkit.utils.images import quantize

logger = logging.getLogger(__name__)



def list_images(folder: str) -> list[str]:
    """Sorted paths of the image files directly inside `folder` (UserError if none)."""
    if not os.path.isdir(folder):
        raise UserError(f"image folder {folder!r} does not exist")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder!r}")
    return [os.path.join(folder, n) for n in names]


class ImageFiles(Dataset):
    """Image files -> uint8 RGB tensors (3, H, W), decoded with PIL (`ddpmkit.data.folder`'s
    conversion rules; L samples repeat their gray level), never resized."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                # The training folders' rules (16-bit scaled, alpha over white, ...): a
                # reference folder of the user's own images reads as the model saw them.
                array = np.asarray(to_channels(image, 3), dtype=np.uint8)  # (H, W, 3)
        except OSError as exc:
            raise UserError(f"cannot read image {path!r}: {exc}") from exc
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)


def stack_same_size(images: list[torch.Tensor]) -> torch.Tensor:
    """Collate uint8 (3, H, W) images into (B, 3, H, W); mixed sizes are a UserError."""
    sizes = sorted({tuple(im.shape[-2:]) for im in images})
    if len(sizes) > 1:
        raise UserError(f"images of different sizes {sizes} in one folder; each image is resized "
                        "to 299x299 for Inception, but a batch needs one size: keep one size "
                        "per folder")
    return torch.stack(images)


def choose_subset(num_items: int, max_items: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a fixed-seed random subset of `max_items`, or None to keep all."""
    if max_items is None or num_items <= max_items:
        return None
    rng = np.random.RandomState(seed)
    return np.sort(rng.choice(num_items, size=max_items, replace=False))


def folder_batches(folder: str, batch_size: int, num_workers: int = 0,
                   max_images: int | None = None, seed: int = 0) -> DataLoader:
    """uint8 batches (B, 3, H, W) of the images in `folder` (a fixed-seed subset of `max_images`
    when there are more)."""
    paths = list_images(folder)
    subset = choose_subset(len(paths), max_images, seed)
    if subset is not None:
        logger.info("using %d of the %d images in %s (seed %d)", len(subset), len(paths), folder,
                    seed)
        paths = [paths[i] for i in subset]
    return DataLoader(ImageFiles(paths), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=stack_same_size,
                      pin_memory=torch.cuda.is_available())


def dataset_batches(dataset: Dataset, batch_size: int, num_workers: int = 0,
                    max_images: int | None = None, seed: int = 0,
                    with_labels: bool = False) -> Iterator:
    """uint8 batches of a dataset yielding images (or (image, label) pairs) in [-1, 1];
    `with_labels`: (images, labels) pairs for a dataset that has labels."""
    subset = choose_subset(len(dataset), max_images, seed)
    if subset is not None:
        dataset = Subset(dataset, subset.tolist())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available())
    for batch in loader:
        if isinstance(batch, (list, tuple)):
            images, labels = batch[0], batch[1]
            yield (quantize(images), labels.numpy()) if with_labels else quantize(images)
        else:
            yield quantize(batch)
