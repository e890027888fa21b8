"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A process killed at any moment leaves either the old file or the new one, never half of one
(plus at worst a hidden `.NAME.*.tmp`, which the next run of the same command removes). A write
that fails (disk full, no permission, read-only file system) is a one-line UserError naming
the path and the cause; the old file is untouched.
"""

import errno
import hashlib
import io
import os
import tempfile
from typing import Callable

from ddpmkit.errors import UserError, cause_of_type

TEMP_SUFFIX = ".tmp"
HASH_CHUNK_BYTES = 1 << 22


def sha256_of_file(path: str) -> str:
    """The file's sha256 hex digest, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open folders; rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's file-creation mask (read by setting it, then restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path: str, exc: BaseException) -> UserError:
    """A one-line UserError for a failed write of `path`, naming the cause."""
    os_error = cause_of_type(exc, OSError)
    if os_error is not None and os_error.errno is not None:
        cause = os.strerror(os_error.errno)
        code = errno.errorcode.get(os_error.errno, "")
        cause = f"{cause} ({code})" if code else cause
    else:
        text = str(exc).strip().splitlines()
        cause = text[0] if text else type(exc).__name__
    return UserError(f"cannot write {path}: {cause}; nothing was replaced")


def check_writable_folder(folder: str, what: str) -> None:
    """Refuse, without writing anything, a folder that cannot be created or written: a file in
    its place or in its path, or no write permission on it or its nearest existing parent."""
    path = os.path.abspath(os.path.expanduser(folder))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"{what} {folder}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        action = "write into" if probe == path else f"create folders in {probe} for"
        raise UserError(f"{what} {folder}: no permission to {action} it; choose another path")


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None],
                 durable: bool = True) -> None:
    """Call `write(f)` on a temp file `.NAME.*.tmp` beside `path`, then rename it to `path`.

    `durable` also fsyncs the file and the folder, so the new file survives a power loss;
    sample PNGs skip that (they can be regenerated bit for bit, and two fsyncs per image
    cost more than the image).
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                                   suffix=TEMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        # mkstemp makes the file owner-only; give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, Exception) and cause_of_type(exc, OSError) is not None:
            raise write_error(path, exc) from exc
        raise
    if durable:
        _fsync_dir(folder)


def atomic_write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    atomic_write(path, lambda f: f.write(data), durable=durable)
