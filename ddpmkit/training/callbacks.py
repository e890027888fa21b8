"""The trainer's hooks: `Callback`, whose methods `Trainer.fit` calls, and `make_callback`.

A callback uses the trainer's public interface only: its counters (`step`, `epoch`,
`epochs`), `is_main`, `device`, `num_classes`, `sampling_model`, `autocast()` (the precision
the run trains in), `log_record(record)` and `truncate_log_after(step)`.
"""

from __future__ import annotations

from typing import Any, Callable

# The `Trainer` (`training.trainer`, which imports this module): named, not imported.
Trainer = Any


class Callback:
    """Hooks into `Trainer.fit`. Every method is optional; `trainer` gives access to everything.

    They run on every process; use `trainer.is_main` for work only one process should do.
    """

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_run_start(self, trainer: Trainer) -> None:
        """Once, after the first update of this `fit` succeeded and before anything is logged
        or saved: the run is known to start (data loads, the model trains)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer update (`trainer.step` already counts it)."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """After each epoch (`trainer.epoch` already counts it), before its checkpoint."""

    def on_train_end(self, trainer: Trainer) -> None:
        pass


def make_callback(on_epoch_end: Callable[[Trainer], None] | None = None,
                  on_train_end: Callable[[Trainer], None] | None = None) -> Callback:
    """A `Callback` from plain functions."""
    cb = Callback()
    if on_epoch_end is not None:
        cb.on_epoch_end = on_epoch_end  # type: ignore[method-assign]
    if on_train_end is not None:
        cb.on_train_end = on_train_end  # type: ignore[method-assign]
    return cb
