"""Saving and restoring a trainer's state: the `Trainer` methods for checkpoints and exact
resume (a mixin: it works on the trainer's own fields).

Exact resume: a checkpoint holds the model, EMA, optimizer, LR scheduler, step/epoch counters,
the position inside the epoch (`batch_in_epoch`), the trainer's noise generator, the global
RNG states and, for fp16, the loss scaler. The data source must give the same batch order for
the same epoch (call `set_epoch(epoch)` on it; `ddpmkit.data.toy.TensorBatches` and
`DistributedSampler` do), so a resumed run skips the batches already used and continues
bit-identically on the CPU.

Checkpoints (`CheckpointFiles`): permanent `<prefix>_<epoch>.pt` every `chkpt_intv` epochs;
rolling `<prefix>_step<step>.pt` every `chkpt_every_minutes` minutes or `chkpt_intv_steps`
updates, and whenever a run stops mid-epoch (the last two are kept). Every save involves every
process (each one's RNG state goes into the file; the main process writes it, and all of them
learn whether that worked).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ddpmkit.checkpoints.files import get_rng_state, save_checkpoint, set_rng_state
from ddpmkit.errors import UserError
from ddpmkit.training.meters import NonFiniteLossError
from ddpmkit.training.steps import unwrap

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "ddpmkit.trainer"


class FollowerStop(UserError):
    """Raised on the other processes when the main process could not save: they stop too."""


class TrainerState:
    """Checkpoint and resume methods of `Trainer`."""

    def checkpoint_path(self) -> str | None:
        """Where the current state goes: the epoch's permanent file at an epoch boundary,
        else a rolling file named by the step."""
        if self.files is None:
            return None
        if self.batch_in_epoch == 0:
            return self.files.permanent(self.epoch)
        return self.files.rolling(self.step)

    def _rng_state(self) -> dict[str, Any]:
        """This process's RNG states, and with several processes every process's (a
        collective), so each resumes its own dropout stream."""
        mine = {"global": get_rng_state(), "trainer": self.generator.get_state()}
        if self.world_size <= 1:
            return mine
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.control_group)
        return {**mine, "ranks": everyone}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly; plain data and tensors only. (With several
        processes every one must call it: the RNG states are gathered.)"""
        return {
            "kind": CHECKPOINT_KIND,
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world_size,
            "rng": self._rng_state(),
            "config": self.config,
            "loss": self.last_loss,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "skipped_steps": self.skipped_steps,
            "skips_in_a_row": self._skips_in_a_row,  # a resumed run diverges where it would have
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` (e.g. from `load_checkpoint(path)`, loaded on the CPU)."""
        missing = [k for k in ("model", "optimizer", "step", "epoch") if k not in state]
        if missing:
            raise UserError(f"checkpoint lacks {', '.join(missing)}: it was not written by "
                            "this trainer, so training cannot resume from it")
        try:
            self._load_weights(state)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"checkpoint does not match this model or optimizer ({first}); "
                            "resume with the same settings it was trained with") from exc
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.last_loss = state.get("loss")
        self.last_saved_step = self.step
        self.skipped_steps = int(state.get("skipped_steps") or 0)
        self._skips_in_a_row = int(state.get("skips_in_a_row") or 0)
        rng = state.get("rng") or {}
        ranks = rng.get("ranks")
        if isinstance(ranks, list) and len(ranks) == self.world_size:
            rng = ranks[self.rank]  # this process's own streams
        if "global" in rng:
            set_rng_state(rng["global"])
        if "trainer" in rng:
            self.generator.set_state(rng["trainer"])

    def _load_weights(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled():
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            else:
                logger.warning("checkpoint has no fp16 loss-scaler state (it was not trained "
                               "in fp16); the loss scale restarts at %g",
                               self.scaler.get_scale())
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                logger.warning("checkpoint has no EMA weights; EMA restarts from the model")
                self.ema.model.load_state_dict(unwrap(self.model).state_dict())

    def save_checkpoint(self, path: str | None = None) -> str | None:
        """Save the current state (atomically, by the main process; every process must call
        this). Refuses non-finite weights; a failed write stops every process with the main
        process's one-line reason. Returns the path (None without a checkpoint folder)."""
        path = path or self.checkpoint_path()
        if path is None:
            return None
        state = self.state_dict()
        problem: UserError | None = None
        if self.is_main:
            try:
                self._check_savable()
                save_checkpoint(state, path)
                if self.files is not None and "_step" in os.path.basename(path):
                    self.files.prune_rolling()
            except UserError as exc:
                problem = exc
        self._agree_or_raise(problem)
        self.last_checkpoint, self.last_saved_step = path, self.step
        if self._control is not None:
            self._control.saved()
        if self.is_main:
            logger.info("saved checkpoint %s", path)
        return path

    def _check_savable(self) -> None:
        if self._loss_count:
            # This process's own mean loss: a collective here would wait for the others.
            loss = float(self._loss_sum / self._loss_count)
            self._check_finite(loss)
        finite = torch.stack([p.detach().isfinite().all() for p in self.params]).all()
        if not bool(finite):
            raise NonFiniteLossError(
                f"the weights hold NaN/inf at step {self.step}; not saving over good "
                f"checkpoints (last good: {self.last_checkpoint or 'none'})")

    def _agree_or_raise(self, problem: UserError | None) -> None:
        """Every process learns whether the main process's save worked, and stops if not."""
        failed = problem is not None
        if self.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([int(failed)], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
            failed = bool(flag.item())
        if problem is not None:
            raise problem
        if failed:
            raise FollowerStop("stopping: the main process could not save the checkpoint "
                               "(its message says why)")

    def resume(self, path: str) -> None:
        """Load a checkpoint file and continue from it."""
        from ddpmkit.checkpoints.files import load_checkpoint

        self.load_state_dict(load_checkpoint(path, map_location="cpu"))
        self.last_checkpoint = path
        logger.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)
