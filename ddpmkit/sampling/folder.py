"""The sample folder: one PNG per sample index (`NNNNNN.png`), written by threads while the next
batch samples; the manifest (`generation.json`: the settings that decide the images, so a rerun
resumes only with the same ones); and, for class-conditional models, `labels.csv`
(file,label,class).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from ddpmkit.diffusion.gaussian import DenoiseFn
from ddpmkit.errors import UserError
from ddpmkit.sampling.labels import ClassLabels, Guidance
from ddpmkit.sampling.noise import DistEnv, sample_indexed, shard
from ddpmkit.utils.images import TEMP_SUFFIX, to_uint8, write_file_atomic, write_png

log = logging.getLogger(__name__)

SAMPLE_NAME = "{:06d}.png"
_SAMPLE_RE = re.compile(r"^(\d+)\.png$")
_TEMP_RE = re.compile(r"^\.(\d+)\.png\..*" + re.escape(TEMP_SUFFIX) + "$")
MANIFEST_NAME = "generation.json"
LABELS_NAME = "labels.csv"


def sample_path(folder: str, index: int) -> str:
    return os.path.join(folder, SAMPLE_NAME.format(index))


def existing_samples(folder: str) -> set[int]:
    """Indices of the finished (non-empty) sample files in `folder`."""
    found: set[int] = set()
    if not os.path.isdir(folder):
        return found
    with os.scandir(folder) as entries:
        for entry in entries:
            m = _SAMPLE_RE.match(entry.name)
            if m and entry.is_file() and entry.stat().st_size > 0:
                found.add(int(m.group(1)))
    return found


def remove_stale_temp_files(folder: str, env: DistEnv) -> int:
    """Delete temp files a killed run left for this process's indices (no other process writes
    those, so this cannot race with a live writer). Returns how many were removed."""
    removed = 0
    if not os.path.isdir(folder):
        return removed
    with os.scandir(folder) as entries:
        for entry in entries:
            m = _TEMP_RE.match(entry.name)
            if m and int(m.group(1)) % env.world_size == env.rank:
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def check_manifest(folder: str, settings: dict[str, object], write: bool) -> None:
    """Refuse to add samples to a folder made with other sampling settings.

    The folder's `generation.json` records what decides the images (checkpoint hash, sampler,
    steps, eta, seed, ...). A rerun with the same settings resumes; with different ones it is a
    UserError, since skipping "existing" files would silently mix two sample sets; so are
    sample PNGs without a manifest. `write`: create the file when absent (the main process
    only).
    """
    path = os.path.join(folder, MANIFEST_NAME)
    # PNGs first, then the manifest: ddpmkit writes the manifest before any sample, so a sample
    # seen here without a manifest seen after it was not made by a ddpmkit run.
    samples = existing_samples(folder)
    if samples and not os.path.isfile(path):
        raise UserError(
            f"{folder} holds {len(samples)} sample-named PNG(s) ({SAMPLE_NAME.format(min(samples))}"
            f", ...) but no {MANIFEST_NAME}, so how they were made is unknown and they would be "
            "counted as done; use another --suffix / --save-dir, or move them away")
    if os.path.isfile(path):
        try:
            with open(path, "r", encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path}: {exc}; delete it to start over") from exc
        diffs = [f"{k}: {recorded.get(k)!r} there, {v!r} now" for k, v in settings.items()
                 if recorded.get(k) != v]
        if diffs:
            raise UserError(
                f"{folder} holds samples made with other settings ({'; '.join(diffs[:3])}); "
                "use another --suffix / --save-dir, or delete the folder to start over")
    elif write:
        os.makedirs(folder, exist_ok=True)
        data = json.dumps(settings, indent=2, sort_keys=True) + "\n"
        write_file_atomic(path, data.encode())


def write_labels_file(folder: str, labels: ClassLabels, count: int,
                      names: Sequence[str] | None = None) -> str:
    """`folder/labels.csv` (file,label,class) for samples 0..count-1, written atomically.
    Deterministic: a rerun writes the same lines (plus any for a larger count)."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")  # quotes names with commas or quotes
    writer.writerow(["file", "label", "class"])
    for index, label in enumerate(labels.of(range(count))):
        name = names[label] if names and label < len(names) else str(label)
        writer.writerow([SAMPLE_NAME.format(index), label, name])
    path = os.path.join(folder, LABELS_NAME)
    os.makedirs(folder, exist_ok=True)
    write_file_atomic(path, text.getvalue().encode())
    return path


