"""Process groups for DDP: torchrun (env://, elastic), the reference's spawn launch, or none.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the reference's
`--distributed --rigid-launch --num-gpus N` spawns N processes here with the same variables.
Backend: `nccl` for CUDA, `gloo` for CPU.
"""

import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist

from ddpmkit.errors import UserError
from ddpmkit.runtime.devices import resolve_device
from ddpmkit.runtime.logs import setup_logging

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


def process_device(spec: str, info: DistInfo) -> torch.device:
    """This process's device for a `--device` value: with one process, the device it names;
    with several, cuda:LOCAL_RANK when it names CUDA (any index reads as "use the GPUs") or is
    auto on a machine with CUDA, else the CPU. A CUDA device with an index becomes current."""
    if info.enabled:
        spec = (spec or "auto").strip()
        on_cpu = spec == "cpu" or (spec == "auto" and not torch.cuda.is_available())
        spec = "cpu" if on_cpu else f"cuda:{info.local_rank}"
    device = resolve_device(spec)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


# How long processes wait for each other to join the group or finish a collective.
JOIN_TIMEOUT = timedelta(minutes=10)


def _rendezvous_store(info: DistInfo, timeout: timedelta):
    """The store the group forms through, under a prefix of its own for each torchrun restart.

    torchrun's agent keeps one TCPStore for the whole job; after it restarts failed workers,
    the new ones would find the previous attempt's gloo/NCCL addresses there and try to
    connect to dead processes ("Connection refused", then a hang). A key prefix per restart
    (TORCHELASTIC_RESTART_COUNT) keeps each attempt's rendezvous apart. Without the agent's
    store (plain MASTER_ADDR/MASTER_PORT), rank 0 hosts a store as init_process_group would.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          int(os.environ.get("MASTER_PORT", "29500")), info.world_size,
                          is_master=not agent_store and info.rank == 0, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
    return dist.PrefixStore(f"ddpmkit/attempt{attempt}", store)


_CONTROL_GROUP = None


def init_process_group(info: DistInfo, device: torch.device) -> None:
    """Join the process group when there is more than one process (and make the gloo group
    that `RunControl` and checkpoint saves use for small CPU-side exchanges)."""
    global _CONTROL_GROUP
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, store=_rendezvous_store(info, JOIN_TIMEOUT),
                            rank=info.rank, world_size=info.world_size, timeout=JOIN_TIMEOUT,
                            **kwargs)
    # With NCCL, CPU tensors need a gloo group of their own; with gloo the default one serves.
    _CONTROL_GROUP = dist.new_group(backend="gloo") if backend == "nccl" else None
    logger.info("process group: backend %s, rank %d of %d", backend, info.rank, info.world_size)


def control_group():
    """The gloo group for CPU-side exchanges (None: the default group, or one process)."""
    return _CONTROL_GROUP


def destroy_process_group() -> None:
    global _CONTROL_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_spawn_devices(nprocs: int, device_spec: str, flag: str) -> None:
    """`--num-gpus N` spawns one process per GPU: it needs N CUDA devices, unless the device
    flag says cpu (then N CPU processes run). Shared by train and generate."""
    if nprocs < 1:
        raise UserError(f"--num-gpus must be at least 1, got {nprocs}")
    if (device_spec or "auto").strip() == "cpu":
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < nprocs:
        raise UserError(f"--num-gpus {nprocs} needs {nprocs} CUDA devices, found {available}; "
                        f"pass {flag} cpu to run {nprocs} CPU processes instead")


def _spawned_entry(local_rank: int, world_size: int, port: int, fn: Callable, args: tuple,
                   queue, setup: Callable) -> None:
    """One spawned process: the environment torchrun would give it, `setup(quiet=...)` (logging
    like torchrun's: rank 0 informs, the others only warn), and its result or one-line error
    sent home."""
    from ddpmkit.errors import user_message

    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                       "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    setup(quiet=local_rank != 0)
    try:
        queue.put((local_rank, "ok", fn(*args)))
    except UserError as exc:  # the parent reports it, once
        queue.put((local_rank, "error", user_message(exc)))
        sys.exit(2)


def _drain(queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def spawn(fn: Callable, nprocs: int, args: tuple = (), port: Optional[int] = None,
          setup: Callable = setup_logging) -> list:
    """The reference's rigid launch: `nprocs` local processes running `fn(*args)` after
    `setup(quiet=rank != 0)` (a picklable module-level function); returns their
    results (by rank). A UserError in any process becomes one UserError here; a SIGTERM sent to
    this process is passed on to them (they stop gracefully; SIGINT from a terminal reaches
    them directly)."""
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise UserError(f"--num-gpus must be at least 1, got {nprocs}")
    queue = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(_spawned_entry, args=(nprocs, port or free_port(), fn, args,
                                                       queue, setup),
                                 nprocs=nprocs, join=False, start_method="spawn")
    try:
        with _forward_sigterm([p.pid for p in context.processes]):
            while not context.join():
                pass
    except mp.ProcessExitedException as exc:
        errors = sorted(item for item in _drain(queue) if item[1] == "error")
        if errors:
            raise UserError(errors[0][2]) from None
        raise UserError(f"process {exc.error_index} of {nprocs} died (exit code "
                        f"{exc.exit_code})") from None
    except mp.ProcessRaisedException as exc:
        lines = str(exc).strip().splitlines()
        raise UserError(f"process {exc.error_index} of {nprocs} crashed: "
                        f"{lines[-1] if lines else 'no message'}") from exc
    return [result for _, _, result in sorted(_drain(queue))]


@contextlib.contextmanager
def _forward_sigterm(pids):
    """While spawned processes run: SIGTERM is passed on to them; SIGINT is left to them (a
    terminal sends it to the whole process group) instead of interrupting the wait."""
    def forward(signum, frame):
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
