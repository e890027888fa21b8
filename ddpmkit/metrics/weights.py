"""The FID Inception weights file: find it, download it, check it.

The file `pt_inception-2015-12-05-6726825d.pth` holds the TF Inception graph of 2015-12-05 ported
to PyTorch. pytorch-fid publishes it under that name; torch-fidelity caches its copy as
`weights-inception-2015-12-05-6726825d.pth` (the same sha256 prefix), used here only if its full
hash matches. A file is identified by content (size and sha256), never by name alone: one that
does not match is refused, so the numbers computed here stay comparable with published FIDs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from ddpmkit.errors import UserError
from ddpmkit.utils.io import sha256_of_file

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60
HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class WeightsFile:
    """A weights file identified by content: where it is published and its sha256 / size."""

    filename: str
    url: str
    sha256: str
    num_bytes: int
    # Other names the same bytes are cached under by other tools (accepted only if the hash fits).
    alt_filenames: tuple[str, ...] = ()


INCEPTION_WEIGHTS = WeightsFile(
    filename="pt_inception-2015-12-05-6726825d.pth",
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    num_bytes=95_628_359,
    alt_filenames=("weights-inception-2015-12-05-6726825d.pth",),  # torch-fidelity's cache name
)


def verify_weights_file(path: str, spec: WeightsFile) -> None:
    """Refuse (UserError) a file whose size or sha256 differs from `spec`'s."""
    size = os.path.getsize(path)
    if size != spec.num_bytes:
        raise UserError(
            f"Inception weights {path!r} have {size:,} bytes, expected {spec.num_bytes:,} "
            f"(incomplete or wrong file): delete it and download {spec.url}"
        )
    actual = sha256_of_file(path)
    if actual != spec.sha256:
        raise UserError(
            f"Inception weights {path!r} have sha256 {actual}, expected {spec.sha256}: "
            f"refusing a corrupt or different file; delete it and download {spec.url}"
        )


def default_weights_dir() -> str:
    """torch hub's checkpoint folder (`$TORCH_HOME/hub/checkpoints`), shared with pytorch-fid and
    torch-fidelity."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _download(spec: WeightsFile, dest: str) -> None:
    """Stream `spec.url` to `dest` (temp file + rename), checking size and sha256 on the way."""
    folder = os.path.dirname(os.path.abspath(dest))
    created = []  # the folders this call makes, deepest first: removed again on failure
    probe = folder
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        created.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dest) + ".", suffix=".part",
                                   dir=folder)
    except OSError:
        _remove_empty(created)
        raise
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(
                spec.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            for chunk in iter(lambda: response.read(HASH_CHUNK_BYTES), b""):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise UserError(f"the file downloaded from {spec.url} has sha256 "
                            f"{digest.hexdigest()}, expected {spec.sha256}; not keeping it")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not os.path.exists(dest):
            _remove_empty(created)


def _remove_empty(folders: list[str]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)  # only an empty folder goes
        except OSError:
            return


def resolve_inception_weights(
    path: str | None = None,
    *,
    spec: WeightsFile | None = None,
    cache_dir: str | None = None,
    download: bool = True,
) -> tuple[str, str]:
    """Find the verified weights file; return (path, sha256).

    Order: `path` if given (must exist and match the hash); else `spec.filename` (or one of its
    alternative names) in `cache_dir` (default: torch hub's checkpoint folder); else download it
    there (when `download`). Offline without the file: a UserError that says where to put it.
    `spec` defaults to `INCEPTION_WEIGHTS`, looked up at call time.
    """
    spec = spec if spec is not None else INCEPTION_WEIGHTS
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise UserError(f"Inception weights file {path!r} does not exist")
        verify_weights_file(path, spec)
        return path, spec.sha256

    cache_dir = os.path.expanduser(cache_dir) if cache_dir else default_weights_dir()
    primary = os.path.join(cache_dir, spec.filename)
    if os.path.isfile(primary):
        verify_weights_file(primary, spec)
        return primary, spec.sha256
    for name in spec.alt_filenames:
        candidate = os.path.join(cache_dir, name)
        if os.path.isfile(candidate):
            try:
                verify_weights_file(candidate, spec)
            except UserError as exc:  # another tool's file under that name: not ours to use
                logger.warning("ignoring %s: %s", candidate, exc)
                continue
            return candidate, spec.sha256

    where = (f"download {spec.url} and put it at {primary} (sha256 {spec.sha256}), "
             f"or pass --inception-weights PATH")
    if not download:
        raise UserError(f"Inception weights not found; {where}")
    logger.info("downloading Inception weights %s -> %s", spec.url, primary)
    try:
        _download(spec, primary)
    except (urllib.error.URLError, OSError) as exc:  # HTTPError and timeouts are subclasses
        raise UserError(f"Inception weights not found and the download failed ({exc}); "
                        f"{where}") from exc
    return primary, spec.sha256
