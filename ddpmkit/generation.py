"""Seeded, sharded, resumable sample generation: the library half of `ddpmkit generate`.

Every sample is a pure function of (seed, global index): its starting noise x_T and the fresh
noise of each stochastic step (DDPM, DDIM with eta > 0, the SDE solvers) come from a counter-based generator
keyed by the seed and addressed by (index, stream, position). So the set of images does not
depend on the batch size, the number of processes, or which images a resumed run still had to
make, and process r of W simply takes indices r, r + W, r + 2W, ... (no communication).

References:
- Salmon, Moraes, Dror, Shaw (2011), "Parallel random numbers: as easy as 1, 2, 3" (SC'11):
  the Philox4x32-10 counter-based generator (the one cuRAND and PyTorch's CUDA RNG use).
- Box and Muller (1958): two uniforms -> two independent standard normals.

Symbols: `B` batch, `*S` the sample shape (C, H, W) for images; a stream is 0 for x_T and
1 + i for the noise of sampler step i (i = 0 .. S-1).

Class-conditional models: sample i asks for class `classes[i mod n]` (`ClassLabels`: all K
classes in order by default, or the ones requested), a function of i alone like its noise, and
is sampled with classifier-free guidance (`Guidance`). The labels are written beside the PNGs
as `labels.csv` (file,label,class).
"""
from __future__ import annotations

import json
import logging
import math
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
from ddpmkit.diffusion.guidance import ConditionalNet, classifier_free_guidance
from ddpmkit.diffusion.samplers import NoiseFn, StepInfo, sample
from ddpmkit.errors import UserError
from ddpmkit.runtime.devices import autocast_dtype, compile_mode, compile_module, inductor_freezing
from ddpmkit.runtime.distributed import DistInfo, env_dist_info
from ddpmkit.utils.images import TEMP_SUFFIX, to_uint8, write_file_atomic, write_png

log = logging.getLogger(__name__)

# ---- Philox4x32-10 (Salmon et al. 2011, section 4.2) -------------------------------------
# Round multipliers and the Weyl-sequence key increments ("golden ratio" and sqrt(3) - 1).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_TWO_POW_32 = 4294967296.0

