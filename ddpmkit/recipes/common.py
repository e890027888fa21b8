"""What every training recipe does the same way: continue from the state its run folder found,
and turn a stop signal into the exit status and the message that says how to continue."""

from __future__ import annotations

from typing import Any, Callable

from ddpmkit.errors import signal_name
from ddpmkit.runtime.stops import exit_code
from ddpmkit.training.run_folder import RunFolder
from ddpmkit.training.trainer import Trainer


def resume_from(trainer: Trainer, folder: RunFolder, report: Callable[[str], None]) -> None:
    """Load the state `folder.prepare` found (if any) into `trainer`, say so, and free the
    loaded tensors."""
    if folder.resumed is None:
        return
    trainer.load_state_dict(folder.resumed.state)
    trainer.last_checkpoint = folder.resumed.path
    report(f"resumed from {folder.resumed.path} (epoch {trainer.epoch}, step {trainer.step})")
    folder.resumed.state = {"step": trainer.step}


def stop_exit_code(result: dict[str, Any], trainer: Trainer,
                   report: Callable[[str], None]) -> int | None:
    """The exit status (128 + the signal) of a `fit` a signal stopped, after saying where the
    state is; None when the run was not stopped."""
    if result["stopped"] is None:
        return None
    report(f"stopped by {signal_name(result['stopped'])} at step {trainer.step}; the state is "
           f"in {trainer.last_checkpoint}: continue with --resume")
    return exit_code(result["stopped"])
