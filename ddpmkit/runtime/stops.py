"""Graceful stops and time-based saves that every process of a run agrees on.

Clusters stop jobs with SIGTERM (SLURM, Kubernetes, torchrun's agent) and then kill them after
a grace period; users press Ctrl-C (SIGINT). `StopFlag` turns the first such signal into a
request that the training loop honours after the current update: the run saves its state,
and the command exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT). A second
Ctrl-C aborts at once with one line of output; further SIGTERMs are ignored, since senders
repeat it (torchrun's agent after a Ctrl-C, SLURM to every process of a step) and follow it
with SIGKILL anyway.

`RunControl` makes the stop, and the "a rolling checkpoint is due" decision that rank 0's clock
takes, the same on every process: after each update each process contributes its flags to an
asynchronous all-reduce (MAX) on a gloo group, and acts on the result of the previous update's
exchange, by which time it has long arrived. So the agreement costs no wait and no GPU sync,
and every process stops or saves after the same update.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ddpmkit.errors import signal_name

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Records the first SIGINT/SIGTERM while installed (a context manager; main thread only,
    elsewhere it installs nothing). `signum` is the signal received, or None."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopFlag:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def request(self, signum: int) -> None:
        """What a first signal does (also callable directly, e.g. by tests)."""
        if self.signum is None:
            self.signum = int(signum)
            if self.announce:
                logger.warning("%s received: stopping after the current step and saving "
                               "(Ctrl-C again to abort without saving)", signal_name(signum))

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # A forked child (a DataLoader worker) inherited this handler and got the terminal's
            # Ctrl-C too: the process that installed it stops the run (and announces it once).
            return
        if self.signum is not None and signum == signal.SIGINT:
            # A second Ctrl-C: the user does not want to wait. Files are written atomically,
            # so leaving now leaves at worst a temp file, which the next run removes.
            sys.stderr.write(f"aborted by a second {signal_name(signum)}: stopped at once, "
                             "without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.request(signum)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + int(signum)


@dataclass
class Decision:
    save: bool = False          # write a rolling checkpoint now
    stop: int | None = None     # the signal to stop for, or None


class RunControl:
    """After each update, whether to save (every `every_s` seconds of rank 0's clock) or stop
    (a process received a stop signal); identical on every process (see the module doc).

    `group`: a gloo process group for the exchange (None with one process)."""

    def __init__(self, stop: StopFlag | None = None, every_s: float = 0.0, group=None,
                 world_size: int = 1, is_main: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.stop = stop
        self.every_s = float(every_s or 0.0)
        self.group = group
        self.world_size = int(world_size)
        self.is_main = is_main
        self.clock = clock
        self._last_save = clock()
        # Saves made so far (the same count on every process). A request names the save it
        # asks for (count + 1), so a request posted just before that save was made is not
        # honoured twice.
        self._saves = 0
        self._pending = None  # (work, tensor) of the exchange in flight

    def _local_flags(self) -> list[int]:
        due = self.is_main and self.every_s > 0 and self.clock() - self._last_save >= self.every_s
        signum = self.stop.signum if self.stop is not None else None
        return [signum or 0, self._saves + 1 if due else 0]

    def poll(self) -> Decision:
        flags = self._local_flags()
        if self.world_size > 1:
            import torch.distributed as dist

            tensor = torch.tensor(flags, dtype=torch.int64)
            work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group,
                                   async_op=True)
            previous, self._pending = self._pending, (work, tensor)
            if previous is None:
                return Decision()
            previous[0].wait()
            flags = [int(v) for v in previous[1]]
        signum, wanted = flags
        return Decision(save=wanted > self._saves, stop=signum or None)

    def settle(self) -> Decision:
        """The decision now, with a blocking exchange (at points every process reaches
        together, such as an epoch's end after its sample grids and evaluation, which can take
        minutes: a stop requested meanwhile is not left waiting for the next update)."""
        flags = self._local_flags()
        if self.world_size > 1:
            import torch.distributed as dist

            tensor = torch.tensor(flags, dtype=torch.int64)
            if self._pending is not None:
                self._pending[0].wait()
                tensor = torch.maximum(tensor, self._pending[1])
                self._pending = None
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
            flags = [int(v) for v in tensor]
        signum, wanted = flags
        return Decision(save=wanted > self._saves, stop=signum or None)

    def saved(self) -> None:
        """A checkpoint was just written (by every process's count): the interval restarts."""
        self._saves += 1
        self._last_save = self.clock()

    def close(self) -> None:
        """Wait for the exchange in flight (every process calls this at the same point)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