# Counter streams: x_T uses stream 0, the noise drawn at sampler step i uses stream 1 + i.
X_T_STREAM = 0
# Bumped if the mapping (seed, index, stream) -> noise ever changes; recorded in the manifest.
NOISE_VERSION = "philox4x32-10/box-muller/v1"


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for a constant a < 2^32 and int64
    b in [0, 2^32). The full product overflows int64, so a is split into 16-bit halves and every
    partial product stays below 2^49."""
    p_lo = b * (a & 0xFFFF)                  # < 2^48
    p_hi = b * (a >> 16)                     # < 2^48; a * b = p_hi 2^16 + p_lo
    low = p_lo + ((p_hi & 0xFFFF) << 16)     # bits 0..47 of the product, plus carries
    return (p_hi >> 16) + (low >> 32), low & _MASK32


def philox4x32(counter: torch.Tensor, key: Sequence[int], rounds: int = PHILOX_ROUNDS
               ) -> torch.Tensor:
    """Philox4x32 of int64 counters (..., 4) holding uint32 words, with a 2-word key.

    Returns (..., 4) int64 in [0, 2^32): four independent uniformly random 32-bit words per
    counter. Bit-identical on every device (integer arithmetic only).
    """
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for r in range(rounds):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < rounds:
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


class IndexedNoise:
    """Standard normal noise as a pure function of (seed, sample index, stream, position).

    `normal(indices, stream, shape)` -> (B, *shape): row b depends only on (seed, indices[b],
    stream), never on the other rows or on the device.
    """

    def __init__(self, seed: int):
        seed = int(seed) % 2**64
        self.seed = seed
        self.key = (seed & _MASK32, seed >> 32)

    def normal(self, indices: torch.Tensor, stream: int, shape: Sequence[int],
               device: torch.device | None = None, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
        device = torch.device(device) if device is not None else indices.device
        # Indices must be >= 0 (checked by callers on the host: no device sync per step).
        indices = torch.as_tensor(indices, dtype=torch.long).to(device).reshape(-1)
        numel = math.prod(shape)
        blocks = (numel + 3) // 4  # each counter yields 4 words -> 4 normals
        B = indices.numel()
        # (1) counters (B, blocks, 4): (position block, stream, index low word, index high word)
        counter = torch.empty(B, blocks, 4, dtype=torch.long, device=device)
        counter[..., 0] = torch.arange(blocks, dtype=torch.long, device=device)
        counter[..., 1] = int(stream) & _MASK32
        counter[..., 2] = (indices & _MASK32)[:, None]
        counter[..., 3] = (indices >> 32)[:, None]
        words = philox4x32(counter, self.key)  # (B, blocks, 4)
        # (2) uniforms in (0, 1), never 0 (log) : u = (w + 1/2) / 2^32
        fdtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        u = (words.to(fdtype) + 0.5) / _TWO_POW_32
        # (3) Box-Muller on the pairs (u0, u1) and (u2, u3)
        radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))  # (B, blocks, 2)
        angle = (2.0 * math.pi) * u[..., 1::2]
        z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
        z = z.reshape(B, blocks * 4)[:, :numel]
        return z.reshape(B, *shape).to(dtype)

    def step_noise_fn(self, indices: torch.Tensor) -> NoiseFn:
        """noise_fn(i, x) for `sample`: the noise of sampler step i for these samples."""
        return lambda i, x: self.normal(indices, 1 + i, x.shape[1:], x.device, x.dtype)


# ---- class labels and guidance -------------------------------------------------------------
LABELS_NAME = "labels.csv"
# Guidance scale w when none is asked for (eq. 6 of Ho & Salimans 2022; 0: the plain
# conditional model). See the README's class-conditioning section for what w does.
DEFAULT_GUIDANCE_SCALE = 1.0


@dataclass(frozen=True)
class ClassLabels:
    """Which class each sample asks for: sample i gets `classes[i mod len(classes)]`, a
    function of its index alone (so of no batch size or process count), and spread evenly."""
    classes: tuple[int, ...]
    num_classes: int

    @property
    def rule(self) -> str:
        """The rule in words, for the manifest."""
        return f"label of sample i = {list(self.classes)}[i mod {len(self.classes)}]"

    def of(self, indices: Sequence[int]) -> list[int]:
        n = len(self.classes)
        return [self.classes[int(i) % n] for i in indices]


def class_labels(num_classes: int, requested: Sequence[int | str] | None = None,
                 names: Sequence[str] | None = None) -> ClassLabels:
    """The labels plan: every class 0..K-1 in turn, or the `requested` ones (ints, or class
    names from `names`). Out-of-range or unknown labels are a UserError."""
    if not requested:
        return ClassLabels(tuple(range(num_classes)), num_classes)
    classes = []
    for value in requested:
        text = str(value).strip()
        if names and text in names and not text.lstrip("-").isdigit():
            classes.append(list(names).index(text))
            continue
        try:
            label = int(text)
        except ValueError:
            known = f" or one of {', '.join(names)}" if names else ""
            raise UserError(f"class label {text!r} is not a number{known}") from None
        if not 0 <= label < num_classes:
            raise UserError(f"class label {label} is out of range: the model knows classes "
                            f"0..{num_classes - 1}")
        classes.append(label)
    return ClassLabels(tuple(classes), num_classes)


@dataclass(frozen=True)
class Guidance:
    """How a class-conditional network is sampled: `net(x_t, t, y)` (e.g. from
    `make_denoise_fn`), the labels plan, and the guidance scale w."""
    net: ConditionalNet
    labels: ClassLabels
    scale: float
    learned_variance: bool = False

    def bind(self, indices: Sequence[int], device) -> DenoiseFn:
        """`denoise_fn(x_t, t)` for these samples: guided towards their labels."""
        y = torch.as_tensor(self.labels.of(indices), dtype=torch.long, device=device)
        return classifier_free_guidance(self.net, y, self.labels.num_classes, self.scale,
                                        self.learned_variance)


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


def class_grid_indices(num_rows: int, grid_size: int, total_size: int) -> tuple[list[int], int]:
    """(sample indices row by row, columns) of a grid with one row per entry of the labels plan:
    row r holds samples r, r + n, r + 2n, ... (n = num_rows), all of the same class."""
    rows = min(num_rows, total_size)
    cols = max(1, min(grid_size // max(rows, 1), total_size // max(num_rows, 1)))
    return [r + j * num_rows for r in range(rows) for j in range(cols)], cols


def _denoiser_for(denoise_fn: DenoiseFn | Guidance, indices: Sequence[int], device) -> DenoiseFn:
    return denoise_fn.bind(indices, device) if isinstance(denoise_fn, Guidance) else denoise_fn


def sample_indexed(diffusion, denoise_fn: DenoiseFn | Guidance, sampler,
                   indices: Sequence[int], shape: Sequence[int],
                   seed: int, device, dtype: torch.dtype = torch.float32,
                   callback: Callable[[StepInfo], None] | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Samples number `indices` (B,) of the seed's sequence: x_0 (B, *shape) on `device`.
    `denoise_fn` is the network, or a `Guidance` for a class-conditional one."""
    indices = [int(i) for i in indices]
    if min(indices, default=0) < 0:
        raise ValueError("sample indices must be non-negative")
    noise = IndexedNoise(seed)
    idx = torch.as_tensor(indices, dtype=torch.long, device=device)
    x_T = noise.normal(idx, X_T_STREAM, shape, device, dtype)
    return sample(diffusion, _denoiser_for(denoise_fn, indices, device), sampler, x_T,
                  noise_fn=noise.step_noise_fn(idx), callback=callback, progress=progress)


