"""Image folders of any mode, size and aspect: the conversion rules, the resize modes, the
checked file index (built once, cached) and the dataset.

Conversion to the model's L (one channel) or RGB (three) uint8 pixels, in this order:
1. EXIF orientation is applied (the picture stands as a viewer shows it).
2. Palettes are expanded (P, PA: to RGBA when the palette or the file has transparency, else RGB).
3. 16- and 32-bit integer gray (I;16*, I) is scaled, not clipped: v * 255 / 65535, rounded
   (I values outside [0, 65535] are first clamped to it). Float gray (F) is read as [0, 1]:
   v * 255, rounded, clamped. 1-bit images become 0 / 255.
4. Alpha (LA, La, PA, RGBA, RGBa) is composited over a white background (ALPHA_BACKGROUND).
5. CMYK, YCbCr, LAB and HSV become RGB with PIL's conversions.
6. Gray -> RGB repeats the gray level; RGB -> L takes ITU-R 601-2 luma (PIL's `convert("L")`).

An image counts as grayscale when, converted to RGB by these rules, R = G = B at every pixel;
`--channels` auto (null) trains one channel when every image of the folder is grayscale.

Resize modes to H x W (bicubic, antialiased): `center-crop` (the default, and the only
behaviour before: the largest centred crop of the target's aspect, then resize), `resize`
(stretch to H x W), `pad` (fit inside H x W keeping the aspect, black bars; PAD_FILL).

The index lists every file with an image extension under the root (recursive, sorted, hidden
skipped) and decodes each once: a file that cannot be decoded (empty, truncated, not an image)
is named in one warning and left out, so runs stay deterministic and the epoch length is known
at start (`--strict-images` refuses instead). The result is cached per folder (keyed by path,
size and modification time, under $XDG_CACHE_HOME/ddpmkit/image-index), so a later start only
stats the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ddpmkit.choices import RESIZE_MODES
from ddpmkit.errors import UserError
from ddpmkit.utils.io import atomic_write_bytes

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ALPHA_BACKGROUND = (255, 255, 255)  # white: what image viewers show behind transparency
PAD_FILL = 0  # black bars for --resize-mode pad
UINT16_MAX = 65535
INDEX_VERSION = 1
# Below this many unchecked files the index is built in this process (a pool costs more).
POOL_MIN_FILES = 2000
BAD_FILES_NAMED = 20  # bad files named one by one in the warning; the rest are counted
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_WIDE_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


# --------------------------------------------------------------------------------------------
# Conversion rules (module doc, steps 1-6)


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scaled = values * 255.0  # float images are [0, 1]
    else:  # 16-bit range scaled to 8 bits, not clipped at 255
        scaled = np.clip(values, 0, UINT16_MAX) * (255.0 / UINT16_MAX)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _composite(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_l_or_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> an upright L or RGB image by the module's rules (steps 1-5)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("P", "PA"):
        transparent = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if transparent else "RGB")
    if image.mode in _WIDE_GRAY_MODES:
        return _wide_gray_to_l(image)
    if image.mode == "1":
        return image.convert("L")
    if image.mode in _ALPHA_MODES:
        if image.mode in ("LA", "La"):
            return _composite(image).convert("L")  # gray stays gray over a gray background
        return _composite(image)
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL image -> L (channels 1) or RGB (channels 3) by the module's rules."""
    image = to_l_or_rgb(image)
    mode = "L" if channels == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)


def is_grayscale(image: Image.Image) -> bool:
    """True when the image, as RGB by the module's rules, has R = G = B everywhere."""
    image = to_l_or_rgb(image)
    if image.mode == "L":
        return True
    rgb = np.asarray(image)
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


# --------------------------------------------------------------------------------------------
# Sizes and resize modes