def read_labels_file(folder: str) -> tuple[dict[str, int], dict[int, str]] | None:
    """({file name: label}, {label: class name}) from `folder/labels.csv`, or None if absent."""
    import csv

    path = os.path.join(folder, LABELS_NAME)
    if not os.path.isfile(path):
        return None
    labels: dict[str, int] = {}
    names: dict[int, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                label = int(row["label"])
                labels[row["file"]] = label
                names[label] = row.get("class") or str(label)
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    return labels, names


@dataclass
class GenerateResult:
    written: int     # new files written by this process
    skipped: int     # this process's files that already existed
    seconds: float   # wall time of the sampling loop
    stopped: bool = False  # `should_stop` ended it early (a rerun makes the rest)


def generate_to_folder(diffusion, denoise_fn: DenoiseFn | Guidance, sampler,
                       shape: Sequence[int], folder: str,
                       total_size: int, batch_size: int, seed: int, device,
                       env: DistEnv | None = None, max_workers: int = 8,
                       dtype: torch.dtype = torch.float32, progress: bool = False,
                       should_stop: Callable[[], bool] | None = None) -> GenerateResult:
    """Make this process's share of samples 0..total_size-1 as `folder/NNNNNN.png`, skipping
    files that already exist; PNGs are encoded and written by `max_workers` threads (0: inline)
    while the next batch samples. `denoise_fn`: the network, or a `Guidance` (class labels).
    `should_stop()` is asked after each batch: true ends the run once that batch's files are
    written."""
    env = env or DistEnv()
    if total_size < 1 or batch_size < 1:
        raise UserError("total size and batch size must be at least 1")
    os.makedirs(folder, exist_ok=True)
    removed = remove_stale_temp_files(folder, env)
    if removed:
        log.info("removed %d unfinished temp file(s) left by an interrupted run", removed)
    present = existing_samples(folder)
    mine = shard(total_size, env)
    todo = [i for i in mine if i not in present]
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("rank %d: %d of its %d samples already exist; making %d", env.rank, skipped,
                 len(mine), len(todo))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="generating", unit="img", dynamic_ncols=True,
                   disable=None)  # no bar when stderr is not a terminal
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers) if max_workers > 0 else None
    pending: deque = deque()
    stopped = False
    try:
        for first in range(0, len(todo), batch_size):
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = todo[first:first + batch_size]
            x = sample_indexed(diffusion, denoise_fn, sampler, batch, shape, seed, device, dtype)
            images = to_uint8(x)
            for index, image in zip(batch, images):
                path = sample_path(folder, index)
                if pool is None:
                    _write(path, image)
                else:
                    pending.append(pool.submit(_write, path, image))
            # At most two batches of images wait for the writer threads (bounded memory).
            while len(pending) > 2 * batch_size:
                pending.popleft().result()
            if bar is not None:
                bar.update(len(batch))
        while pending:
            pending.popleft().result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
    written = len(todo) if not stopped else min(first, len(todo))
    return GenerateResult(written, skipped, time.perf_counter() - start, stopped)


def _write(path: str, image) -> None:
    try:
        write_png(path, image)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc}") from exc


def count_samples(folder: str, total_size: int) -> int:
    """How many of samples 0..total_size-1 exist in `folder`."""
    return sum(1 for i in existing_samples(folder) if i < total_size)


def first_samples(folder: str, count: int) -> list[str]:
    """Paths of up to `count` of the lowest-numbered samples in `folder`."""
    return [sample_path(folder, i) for i in sorted(existing_samples(folder))[:count]]
