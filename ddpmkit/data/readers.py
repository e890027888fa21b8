"""File readers of the reference datasets: IDX (MNIST), pickled CIFAR-10 batches (a safe
unpickler), CelebA's partition list, and a uint8 batch resize.

The MNIST reader is our own (IDX format: big-endian magic 0x0000TTNN, TT the element type, NN
the number of dims, then NN big-endian uint32 sizes, then the data): torchvision's MNIST class
refuses a directory that lacks one of the four files.
"""

from __future__ import annotations

import codecs
import gzip
import math
import pickle
import struct
from typing import Callable, ClassVar

import numpy as np
from PIL import Image

from ddpmkit.errors import UserError

# IDX element types (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw, detected from its first bytes) into an array."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == _GZIP_MAGIC:
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"IDX file {path} is truncated (header)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise UserError(f"IDX file {path} has {len(data)} bytes; its header {dims} implies "
                        f"{expected}: the file is truncated or corrupt")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 batches that refuses every global except numpy's array
    reconstruction, so a tampered file cannot run code."""

    # Looked up through numpy itself rather than by module path: numpy 2 renamed numpy.core
    # (the path recorded in the files) to numpy._core and warns on the old name.
    _ALLOWED: ClassVar[dict[tuple[str, str], Callable]] = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Protocol-2 pickles written by Python 3 (re-saved copies) rebuild bytes with this.
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a CIFAR batch") from None


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One `cifar-10-batches-py` batch -> images uint8 (N, 3, 32, 32), labels int64 (N,)."""
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="bytes").load()
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry.get(b"labels", entry.get(b"fine_labels")), dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError,
            AttributeError) as exc:
        raise UserError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"CIFAR-10 batch {path} has {images.shape[0]} images but "
                        f"{labels.shape[0]} labels")
    return images, labels


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (N, C, H, W) images to (N, C, size, size) with PIL bilinear (antialiased),
    as torchvision's `Resize` does; a no-op at the right size."""
    if images.shape[2:] == (size, size):
        return images
    out = np.empty(images.shape[:2] + (size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        hwc = image.transpose(1, 2, 0)
        pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
        resized = np.asarray(pil.resize((size, size), Image.BILINEAR))
        out[i] = resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
    return out


def read_celeba_partition(path: str) -> list[tuple[str, int]]:
    """`list_eval_partition.txt` -> [(file name, partition 0/1/2)]."""
    entries = []
    try:
        with open(path, "r", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                    raise UserError(f"{path} line {line_no}: expected '<file> <0|1|2>', got "
                                    f"{line.strip()!r}")
                entries.append((fields[0], int(fields[1])))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    return entries