class ResizeTo:
    """PIL transform to height x width by `mode` (center-crop, resize or pad); bicubic."""

    def __init__(self, height: int, width: int, mode: str = "center-crop",
                 resample: int = Image.BICUBIC):
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        self.height, self.width, self.mode, self.resample = height, width, mode, resample

    def _resize(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        return image if image.size == size else image.resize(size, self.resample)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        target = (self.width, self.height)
        if self.mode == "resize":
            return self._resize(image, target)
        if self.mode == "center-crop":
            # The largest centred box of the target's aspect (integer corners, as before).
            scale = min(w / self.width, h / self.height)
            cw, ch = min(w, round(self.width * scale)), min(h, round(self.height * scale))
            left, top = (w - cw) // 2, (h - ch) // 2
            return self._resize(image.crop((left, top, left + cw, top + ch)), target)
        scale = min(self.width / w, self.height / h)  # pad: fit inside, keep the aspect
        fw, fh = max(1, round(w * scale)), max(1, round(h * scale))
        fitted = self._resize(image, (fw, fh))
        fill = PAD_FILL if image.mode == "L" else (PAD_FILL,) * 3
        canvas = Image.new(image.mode, target, fill)
        canvas.paste(fitted, ((self.width - fw) // 2, (self.height - fh) // 2))
        return canvas


# --------------------------------------------------------------------------------------------
# The checked file index


@dataclass(frozen=True)
class FolderIndex:
    """The decodable images under `root` (relative paths, sorted) and the ones left out."""

    root: str
    files: tuple[str, ...]
    grayscale: tuple[bool, ...]  # per file in `files`
    bad: tuple[tuple[str, str], ...]  # (relative path, why it cannot be decoded)

    @property
    def all_grayscale(self) -> bool:
        return bool(self.files) and all(self.grayscale)


def list_image_files(folder: str) -> list[str]:
    """Relative paths of every image file under `folder` (recursive, sorted, hidden skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, name), folder))
    return found


def check_image(path: str) -> tuple[bool | None, str | None]:
    """(grayscale, None) for a file that decodes completely; (None, why) for one that does not."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: truncated files fail here, not mid-training
            return is_grayscale(image), None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        reason = str(exc) or type(exc).__name__
        if os.path.exists(path) and os.path.getsize(path) == 0:
            reason = "empty file"
        return None, reason.splitlines()[0]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpmkit", "image-index")


def _cache_path(cache_dir: str, root: str) -> str:
    return os.path.join(cache_dir, hashlib.sha256(root.encode()).hexdigest()[:24] + ".json")


def _read_cache(path: str, root: str) -> dict[str, list]:
    """{relative path: [size, mtime_ns, grayscale or None, reason or None]}; {} if unusable."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if data.get("version") != INDEX_VERSION or data.get("root") != root:
        return {}
    return data.get("entries", {})


def _write_cache(path: str, root: str, entries: dict[str, list]) -> None:
    data = {"version": INDEX_VERSION, "root": root, "entries": entries}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, json.dumps(data).encode())
    except OSError as exc:  # a read-only home only costs the next start its checks
        logger.warning("could not cache the image index at %s (%s); the next start checks "
                       "every image again", path, exc)


def _check_all(root: str, names: Sequence[str], workers: int) -> list[tuple]:
    paths = [os.path.join(root, n) for n in names]
    if workers <= 1 or len(paths) < POOL_MIN_FILES:
        return [check_image(p) for p in paths]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(check_image, paths, chunksize=256))


def build_index(root: str, cache_dir: str | None = None, workers: int = 1) -> FolderIndex:
    """The checked index of the images under `root` (see the module doc); files whose size and
    modification time match the cache are not decoded again."""
    root = os.path.abspath(root)
    names = list_image_files(root)
    if not names:
        raise UserError(f"no images found under {root} (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)} files); point --root at a folder that "
                        "holds images")
    cache_file = _cache_path(cache_dir or default_cache_dir(), root)
    cached = _read_cache(cache_file, root)
    entries, todo = {}, []
    for name in names:
        st = os.stat(os.path.join(root, name))
        old = cached.get(name)
        if old is not None and old[:2] == [st.st_size, st.st_mtime_ns]:
            entries[name] = old
        else:
            entries[name] = [st.st_size, st.st_mtime_ns, None, None]
            todo.append(name)
    if todo:
        logger.info("checking %d new or changed image(s) under %s", len(todo), root)
        for name, (gray, reason) in zip(todo, _check_all(root, todo, workers)):
            entries[name][2:] = [gray, reason]
    if todo or len(cached) != len(entries):
        _write_cache(cache_file, root, entries)
    good = [n for n in names if entries[n][3] is None]
    return FolderIndex(root, tuple(good), tuple(bool(entries[n][2]) for n in good),
                       tuple((n, entries[n][3]) for n in names if entries[n][3] is not None))


def report_bad_files(index: FolderIndex, strict: bool) -> None:
    """Name the undecodable files once (warning), or refuse them (`strict`)."""
    if not index.bad:
        return
    named = "; ".join(f"{name} ({why})" for name, why in index.bad[:BAD_FILES_NAMED])
    more = len(index.bad) - BAD_FILES_NAMED
    named += f"; and {more} more" if more > 0 else ""
    if strict:
        raise UserError(f"--strict-images: {len(index.bad)} file(s) under {index.root} cannot "
                        f"be decoded: {named}. Remove or repair them, or drop --strict-images "
                        "to skip them")
    logger.warning("skipping %d file(s) under %s that cannot be decoded: %s", len(index.bad),
                   index.root, named)
    logger.warning("%d bad file(s) skipped; %d images used", len(index.bad), len(index.files))


def pin_files(index: FolderIndex, pinned: Sequence[str]) -> tuple[str, ...]:
    """The files a resumed run started with: each must still decode (else a UserError); files
    added since are stated and left out, so the run's epochs stay what they were."""
    usable = set(index.files)
    gone = [f for f in pinned if f not in usable]
    if gone:
        raise UserError(f"{len(gone)} image(s) this run started with are missing or no longer "
                        f"decode under {index.root} (e.g. {', '.join(gone[:3])}); restore them, "
                        "or start a new run")
    added = len(usable) - len(set(pinned))
    if added > 0:
        logger.warning("%d image(s) were added under %s after this run started; the resumed run "
                       "keeps its %d images (start a new run to train on them)", added,
                       index.root, len(pinned))
    return tuple(pinned)
