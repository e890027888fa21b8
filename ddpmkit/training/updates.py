"""One optimizer update of `Trainer` (a mixin: it works on the trainer's own fields):
gradient rescaling of a short accumulation group, clipping, the optimizer and LR steps, EMA,
the hooks after the update, rolling checkpoints and stop requests.

fp16 (`amp_dtype=torch.float16`): dynamic loss scaling (`torch.amp.GradScaler`, on CPUs too).
The loss is multiplied by the scale S before backward and the gradients divided by S before
clipping and the optimizer; an update whose gradients hold inf/NaN is skipped (weights and
optimizer state untouched, S halved) and counted (`skipped_steps` in the log), while the step
counter, LR schedule and EMA advance as for any update, so the schedule stays a function of the
data seen. A skipped update's losses stay out of the logged mean. S doubles after
`growth_interval` clean updates. A run whose updates are skipped `MAX_SKIPS_IN_A_ROW` times in
a row has diverged (no scale helps) and stops like a NaN loss does. Weights, EMA and optimizer
state stay float32. Knowing whether an update was skipped costs one host sync per update.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from ddpmkit.training.meters import NonFiniteLossError
from ddpmkit.training.steps import lr_factor, unwrap

# fp16: halving the scale this many times in a row takes torch's default initial scale 2^16
# below 2^-14, fp16's smallest normal number; gradients that still overflow are not a scaling
# problem but a diverged run.
MAX_SKIPS_IN_A_ROW = 30


class TrainerUpdates:
    """Update methods of `Trainer` (and the optimizer and LR schedule they step)."""

    def _build_optimizer(self, optimizer, lr, betas, weight_decay, fused, warmup_steps,
                         lr_decay, min_lr_ratio) -> None:
        opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        opt_kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(betas),
                                      "weight_decay": weight_decay}
        if fused is not None:
            opt_kwargs["fused"] = fused
        self.optimizer = opt_cls(self.params, **opt_kwargs)
        self.warmup_steps = int(warmup_steps)
        self.lr_decay = lr_decay
        self.min_lr_ratio = float(min_lr_ratio)
        warmup, total, decay, floor = self.warmup_steps, self.total_steps, lr_decay, min_lr_ratio

        def schedule(step: int) -> float:  # a plain function: LambdaLR then saves no state for it
            return lr_factor(step, warmup, total, decay, floor)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=schedule)

    def _no_sync(self, last_micro: bool):
        if not last_micro and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _grad_norm_now(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def _update(self, micro_batches: int, losses: list[torch.Tensor]) -> bool:
        """Finish one optimizer update from `micro_batches` accumulated micro-batches with
        these (detached float64) losses; False when fp16 loss scaling skipped it (inf/NaN
        gradients), whose losses then stay out of the logged mean."""
        if micro_batches != self.num_accum:
            # Each micro-batch loss was divided by num_accum: rescale a short final group.
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(self.num_accum / micro_batches)
        log_now = not self._started or (self.step + 1) % self.log_every == 0
        self.scaler.unscale_(self.optimizer)  # true gradients for the clip and the norm
        if self.grad_clip > 0:
            self._grad_norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        elif log_now:
            self._grad_norm = self._grad_norm_now()
        applied = self._optimizer_step()
        if applied:
            for detached in losses:
                self._loss_sum += detached
            self._loss_count += len(losses)
            self.scheduler.step()
        else:
            with warnings.catch_warnings():
                # torch warns when the first optimizer step was skipped; the schedule is by
                # update, skipped or not
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step")
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(unwrap(self.model))
        self.step += 1
        if not self._started:
            self._started = True
            for cb in self.callbacks:
                cb.on_run_start(self)
        if log_now:
            self._log_interval()
        for cb in self.callbacks:
            cb.on_step_end(self)
        self._after_update()
        return applied

    def _optimizer_step(self) -> bool:
        """The optimizer step through the loss scaler; False if fp16 skipped it."""
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # the scale only shrinks on a skip
            self._skips_in_a_row = 0
            return True
        self.skipped_steps += 1
        self._skips_in_a_row += 1
        if self._skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise NonFiniteLossError(
                f"the run diverged: {self._skips_in_a_row} updates in a row up to step "
                f"{self.step + 1} had inf/NaN gradients under fp16 (loss scale now "
                f"{self.scaler.get_scale():.3g}); training stopped without saving this state. Try a "
                "lower --lr, gradient clipping, LR warmup or --precision bf16 / fp32")
        return False

    def _after_update(self) -> None:
        """Rolling checkpoints by steps or time, and stop requests (the same on every process)."""
        if self.chkpt_intv_steps and self.step % self.chkpt_intv_steps == 0:
            self.save_checkpoint()
        if self._control is None:
            return
        decision = self._control.poll()
        if decision.save and self.last_saved_step != self.step:
            self.save_checkpoint()
        if decision.stop is not None:
            self.stopped = decision.stop
