"""A run's machine-readable log: `log.jsonl` (one JSON object per line) and, when tensorboard
is installed, its event files. Only the main process writes.

A resumed run redoes the updates after its checkpoint, so `truncate_after(step)` first drops
the records of those updates (and tensorboard is told to purge them), and every step appears
once however many times the run was stopped and resumed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from ddpmkit.utils.io import atomic_write_bytes

logger = logging.getLogger(__name__)


class RunLog:
    def __init__(self, path: str | None, tensorboard_dir: str | None = None,
                 is_main: bool = True):
        self.path = path
        self.tensorboard_dir = tensorboard_dir
        self.is_main = is_main
        self._tb = None
        self._purge_step: int | None = None

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after `step` (a resumed run is about to redo them);
        returns how many were dropped. The file is rewritten atomically."""
        self._purge_step = int(step) + 1
        if not (self.is_main and self.path and os.path.isfile(self.path)):
            return 0
        with open(self.path, "r", encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line in lines if _step_of(line) is None or _step_of(line) <= step]
        if len(kept) != len(lines):
            atomic_write_bytes(self.path, "".join(kept).encode())
        return len(lines) - len(kept)

    def write(self, record: dict[str, Any], step: int) -> None:
        """Append `record` (timestamped) and send its numbers to tensorboard."""
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        writer = self._writer()
        if writer is not None:
            for key, value in record.items():
                if key not in ("time", "step") and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, record.get("step", step))

    def _writer(self):
        if self._tb is None and self.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed; writing the JSONL log only")
                self.tensorboard_dir = None
                return None
            self._tb = SummaryWriter(self.tensorboard_dir, purge_step=self._purge_step)
        return self._tb

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()


def _step_of(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
