"""A single-process diffusion training loop, generic over the data (toy points or images).

One optimizer update ("step") uses `num_accum` micro-batches. Per micro-batch: t ~ U{0..T-1}
and eps ~ N(0, I) from the trainer's own generator, the diffusion loss, backward. A
class-conditional model (one with `num_classes`) trains on `(x_0, labels)` batches, each label
replaced by "no class" with probability `class_dropout` (a uniform draw from the same
generator, after the noise), so one network learns p(x | y) and p(x) for classifier-free
guidance. Per update:
optional gradient clipping by global norm, the optimizer and LR scheduler steps, the EMA update.
The loss is summed on the device and read back only at log intervals, epoch ends and saves,
so the hot path has no host synchronisation.

The trainer's parts: the update (`updates.TrainerUpdates`, with fp16 loss scaling), logging
(`meters.TrainerLog`), checkpoints and exact resume (`state.TrainerState`), the hooks
(`callbacks.Callback`, a public interface) and the LR schedule and data positions (`steps`).
With a `StopFlag`, a SIGTERM or Ctrl-C ends `fit` after the current update with the state saved
(`stopped` in the result); the decision to stop or to save on the clock (`RunControl`) is taken
by every process together, so processes never wait on each other in vain.

Distributed runs pass the DDP-wrapped model; `unwrap` reaches the module underneath for
checkpoints and EMA, `is_main` limits logging, progress bars and checkpoint writes to one
process, and accumulation micro-steps skip the gradient all-reduce (`no_sync`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ddpmkit.checkpoints.files import CheckpointFiles
from ddpmkit.choices import LR_DECAYS, OPTIMIZERS
from ddpmkit.errors import UserError
from ddpmkit.runtime.stops import RunControl, StopFlag
from ddpmkit.training.callbacks import Callback, make_callback  # noqa: F401 (public names)
from ddpmkit.training.ema import EMA
from ddpmkit.training.meters import NonFiniteLossError, TrainerLog  # noqa: F401
from ddpmkit.training.runlog import RunLog
from ddpmkit.training.state import CHECKPOINT_KIND, FollowerStop, TrainerState  # noqa: F401
from ddpmkit.training.steps import iter_from, lr_factor, set_epoch, unwrap  # noqa: F401
from ddpmkit.training.updates import MAX_SKIPS_IN_A_ROW, TrainerUpdates  # noqa: F401

logger = logging.getLogger(__name__)


def _check_arguments(data, epochs, num_accum, lr, lr_decay, optimizer) -> int:
    """ValueErrors for impossible settings; returns the batches per epoch."""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if num_accum <= 0:
        raise ValueError(f"num_accum must be positive, got {num_accum}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"learning rate must be a positive number, got {lr}")
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"unknown lr decay {lr_decay!r}; choose from {', '.join(LR_DECAYS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from "
                         f"{', '.join(OPTIMIZERS)}")
    try:
        batches_per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValueError("data must have a length (batches per epoch)") from exc
    if batches_per_epoch <= 0:
        raise ValueError("data yields no batches per epoch")
    return batches_per_epoch


class Trainer(TrainerUpdates, TrainerLog, TrainerState):
    """Trains `model` on `data` with `diffusion`'s loss.

    Args:
        model: the network (`denoise_fn(x_t, t)`), already on `device`; may be DDP-wrapped.
        diffusion: a `GaussianDiffusion` (anything with `.T` and `training_losses`).
        data: an iterable of batches with `len()` = batches per epoch: tensors (B, *S) or
            tuples/lists whose first item is that tensor (e.g. `(images, labels)`).
        epochs: total number of epochs (sets the LR decay horizon).
        lr, betas, weight_decay, optimizer: Adam / AdamW settings (`fused` passes through).
        warmup_steps: linear LR warmup length in optimizer updates.
        lr_decay, min_lr_ratio: LR decay after warmup (`none`, `cosine`, `linear`) and the
            final LR as a fraction of `lr`.
        grad_clip: max global gradient norm (0 or None: no clipping).
        num_accum: micro-batches per optimizer update.
        ema_decay: EMA decay; None or 0 disables EMA. `ema_warmup`: see `EMA`.
        device: where batches go.
        seed: seeds the trainer's generator for t and noise (offset by `rank`).
        chkpt_dir, chkpt_prefix: where checkpoints go and how their names start
            ("ddpm_cifar10" gives ddpm_cifar10_<epoch>.pt and ddpm_cifar10_step<step>.pt).
        chkpt_intv: a permanent checkpoint every this many epochs (0: none);
            `chkpt_intv_steps` / `chkpt_every_minutes`: a rolling one every this many
            updates / minutes (0: off). A final checkpoint is saved at the end of `fit` when
            `save_final` is true and the state is not saved yet.
        log_path: JSONL log file (appended to); `log_every`: updates between log records (the
            first update is always logged, and the last one at the end of `fit`).
        tensorboard_dir: also write scalars there when tensorboard is installed.
        progress: show a tqdm progress bar (main process only).
        callbacks: `Callback` objects.
        config: the resolved run config (plain data), stored in every checkpoint.
        is_main, rank, world_size: distributed role; only the main process writes files.
        control_group: a gloo process group for the agreement between processes (see
            `RunControl`); None uses the default group.
        stop: a `StopFlag` (installed by the command): a signal ends `fit` after the current
            update, with the state saved.
        amp_dtype: autocast dtype for the forward pass (e.g. torch.bfloat16), or None;
            torch.float16 also turns on dynamic loss scaling (see the module docstring).
        class_dropout: for a class-conditional model, the probability that a label is
            replaced by "no class" (classifier-free guidance training).
        throughput_key: the log field for items per second ("samples_per_s", "img_per_s").
    """

    def __init__(self, model: nn.Module, diffusion: Any, data: Iterable, *, epochs: int,
                 lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, optimizer: str = "adam",
                 fused: bool | None = None, warmup_steps: int = 0, lr_decay: str = "none",
                 min_lr_ratio: float = 0.0, grad_clip: float | None = None,
                 num_accum: int = 1, ema_decay: float | None = None,
                 ema_warmup: bool = False, device: Any = "cpu", seed: int = 0,
                 chkpt_dir: str | None = None, chkpt_prefix: str = "chkpt",
                 chkpt_intv: int = 0, chkpt_intv_steps: int = 0,
                 chkpt_every_minutes: float = 0.0, save_final: bool = False,
                 log_path: str | None = None, log_every: int = 100,
                 tensorboard_dir: str | None = None, progress: bool = True,
                 callbacks: Sequence[Callback] = (), config: dict[str, Any] | None = None,
                 is_main: bool = True, rank: int = 0, world_size: int = 1,
                 control_group: Any = None, stop: StopFlag | None = None,
                 amp_dtype: torch.dtype | None = None,
                 throughput_key: str = "samples_per_s", class_dropout: float = 0.0):
        batches_per_epoch = _check_arguments(data, epochs, num_accum, lr, lr_decay, optimizer)
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.epochs = int(epochs)
        self.device = torch.device(device)
        self.num_accum = int(num_accum)
        self.grad_clip = float(grad_clip) if grad_clip else 0.0
        self.batches_per_epoch = batches_per_epoch
        # An epoch's last partial group of micro-batches still makes an update.
        self.steps_per_epoch = -(-batches_per_epoch // self.num_accum)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.files = CheckpointFiles(chkpt_dir, chkpt_prefix) if chkpt_dir else None
        self.chkpt_intv = int(chkpt_intv or 0)
        self.chkpt_intv_steps = int(chkpt_intv_steps or 0)
        self.chkpt_every_s = 60.0 * float(chkpt_every_minutes or 0.0)
        self.save_final = save_final
        self.log_every = max(int(log_every), 1)
        self.runlog = RunLog(log_path, tensorboard_dir, is_main)
        self.progress = progress
        self.callbacks: list[Callback] = list(callbacks)
        self.config = dict(config or {})
        self.is_main = is_main
        self.rank = rank
        self.world_size = world_size
        self.control_group = control_group
        self.stop = stop
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=amp_dtype == torch.float16)
        self.skipped_steps = 0  # fp16 updates skipped for inf/NaN gradients, in all
        self._skips_in_a_row = 0
        self.throughput_key = throughput_key
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
        self.class_dropout = float(class_dropout)
        # K of a class-conditional model (its "no class" label), None for an unconditional one.
        self.num_classes: int | None = getattr(unwrap(model), "num_classes", None)

        self.params = [p for p in unwrap(model).parameters() if p.requires_grad]
        self._build_optimizer(optimizer, lr, betas, weight_decay, fused, warmup_steps,
                              lr_decay, min_lr_ratio)
        self.ema = EMA(unwrap(model), ema_decay, warmup=ema_warmup) if ema_decay else None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed) + int(rank))

        # Counters: updates done, epochs done, micro-batches used in the current epoch.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        # 0-based index of the current micro-batch within its update (< num_accum; an epoch's
        # last group may be shorter, so count with this rather than modulo num_accum).
        self.micro_index = 0
        # Class labels (B,) of the current micro-batch, for compute_loss (None: unconditional).
        self.labels: torch.Tensor | None = None
        self.last_loss: float | None = None
        self.last_checkpoint: str | None = None
        self.last_saved_step: int | None = None  # the step the newest checkpoint holds
        self.stopped: int | None = None  # the signal that stopped the last `fit`, if any
        self._control: RunControl | None = None
        self._started = False
        self._reset_interval()
        self._pbar = None

    # ---- the parts a subclass may change -----------------------------------------------------
    def prepare_batch(self, batch: Any) -> torch.Tensor:
        """x_0 on the device from whatever the data yields."""
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        return batch.to(self.device, non_blocking=True)

    def prepare_labels(self, batch: Any) -> torch.Tensor | None:
        """Class labels y (B,) int64 on the device for a class-conditional model, else None."""
        if self.num_classes is None:
            return None
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise UserError("a class-conditional model trains on (inputs, labels) batches, but "
                            "the data gives no labels")
        return torch.as_tensor(batch[1]).to(self.device, torch.long, non_blocking=True)

    def compute_loss(self, x_0: torch.Tensor) -> torch.Tensor:
        """Mean diffusion loss of one micro-batch (DDPM Algorithm 1), a 0-dim tensor."""
        B = x_0.shape[0]
        t = torch.randint(self.diffusion.T, (B,), device=self.device, generator=self.generator)
        noise = torch.randn(x_0.shape, device=self.device, dtype=x_0.dtype,
                            generator=self.generator)
        y = None
        if self.labels is not None:
            u = torch.rand(B, device=self.device, generator=self.generator)
            y = self.drop_labels(self.labels, u)
        with self.autocast():
            losses = self.diffusion.training_losses(self.denoiser(y), x_0, t, noise)
        return losses.float().mean()

    def drop_labels(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """y (B,) with "no class" (K) where the uniform draw u (B,) < class_dropout."""
        return torch.where(u < self.class_dropout, torch.full_like(y, self.num_classes), y)

    def denoiser(self, y: torch.Tensor | None):
        """The network as `denoise_fn(x_t, t)`, given the (dropped-out) labels y or None."""
        if y is None:
            return self.model
        return lambda x_t, t: self.model(x_t, t, y)

    @property
    def sampling_model(self) -> nn.Module:
        """The weights to sample from: the EMA copy when EMA is on, else the trained model."""
        return self.ema.model if self.ema is not None else unwrap(self.model)

    def autocast(self):
        """The precision the run trains in, as a context manager (autocast or nothing)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- the loop ------------------------------------------------------------------------------
    def train_epoch(self, max_steps: int | None = None) -> float | None:
        """Run (the rest of) the current epoch; returns its mean loss (None if it stopped
        early: `max_steps` reached, or a stop requested)."""
        self.model.train()
        set_epoch(self.data, self.epoch)
        epoch_loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        epoch_batches = 0
        micro = 0
        group: list[torch.Tensor] = []  # the current update's micro-batch losses
        # Resume lands on an update boundary, so the next micro-batch opens a new group.
        for batch in iter_from(self.data, self.batch_in_epoch):
            x_0 = self.prepare_batch(batch)
            self.labels = self.prepare_labels(batch)
            self.micro_index = micro  # position in the accumulation group, for compute_loss
            self.batch_in_epoch += 1
            micro += 1
            last_micro = micro == self.num_accum or self.batch_in_epoch == self.batches_per_epoch
            with self._no_sync(last_micro):
                loss = self.compute_loss(x_0)
                self.scaler.scale(loss / self.num_accum).backward()
            group.append(loss.detach().to(torch.float64))
            self._items += x_0.shape[0]
            if last_micro:
                if self._update(micro, group):  # a skipped fp16 update's losses stay out
                    for detached in group:
                        epoch_loss_sum += detached
                    epoch_batches += len(group)
                group.clear()
                micro = 0
                if self._pbar is not None:
                    self._pbar.update(1)
                if self.stopped is not None or (max_steps is not None
                                                and self.step >= max_steps):
                    if self.batch_in_epoch < self.batches_per_epoch:
                        return None
        return self._end_epoch(epoch_loss_sum, epoch_batches)

    def _end_epoch(self, epoch_loss_sum: torch.Tensor, epoch_batches: int) -> float | None:
        if self.batch_in_epoch < self.batches_per_epoch:
            raise RuntimeError(
                f"the data gave {self.batch_in_epoch} batches in epoch {self.epoch + 1}, "
                f"fewer than its length {self.batches_per_epoch}")
        self.epoch += 1
        self.batch_in_epoch = 0
        if epoch_batches == 0:
            return None
        # Epoch end: one host sync, which also catches a NaN anywhere in the epoch.
        epoch_loss = float(self._reduce(epoch_loss_sum / epoch_batches))
        self._check_finite(epoch_loss)
        self.last_loss = epoch_loss
        return epoch_loss

    def fit(self, until_epoch: int | None = None, max_steps: int | None = None
            ) -> dict[str, Any]:
        """Train from the current counters to epoch `until_epoch` (default: `epochs`).

        `max_steps` stops after that many updates in total (e.g. 1 for a dry run); a stop
        signal (see `stop`) after the current update. Stopping early does not change the LR
        schedule, so a run continued later matches one that never stopped.
        """
        until = self.epochs if until_epoch is None else min(int(until_epoch), self.epochs)
        if self.epoch >= self.epochs and self.is_main:
            logger.warning("nothing to train: the state is at epoch %d (step %d) and this run "
                           "ends at epoch %d; give more epochs to train further", self.epoch,
                           self.step, self.epochs)
        start_step, t0 = self.step, time.perf_counter()
        self.stopped, self._started = None, False
        self._control = RunControl(self.stop, self.chkpt_every_s, self.control_group,
                                   self.world_size, self.is_main)
        self._reset_interval()
        try:
            with self._progress_bar():
                for cb in self.callbacks:
                    cb.on_train_start(self)
                self._run_epochs(until, max_steps)
                if self._loss_count and self._started:
                    self._log_interval(final=True)  # the last, partial interval
                if self.files and self.last_saved_step != self.step \
                        and (self.save_final or self.stopped is not None):
                    self.save_checkpoint()
                for cb in self.callbacks:
                    cb.on_train_end(self)
        finally:
            self._control.close()
            self._control = None
            self.runlog.flush()
        return {"step": self.step, "epoch": self.epoch, "loss": self.last_loss,
                "steps_run": self.step - start_step, "elapsed_s": time.perf_counter() - t0,
                "checkpoint": self.last_checkpoint, "stopped": self.stopped}

    def _run_epochs(self, until: int, max_steps: int | None) -> None:
        while self.epoch < until and (max_steps is None or self.step < max_steps):
            epoch_loss = self.train_epoch(max_steps=max_steps)
            if self.batch_in_epoch == 0:  # the epoch completed
                if self.is_main:
                    logger.info("epoch %d/%d  loss %.5f  lr %.3g  step %d", self.epoch,
                                self.epochs, epoch_loss if epoch_loss is not None else
                                float("nan"), self.optimizer.param_groups[0]["lr"], self.step)
                    if self.scaler.is_enabled():
                        logger.info("fp16: %d update(s) skipped for inf/NaN gradients so far, "
                                    "loss scale %g", self.skipped_steps, self.scaler.get_scale())
                for cb in self.callbacks:
                    cb.on_epoch_end(self)
                if self.chkpt_intv and self.epoch % self.chkpt_intv == 0 \
                        and self.last_saved_step != self.step:
                    self.save_checkpoint()
                if self.stopped is None:  # a stop asked for during the epoch-end work
                    self.stopped = self._control.settle().stop
            if self.stopped is not None or (max_steps is not None and self.step >= max_steps):
                return