def make_denoise_fn(model: torch.nn.Module, precision: str, device, channels_last: bool = False,
                    compile_model: bool | str | None = False, cuda_graph: bool = False,
                    freeze: bool | None = None):
    """The network as the sampler calls it, `fn(x_t, t) -> float32 output` (or `fn(x_t, t, y)`
    for a class-conditional network: the labels are an input of every fast path, a CUDA graph
    included), with the requested fast paths: bf16 or fp16 autocast (`precision="bf16"` /
    `"fp16"`; the sampler's arithmetic stays float32), channels_last weights and inputs, torch.compile
    (`compile_model`: True or a mode name), and CUDA-graph replay.

    `freeze` (default: on CPUs) freezes a compiled network's weights in: inductor treats them
    as constants, folds autocast's per-call weight casts away and, on CPUs, prepacks
    convolution weights for oneDNN (1.3x on the CIFAR-10 UNet's bf16 forward at batch 4 on a
    2-core CPU, where compile without freezing gains nothing). It is not yet the default on
    GPUs, where it is unmeasured. Do not change the weights after the first call: a frozen
    function may go on using the ones it was compiled with (make a new one instead).
    """
    device = torch.device(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    mode = compile_mode(compile_model)
    net = compile_module(model, mode)
    amp_dtype = autocast_dtype(precision)
    if freeze is None:
        freeze = device.type == "cpu"
    freezing = mode is not None and freeze
    if precision == "fp32" and not channels_last and not cuda_graph and not freezing:
        return net

    def denoise(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        # No weight-cast cache: each weight is used once per call, and a cache would hold
        # tensors across CUDA-graph captures.
        with inductor_freezing(freezing), torch.autocast(
                device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None,
                cache_enabled=False):
            return (net(x_t, t) if y is None else net(x_t, t, y)).float()

    if cuda_graph:
        from ddpmkit.utils.cuda_graphs import CUDAGraphDenoiser

        return CUDAGraphDenoiser(denoise)
    return denoise


# ---- processes ---------------------------------------------------------------------------
# One description of "which process am I" for training and generation alike.
DistEnv = DistInfo
dist_env_from_environ = env_dist_info


def shard(total_size: int, env: DistEnv) -> range:
    """The global sample indices process `env.rank` of `env.world_size` makes."""
    return range(env.rank, total_size, env.world_size)


# ---- the sample folder -------------------------------------------------------------------
SAMPLE_NAME = "{:06d}.png"
_SAMPLE_RE = re.compile(r"^(\d+)\.png$")
_TEMP_RE = re.compile(r"^\.(\d+)\.png\..*" + re.escape(TEMP_SUFFIX) + "$")
MANIFEST_NAME = "generation.json"


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
    UserError, since skipping "existing" files would silently mix two sample sets. `write`:
    create the file when absent (the main process only).
    """
    path = os.path.join(folder, MANIFEST_NAME)
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
