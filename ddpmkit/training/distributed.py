"""Process groups for DDP: torchrun (env://, elastic), the reference's spawn launch, or none.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the reference's
`--distributed --rigid-launch --num-gpus N` spawns N processes here with the same variables.
Backend: `nccl` for CUDA, `gloo` for CPU.
"""

import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist

from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_dist_info(environ: Optional[Mapping[str, str]] = None) -> DistInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun (or our spawn) set them; one process when
    they are absent. Inconsistent values are a UserError."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise UserError(f"bad RANK/WORLD_SIZE/LOCAL_RANK environment variables: {exc}") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UserError(f"inconsistent RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return DistInfo(rank, world, local)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ)


def process_device(base: torch.device, info: DistInfo) -> torch.device:
    """Each process takes its own GPU (LOCAL_RANK) when training on CUDA."""
    if base.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        return device
    if base.type == "cuda" and base.index is not None:
        torch.cuda.set_device(base)
    return base


def init_process_group(info: DistInfo, device: torch.device) -> None:
    """Join the process group when there is more than one process."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                            **kwargs)
    logger.info("process group: backend %s, rank %d of %d", backend, info.rank, info.world_size)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_entry(local_rank: int, world_size: int, port: int, fn: Callable, args: tuple):
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                       "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    fn(*args)


def spawn(fn: Callable, nprocs: int, args: tuple = (), port: Optional[int] = None) -> None:
    """The reference's rigid launch: `nprocs` local processes running `fn(*args)`."""
    if nprocs < 1:
        raise UserError(f"--num-gpus must be at least 1, got {nprocs}")
    torch.multiprocessing.spawn(_spawned_entry, args=(nprocs, port or free_port(), fn, args),
                                nprocs=nprocs, join=True)


def micro_batch_size(global_batch: int, world_size: int, num_accum: int) -> int:
    """Per-process, per-forward batch: global batch / (processes x accumulation steps)."""
    if global_batch < 1 or num_accum < 1:
        raise UserError(f"--batch-size and --num-accum must be positive, got {global_batch} "
                        f"and {num_accum}")
    parts = world_size * num_accum
    if global_batch % parts:
        raise UserError(
            f"--batch-size {global_batch} (the global batch) must be divisible by the number of "
            f"processes ({world_size}) times --num-accum ({num_accum}) = {parts}"
        )
    return global_batch // parts
