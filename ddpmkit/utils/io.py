"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A process killed at any moment leaves either the old file or the new one, never half of one
(plus at worst a hidden `.NAME.*.tmp`, which the next run of the same command removes). A write
that fails (disk full, no permission, read-only file system) is a one-line UserError naming
the path and the cause; the old file is untouched.
"""

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Callable, Sequence

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


def _nearest_existing(path: str) -> str:
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def check_writable_folder(folder: str, what: str, free_bytes: int = 0) -> None:
    """Refuse, leaving nothing behind, a folder that cannot be created or written: a file in
    its place or in its path, a folder that refuses a new file (no permission, a read-only or
    virtual file system such as /proc: a probe file is created and removed at once, since
    permission bits do not tell root the truth), or less than `free_bytes` free space."""
    path = os.path.abspath(os.path.expanduser(folder))
    probe = _nearest_existing(path)
    if not os.path.isdir(probe):
        raise UserError(f"{what} {folder}: {probe} is a file, not a folder; choose another path")
    action = "write into it" if probe == path else f"create folders in {probe}"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ddpmkit-probe.", suffix=TEMP_SUFFIX, dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        cause = ("no permission" if exc.errno in (errno.EACCES, errno.EPERM)
                 else os.strerror(exc.errno) if exc.errno else str(exc))
        raise UserError(f"{what} {folder}: cannot {action} ({cause}); choose another "
                        "path") from exc
    if free_bytes:
        check_free_space(folder, what, free_bytes)


def check_free_space(folder: str, what: str, needed: int, of: str = "one checkpoint") -> None:
    """Refuse before any work where the file system of `folder` (or of its nearest existing
    parent) has less than `needed` bytes free: `of` names what needs them."""
    probe = _nearest_existing(os.path.abspath(os.path.expanduser(folder)))
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(f"{what} {folder}: {_size(free)} free, and {of} needs about "
                        f"{_size(needed)}; free some space or choose another path")


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


# ---- replacing only what this project wrote --------------------------------------------------
# A folder this project writes whole (an export) holds this file: the list of what it wrote.
OWNED_MARKER = ".ddpmkit-written.json"


def _relative_files(folder: str) -> set[str]:
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return found


def _is_within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it (both absolute, symlinks resolved)."""
    return os.path.commonpath([path, folder]) == folder


def check_not_protected(out: str, what: str, inputs: Sequence[str] = ()) -> None:
    """Refuse an existing folder `out` that is never replaced, whatever it holds (even empty):
    a symbolic link, the working folder or one of its parents, an input or a folder holding
    one."""
    real = os.path.realpath(out)
    if os.path.islink(out):
        raise UserError(f"{what} {out} is a symbolic link; give the folder itself")
    if _is_within(os.getcwd(), real):
        raise UserError(f"{what} {out} is the working folder or holds it; it is never "
                        "replaced: choose a new folder")
    for path in inputs:
        if path and os.path.lexists(path) and _is_within(os.path.realpath(path), real):
            raise UserError(f"{what} {out} holds the input {path}; it is never replaced: "
                            "choose a new folder")


def check_replaceable_folder(out: str, what: str, inputs: Sequence[str] = ()) -> None:
    """Refuse (one line, nothing touched) to replace folder `out` unless this project wrote
    it whole: its marker lists exactly the files it holds; and never a protected folder
    (`check_not_protected`)."""
    check_not_protected(out, what, inputs)
    marker = os.path.join(out, OWNED_MARKER)
    try:
        with open(marker, encoding="utf-8") as f:
            listed = set(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{what} {out} was not written by ddpmkit (no {OWNED_MARKER} "
                        "listing its files), so it is not replaced: choose a new folder or "
                        "empty it yourself") from exc
    extra = sorted(_relative_files(out) - listed - {OWNED_MARKER})
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise UserError(f"{what} {out} holds files ddpmkit did not write "
                        f"({', '.join(extra[:3])}{more}), so it is not replaced: choose a new "
                        "folder or move them out")


def check_replaceable_file(out: str, what: str, ours: Callable[[str], bool],
                           inputs: Sequence[str] = ()) -> None:
    """Refuse (one line) to replace file `out` unless `ours(out)` says this project wrote it;
    an input of the command is never replaced."""
    for path in inputs:
        if path and os.path.exists(path) and os.path.exists(out) \
                and os.path.samefile(path, out):
            raise UserError(f"{what} {out} is the input {path}; it is never replaced: choose "
                            "another output path")
    if os.path.isdir(out):
        raise UserError(f"{what} {out} is a folder; give a file path")
    if os.path.lexists(out) and (os.path.islink(out) or not ours(out)):
        raise UserError(f"{what} {out} is not a file ddpmkit wrote, so it is not replaced: "
                        "choose another output path")


def _set_modes(folder: str) -> None:
    """The permissions plain mkdir() / open() would give (mkdtemp and some writers use
    owner-only modes)."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def write_folder_atomically(out: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` fills a temp folder beside `out`, which then replaces `out` by renames.

    The folder gets the marker `OWNED_MARKER` listing what `write` made, so a later call may
    replace it (`check_replaceable_folder`); callers check `out` before any work."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=TEMP_SUFFIX,
                               dir=parent)
    except OSError as exc:
        raise write_error(out, exc) from exc
    old = None
    try:
        write(tmp)
        files = sorted(_relative_files(tmp))
        with open(os.path.join(tmp, OWNED_MARKER), "w", encoding="utf-8") as f:
            json.dump({"written_by": "ddpmkit", "files": files}, f, indent=1)
        _set_modes(tmp)
        if os.path.lexists(out):
            old = tmp + ".old"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)  # put the previous output back
                old = None
            raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(out, exc) from exc
        raise
    if old is not None:
        shutil.rmtree(old)


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
