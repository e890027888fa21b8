"""Checkpoint files: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts: nothing in it is
unpickled as arbitrary code. `FORMAT_VERSION` is bumped when the layout changes.
"""

import glob
import os
import pickle
import zipfile
from typing import Any, Dict, Optional

import torch

from ddpmkit.errors import UserError
from ddpmkit.utils.io import atomic_write

FORMAT_VERSION = 1


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write `state` to `path` atomically (temp file + fsync + rename)."""
    state = dict(state)
    state.setdefault("format_version", FORMAT_VERSION)
    atomic_write(path, lambda f: torch.save(state, f))


def _numpy_safe_globals():
    """Allow-list for the reference project's files, which store a numpy float64 `fid`."""
    import numpy as np

    allowed = [np.dtype, np.float64]
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    allowed.append(scalar)
    try:
        allowed.append(type(np.dtype(np.float64)))  # numpy.dtypes.Float64DType
    except TypeError:
        pass
    return allowed


def load_checkpoint(path: str, map_location: Any = "cpu",
                    allow_numpy_scalars: bool = False) -> Dict[str, Any]:
    """Load a checkpoint safely; every failure is a UserError that names the file.

    `allow_numpy_scalars` admits numpy scalars (the reference's `fid` entry) and nothing else.
    """
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        if allow_numpy_scalars:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(path, map_location=map_location, weights_only=True)
        else:
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives since torch 1.6
            raise UserError(f"checkpoint {path!r} is corrupt or not a PyTorch checkpoint "
                            "(not a zip archive)") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported object"
        raise UserError(
            f"checkpoint {path!r} holds objects that are not safe to load ({first}); "
            "only tensors and plain data are accepted"
        ) from exc
    except Exception as exc:  # torch raises many types for damaged files (IndexError, EOFError...)
        raise UserError(
            f"checkpoint {path!r} is corrupt or not a PyTorch checkpoint "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        ) from exc
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path!r} does not hold a dict (found {type(obj).__name__})")
    return obj


def latest_checkpoint(folder: str, pattern: str = "*.pt") -> Optional[str]:
    """The most recently written checkpoint in `folder` matching `pattern` (None if none).

    Files are written atomically, so the newest complete file is the newest by mtime; temp
    files of an interrupted write are hidden and do not match.
    """
    paths = [p for p in glob.glob(os.path.join(folder, pattern)) if os.path.isfile(p)]
    if not paths:
        return None
    return max(paths, key=lambda p: (os.path.getmtime(p), p))


def get_rng_state() -> Dict[str, Any]:
    """Torch CPU (and CUDA) RNG states as tensors, so they survive `weights_only` loading."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
