"""Checkpoint files: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts: nothing in it is
unpickled as arbitrary code. `FORMAT_VERSION` is bumped when the layout changes.

One training run keeps two kinds of files in its folder (`CheckpointFiles`):
- permanent `<prefix>_<epoch>.pt`, every `chkpt_intv` epochs and at the end (never deleted);
- rolling `<prefix>_step<step>.pt`, the latest state every few minutes or updates and when a run
  is stopped mid-epoch; only the newest `keep_rolling` (2) are kept.
A run resumes from the file holding the highest training step (read from the files
themselves, not from names or modification times), falling back to the next one when a file is
damaged.
"""

import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ddpmkit.errors import UserError
from ddpmkit.utils.io import TEMP_SUFFIX, atomic_write

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROLLING_KEEP = 2


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write `state` to `path` atomically (temp file + fsync + rename); a failed write is a
    UserError naming the path and the cause, and leaves any previous file at `path` intact."""
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def load_checkpoint(path: str, map_location: Any = "cpu",
                    allow_numpy_scalars: bool = False, mmap: bool = False) -> Dict[str, Any]:
    """Load a checkpoint safely; every failure is a UserError that names the file.

    `allow_numpy_scalars` admits numpy scalars (the reference's `fid` entry) and nothing else.
    `mmap` maps the tensors instead of reading them (cheap, for looking at small entries).
    """
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    kwargs = {"map_location": map_location, "weights_only": True, "mmap": mmap}
    try:
        if allow_numpy_scalars:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(path, **kwargs)
        else:
            obj = torch.load(path, **kwargs)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives since torch 1.6
            raise UserError(f"checkpoint {path!r} is corrupt or not a PyTorch checkpoint "
                            "(not a zip archive)") from exc
        raise UserError(
            f"checkpoint {path!r} holds objects that are not safe to load "
            f"({_first_line(exc) or 'unsupported object'}); only tensors and plain data are "
            "accepted"
        ) from exc
    except Exception as exc:  # torch raises many types for damaged files (IndexError, EOFError...)
        raise UserError(
            f"checkpoint {path!r} is corrupt or not a PyTorch checkpoint "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path!r} does not hold a dict (found {type(obj).__name__})")
    return obj


# ---- the files of one run -----------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointFiles:
    """Names and discovery of one run's checkpoints: `folder/<prefix>_<epoch>.pt` (permanent)
    and `folder/<prefix>_step<step>.pt` (rolling)."""

    folder: str
    prefix: str
    keep_rolling: int = ROLLING_KEEP

    def permanent(self, epoch: int) -> str:
        return os.path.join(self.folder, f"{self.prefix}_{int(epoch)}.pt")

    def rolling(self, step: int) -> str:
        return os.path.join(self.folder, f"{self.prefix}_step{int(step)}.pt")

    def _matches(self) -> List[Tuple[str, str, int]]:
        """(kind, path, number) of every checkpoint file of this prefix in the folder."""
        pattern = re.compile(r"^" + re.escape(self.prefix) + r"_(step)?(\d+)\.pt$")
        found = []
        if not os.path.isdir(self.folder):
            return found
        with os.scandir(self.folder) as entries:
            for entry in entries:
                m = pattern.match(entry.name)
                if m and entry.is_file():
                    found.append(("rolling" if m.group(1) else "permanent", entry.path,
                                  int(m.group(2))))
        return found

    def all(self) -> List[str]:
        return sorted(path for _, path, _ in self._matches())

    def rolling_files(self) -> List[Tuple[int, str]]:
        """(step, path) of the rolling files, oldest first."""
        return sorted((n, path) for kind, path, n in self._matches() if kind == "rolling")

    def prune_rolling(self) -> List[str]:
        """Delete all but the newest `keep_rolling` rolling files; returns what was deleted."""
        doomed = [path for _, path in self.rolling_files()[:-self.keep_rolling or None]]
        for path in doomed:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return doomed

    def stale_temp_files(self, extra_names=()) -> List[str]:
        """Temp files that interrupted atomic writes of this run left behind: its checkpoints
        and the other files named in `extra_names` (config.json, log.jsonl)."""
        names = "|".join([re.escape(self.prefix) + r"_(?:step)?\d+\.pt",
                          *(re.escape(n) for n in extra_names)])
        pattern = re.compile(r"^\.(?:" + names + r")\..+" + re.escape(TEMP_SUFFIX) + "$")
        if not os.path.isdir(self.folder):
            return []
        with os.scandir(self.folder) as entries:
            return sorted(e.path for e in entries if pattern.match(e.name) and e.is_file())


def checkpoint_step(path: str) -> int:
    """The training step a checkpoint holds, read without loading its tensors (mmap)."""
    state = load_checkpoint(path, mmap=True)
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise UserError(f"checkpoint {path!r} holds no training step: it was not written by "
                        "ddpmkit's trainer")
    return step


def newest_file(paths: List[str]) -> Optional[str]:
    """The file holding the highest training step, by the `step` stored inside (unreadable
    files are skipped; files without a step, such as the reference project's, rank below
    ours, by the number in their name)."""
    ranked = []
    for path in paths:
        number = re.findall(r"\d+", os.path.basename(path))
        try:
            state = load_checkpoint(path, mmap=True, allow_numpy_scalars=True)
        except UserError as exc:
            logger.warning("skipping %s", exc)
            continue
        step = state.get("step")
        ranked.append((isinstance(step, int), step if isinstance(step, int) else
                       int(number[-1]) if number else -1, path))
    return max(ranked)[2] if ranked else None


@dataclass
class ResumePoint:
    path: str
    state: Dict[str, Any]
    damaged: List[Tuple[str, str]]  # (path, reason) of newer files that could not be used


def newest_checkpoint(paths: List[str]) -> Optional[ResumePoint]:
    """The loadable checkpoint with the highest training step among `paths` (None if there
    are none); damaged files are skipped and reported in `damaged`, newest first.

    Steps are read from the files themselves; a permanent and a rolling file of the same step
    hold the same state, and the permanent one is preferred."""
    damaged: List[Tuple[str, str]] = []
    candidates = []
    for path in paths:
        try:
            candidates.append((checkpoint_step(path), "_step" not in os.path.basename(path), path))
        except UserError as exc:
            damaged.append((path, str(exc)))
    for _, _, path in sorted(candidates, reverse=True):
        try:
            return ResumePoint(path, load_checkpoint(path, map_location="cpu"), damaged)
        except UserError as exc:
            damaged.append((path, str(exc)))
    if damaged:
        reasons = "; ".join(reason for _, reason in damaged[:2])
        raise UserError(f"no usable checkpoint: {len(damaged)} file(s) could not be read "
                        f"({reasons}); move them away to start over")
    return None


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
