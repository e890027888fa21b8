"""`run(SampleConfig)`: a whole sample run, in one process, under torchrun, or spawned.

Processes: one; under torchrun (rank r makes samples r, r + N, ...; gloo is used only for a
final barrier); or `num_gpus` N spawned processes on cuda:0..N-1 (or N CPU processes with
`device="cpu"`). A SIGTERM or Ctrl-C ends each process after its current batch (finished files
are whole, and a rerun makes the rest); the summary then says which signal stopped it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from ddpmkit.config.sample import SampleConfig
from ddpmkit.errors import UserError, signal_name
from ddpmkit.runtime.distributed import check_spawn_devices, env_dist_info, process_device, spawn
from ddpmkit.runtime.stops import StopFlag, exit_code
from ddpmkit.sampling.folder import (
    MANIFEST_NAME,
    count_samples,
    existing_samples,
    first_samples,
    sample_path,
)
from ddpmkit.sampling.labels import class_grid_indices
from ddpmkit.sampling.noise import DistEnv
from ddpmkit.sampling.share import ShareResult, output_paths, run_share
from ddpmkit.sampling.source import config_checkpoint_path
from ddpmkit.utils.images import read_image_uint8, save_grid

log = logging.getLogger(__name__)

# Long enough for the slowest process to finish its share after a resume, however uneven.
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class SampleSummary:
    """What a run left in its folder. `signum`: the stop signal that ended it early, if any.
    `exit_code`: 0 for a complete run, 128 + signum for a stopped one (None: incomplete)."""
    folder: str
    present: int     # samples 0..total_size-1 in the folder
    total: int
    written: int     # new files, all processes together
    seconds: float
    signum: int | None = None
    is_main: bool = True  # False on torchrun's other ranks, which report nothing

    @property
    def exit_code(self) -> int | None:
        if self.signum:
            return exit_code(self.signum)
        return 0 if self.present == self.total else None

    def message(self) -> str:
        if self.signum:
            return (f"stopped by {signal_name(self.signum)}: {self.present} of {self.total} "
                    f"samples in {self.folder}; run the same command again to finish")
        rate = (f" ({self.written / self.seconds:.2f} img/s)"
                if self.written and self.seconds > 0 else "")
        return (f"{self.present} of {self.total} samples in {self.folder}; "
                f"{self.written} new in {self.seconds:.1f} s{rate}")


def run(config: SampleConfig | Mapping[str, Any] | None = None, **values) -> SampleSummary:
    """Make samples 0..total_size-1 of `config` (a SampleConfig, or its fields as a dict or
    keywords) in its folder, resuming what exists; then, unless stopped, the grid."""
    if not isinstance(config, SampleConfig):
        config = SampleConfig.from_dict({**(config or {}), **values})
    elif values:
        raise UserError("pass a SampleConfig or keyword values, not both")
    config.check()
    env = env_dist_info()
    if env.world_size > 1:
        return _torchrun(config, env)
    if config.num_gpus > 1:
        return _spawn(config)
    result = _stoppable_share(config, env)
    return _conclude(config, result.dataset, result.written, result.seconds, result.signum)


def _stoppable_share(config: SampleConfig, env: DistEnv) -> ShareResult:
    """This process's share, ended after the current batch by a SIGTERM or Ctrl-C (a second
    Ctrl-C aborts at once)."""
    with StopFlag(announce=env.is_main) as stop:
        result = run_share(config, env, should_stop=lambda: stop.signum is not None)
    return replace(result, signum=stop.signum if result.stopped else None)


def _spawned_share(config: SampleConfig) -> ShareResult:
    """Body of one spawned process (its RANK etc. are set by the spawn)."""
    env = env_dist_info()
    if process_device(config.device, env).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.num_gpus))
    return _stoppable_share(config, env)


def _spawn(config: SampleConfig) -> SampleSummary:
    check_spawn_devices(config.num_gpus, config.device, "--device")
    config_checkpoint_path(config)  # fail here, once, rather than in every process
    start = time.perf_counter()
    results = spawn(_spawned_share, config.num_gpus, (config,))
    signum = next((r.signum for r in results if r.signum), None)
    return _conclude(config, results[0].dataset, sum(r.written for r in results),
                     time.perf_counter() - start, signum)


def _torchrun(config: SampleConfig, env: DistEnv) -> SampleSummary:
    if config.num_gpus > 1:
        raise UserError("--num-gpus spawns processes itself; under torchrun leave it at 1 and "
                        "use --nproc_per_node")
    if env.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)  # only for the final barrier
    try:
        start = time.perf_counter()
        result = _stoppable_share(config, env)
        totals = torch.tensor([result.written, result.signum or 0], dtype=torch.long)
        # Also the barrier: every process has finished (or stopped) its share.
        dist.all_reduce(totals[:1])
        dist.all_reduce(totals[1:], op=dist.ReduceOp.MAX)
        signum = int(totals[1]) or None
        if env.is_main:
            return _conclude(config, result.dataset, int(totals[0]),
                             time.perf_counter() - start, signum)
        folder = output_paths(config, result.dataset).folder
        return SampleSummary(folder, 0, config.total_size, result.written, 0.0, signum,
                             is_main=False)
    finally:
        dist.destroy_process_group()


def _conclude(config: SampleConfig, dataset: str, written: int, seconds: float,
              signum: int | None) -> SampleSummary:
    """After every process is done (main process): the grid, unless stopped, and the totals."""
    paths = output_paths(config, dataset)
    present = count_samples(paths.folder, config.total_size)
    summary = SampleSummary(paths.folder, present, config.total_size, written, seconds, signum)
    if signum:
        return summary
    extra = len(existing_samples(paths.folder)) - present
    if extra:
        log.warning("%s also holds %d samples numbered >= --total-size (an earlier, larger run); "
                    "`eval` reads every image in the folder", paths.folder, extra)
    if config.grid:
        write_grid(paths.folder, paths.grid, config.grid_size, config.total_size)
    return summary


def write_grid(folder: str, path: str, grid_size: int, total_size: int) -> None:
    """A grid of the folder's first samples, or one class per row for class-conditional ones."""
    rows = _class_rows(folder)
    if rows > 1:  # one class per row
        indices, cols = class_grid_indices(rows, grid_size, total_size)
        files = [sample_path(folder, i) for i in indices]
    else:
        files, cols = first_samples(folder, min(grid_size, total_size)), None
    save_grid(path, np.stack([read_image_uint8(f) for f in files]), nrow=cols)
    log.info("wrote %s", path)


def _class_rows(folder: str) -> int:
    """Entries of the class-labels plan recorded in the folder's manifest (0: unconditional)."""
    import json

    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as f:
            return len(json.load(f).get("class_labels") or [])
    except (OSError, ValueError):
        return 0
