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

Exact resume: a checkpoint holds the model, EMA, optimizer, LR scheduler, step/epoch counters,
the position inside the epoch (`batch_in_epoch`), the trainer's noise generator, the global
RNG states and, for fp16, the loss scaler. The data source must give the same batch order for
the same epoch (call `set_epoch(epoch)` on it; `ddpmkit.data.toy.TensorBatches` and
`DistributedSampler` do), so a resumed run skips the batches already used and continues
bit-identically on the CPU.

Checkpoints (`CheckpointFiles`): permanent `<prefix>_<epoch>.pt` every `chkpt_intv` epochs;
rolling `<prefix>_step<step>.pt` every `chkpt_every_minutes` minutes or `chkpt_intv_steps`
updates, and whenever a run stops mid-epoch (the last two are kept). With a `StopFlag`, a
SIGTERM or Ctrl-C ends `fit` after the current update with that state saved (`stopped` in the
result). Every save involves every process (each one's RNG state goes into the file; the main
process writes it, and all of them learn whether that worked), and so does the decision to
stop or to save on the clock (`RunControl`), so processes never wait on each other in vain.

Distributed runs pass the DDP-wrapped model; `unwrap` reaches the module underneath for
checkpoints and EMA, `is_main` limits logging, progress bars and checkpoint writes to one
process, and accumulation micro-steps skip the gradient all-reduce (`no_sync`).

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
import itertools
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable

import torch
from torch import nn

from ddpmkit.checkpoints.files import (
    CheckpointFiles,
    get_rng_state,
    save_checkpoint,
    set_rng_state,
)
from ddpmkit.choices import LR_DECAYS, OPTIMIZERS
from ddpmkit.errors import UserError
from ddpmkit.runtime.stops import RunControl, StopFlag
from ddpmkit.training.ema import EMA
from ddpmkit.training.runlog import RunLog

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "ddpmkit.trainer"
# fp16: halving the scale this many times in a row takes torch's default initial scale 2^16
# below 2^-14, fp16's smallest normal number; gradients that still overflow are not a scaling
# problem but a diverged run.
MAX_SKIPS_IN_A_ROW = 30


class NonFiniteLossError(UserError):
    """The loss (or the weights) became NaN/inf; training stopped without saving."""


class FollowerStop(UserError):
    """Raised on the other processes when the main process could not save: they stop too."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "none",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base LR before update `step` (0-based).

    Linear warmup min((step + 1) / warmup_steps, 1) (the reference's form), then `decay` from 1
    down to `min_lr_ratio` at `total_steps`: `cosine` (half a cosine wave) or `linear`.
    """
    factor = min((step + 1) / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    if decay == "none" or total_steps <= warmup_steps:
        return factor
    progress = min(max((step - warmup_steps) / (total_steps - warmup_steps), 0.0), 1.0)
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown lr decay {decay!r}; choose from {', '.join(LR_DECAYS)}")
    return factor * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)


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


def _set_epoch(data: Any, epoch: int) -> None:
    """Tell the data source (or its sampler) which epoch starts: its shuffle depends on it."""
    for obj in (data, getattr(data, "sampler", None),
                getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def _iter_from(data: Iterable, start: int) -> Iterator:
    """Batches of the current epoch from index `start` (skipping cheaply where supported)."""
    if start == 0:
        return iter(data)
    if hasattr(data, "iter_from"):
        return data.iter_from(start)
    return itertools.islice(iter(data), start, None)


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


class Trainer:
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
        with self._autocast():
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

    # ---- internals -----------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _no_sync(self, last_micro: bool):
        if not last_micro and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

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

    # ---- the loop ------------------------------------------------------------------------------
    def train_epoch(self, max_steps: int | None = None) -> float | None:
        """Run (the rest of) the current epoch; returns its mean loss (None if it stopped
        early: `max_steps` reached, or a stop requested)."""
        self.model.train()
        _set_epoch(self.data, self.epoch)
        epoch_loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        epoch_batches = 0
        micro = 0
        group: list[torch.Tensor] = []  # the current update's micro-batch losses
        # Resume lands on an update boundary, so the next micro-batch opens a new group.
        for batch in _iter_from(self.data, self.batch_in_epoch):
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

    # ---- checkpoints -----------------------------------------------------------------------------
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


def make_callback(on_epoch_end: Callable[[Trainer], None] | None = None,
                  on_train_end: Callable[[Trainer], None] | None = None) -> Callback:
    """A `Callback` from plain functions."""
    cb = Callback()
    if on_epoch_end is not None:
        cb.on_epoch_end = on_epoch_end  # type: ignore[method-assign]
    if on_train_end is not None:
        cb.on_train_end = on_train_end  # type: ignore[method-assign]
    return cb
