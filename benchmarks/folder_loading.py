"""Image-folder loading: images/s of ddpmkit's folder dataset with 0, 2, 4 ... DataLoader
workers against torchvision's `ImageFolder` with the same transforms on the same folder, and
the start-up cost of the folder index (first start: every file decoded once; later starts:
the cached index, only a `stat` per file).

    python benchmarks/folder_loading.py --folder /tmp/cifar10-jpg --image-size 32
    python benchmarks/folder_loading.py --index-only --make-tiny 100000 --folder /tmp/tiny100k

Without --folder the CIFAR-10 test JPEGs in ../shared/data are extracted to a temporary folder.
The transform both loaders run: decode, RGB, largest centred square, bicubic resize to
--image-size, [-1, 1] float tensor. torchvision does it with its own classes (Resize +
CenterCrop, ToTensor, Normalize), which equal ddpmkit's crop-then-resize when the images
already have the target size (CIFAR-10).
"""

import argparse
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import cpu_model  # noqa: E402

from ddpmkit.data.folder import build_index  # noqa: E402
from ddpmkit.data.images import available_cpus, build_dataset  # noqa: E402

SHARED_TARBALL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "..", "shared", "data", "cifar10", "cifar10-test-jpg.tar.gz")
TINY_SIDE = 8  # pixels of the generated index-benchmark files


def extract_cifar_jpgs(target: str) -> str:
    if not os.path.isfile(SHARED_TARBALL):
        raise SystemExit(f"pass --folder: {SHARED_TARBALL} is not there")
    with tarfile.open(SHARED_TARBALL) as tar:
        tar.extractall(target, filter="data")
    return target


def make_tiny_folder(folder: str, count: int) -> None:
    """`count` distinct 8x8 PNGs in subfolders of 1,000 (skipped when already there)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    made = 0
    for i in range(count):
        path = os.path.join(folder, f"{i // 1000:03d}", f"{i:06d}.png")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (TINY_SIDE, TINY_SIDE, 3), dtype=np.uint8)).save(path)
        made += 1
    print(f"{folder}: {count} files ({made} written now)")


def time_index(folder: str, cache_dir: str) -> None:
    for label in ("first start (decodes every file)", "cached start (stat only)"):
        start = time.perf_counter()
        index = build_index(folder, cache_dir=cache_dir, workers=available_cpus())
        seconds = time.perf_counter() - start
        print(f"index, {label}: {seconds:.2f} s for {len(index.files) + len(index.bad)} files "
              f"({available_cpus()} process(es))")


def images_per_second(dataset, workers: int, batch_size: int, epochs: int) -> float:
    """Images/s over `epochs` passes, after one untimed batch (worker start-up excluded)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    next(iter(loader))
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _ in loader:
            count += images.shape[0]
    return count / (time.perf_counter() - start)


def torchvision_folder(folder: str, size: int):
    from torchvision import datasets, transforms

    return datasets.ImageFolder(folder, transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(0.5, 0.5)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=None, help="image folder (default: CIFAR-10 test JPEGs)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1, help="timed passes over the folder")
    p.add_argument("--make-tiny", type=int, default=0, metavar="N",
                   help="first fill --folder with N tiny PNGs (for the index timing)")
    p.add_argument("--index-only", action="store_true", help="time the index only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or extract_cifar_jpgs(os.path.join(scratch, "cifar10"))
        if args.make_tiny:
            make_tiny_folder(folder, args.make_tiny)
        print(f"CPU: {cpu_model()}, {available_cpus()} usable core(s); folder {folder}")
        time_index(folder, os.path.join(scratch, "index-cache"))
        if args.index_only:
            return 0
        ours = build_dataset("folder", folder, image_size=args.image_size, random_flip=False)
        theirs = torchvision_folder(folder, args.image_size)
        print(f"{len(ours)} images, batch {args.batch_size}, {args.epochs} timed epoch(s)")
        print("| workers | ddpmkit img/s | torchvision ImageFolder img/s | ratio |")
        print("|---:|---:|---:|---:|")
        for workers in args.workers:
            a = images_per_second(ours, workers, args.batch_size, args.epochs)
            b = images_per_second(theirs, workers, args.batch_size, args.epochs)
            print(f"| {workers} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
