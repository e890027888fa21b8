"""The trainer's logging: loss and throughput summed on the device over a log interval and
read back once per record (one host sync), JSONL/tensorboard records, the NaN check, and the
progress bar (a mixin of `Trainer`: it works on the trainer's own fields).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import torch

from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The loss (or the weights) became NaN/inf; training stopped without saving."""


class TrainerLog:
    """Logging methods of `Trainer`."""

    def _reset_interval(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._loss_count = 0
        self._items = 0
        self._grad_norm: torch.Tensor | None = None
        self._t_start = time.perf_counter()

    def _reduce(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over processes (for logging only)."""
        if self.world_size > 1 and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value

    def _sync_loss(self) -> float | None:
        """Mean loss since the last sync (one host sync); raises on NaN/inf."""
        if self._loss_count == 0:
            return None
        loss = float(self._reduce(self._loss_sum / self._loss_count))
        self._check_finite(loss)
        return loss

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            # The epoch the loss belongs to: the one in progress, or the one just finished.
            epoch = self.epoch + (1 if self.batch_in_epoch else 0)
            where = (f"the last good checkpoint is {self.last_checkpoint}"
                     if self.last_checkpoint else "no checkpoint had been saved yet")
            raise NonFiniteLossError(
                f"the training loss became {loss} by step {self.step} (epoch {epoch}); "
                f"training stopped without saving; {where}. Try a lower --lr, gradient "
                "clipping or LR warmup")

    def _log_interval(self, final: bool = False) -> None:
        """Log the interval since the last record; `final`: the end of `fit`, whose partial
        interval does not replace `last_loss` (the epoch's mean is the better summary)."""
        loss = self._sync_loss()
        if not final:
            self.last_loss = loss
        elapsed = max(time.perf_counter() - self._t_start, 1e-9)
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": self.epoch + self.batch_in_epoch / self.batches_per_epoch,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            self.throughput_key: self._items * self.world_size / elapsed,
        }
        if self._grad_norm is not None:
            norm = float(self._grad_norm)  # inf/NaN on a skipped fp16 update: JSON null
            record["grad_norm"] = norm if math.isfinite(norm) else None
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
            record["skipped_steps"] = self.skipped_steps
        self.log_record(record)
        if self._pbar is not None and loss is not None:
            self._pbar.set_postfix(loss=f"{loss:.4f}", epoch=self.epoch + 1, refresh=False)
        self._reset_interval()

    def log_record(self, record: dict[str, Any]) -> None:
        """Append one JSON line to the log (and scalars to tensorboard); main process only."""
        self.runlog.write(record, self.step)

    def truncate_log_after(self, step: int) -> int:
        """Drop the log records after `step` (a resumed run redoes them); how many went."""
        return self.runlog.truncate_after(step)

    @contextlib.contextmanager
    def _progress_bar(self):
        """A tqdm bar over all updates (main process only), logging routed around it."""
        if not (self.progress and self.is_main):
            yield
            return
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # disable=None: no bar when stderr is not a terminal (cluster logs, pipes)
        self._pbar = tqdm(total=self.total_steps, initial=self.step, unit="step",
                          dynamic_ncols=True, desc="train", disable=None)
        try:
            with logging_redirect_tqdm():
                yield
        finally:
            self._pbar.close()
            self._pbar = None
