"""The toy recipe: 2-D points -> `ToyMLP` -> `Trainer`, with the toy evaluation
(`training.toy.ToyEvaluation`) as its callback; `train_toy(config)` is what `ddpmkit train-toy`
calls. Its flags become the training settings every recipe hands the trainer
(`train_settings`); folder preparation by `train`'s rules, the trainer's arguments, resume and
stop handling are `recipes.common`'s.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import torch

from ddpmkit.build import build_diffusion
from ddpmkit.config.run import TrainCfg
from ddpmkit.config.toy import ToyRunConfig
from ddpmkit.data.toy import TensorBatches, make_labeled_toy_data, toy_generator
from ddpmkit.errors import UserError
from ddpmkit.recipes.common import (
    checkpoint_bytes,
    prepare_folder,
    resume_from,
    stop_exit_code,
    trainer_options,
)
from ddpmkit.runtime.stops import StopFlag
from ddpmkit.training.run_folder import RunFolder
from ddpmkit.training.toy import (
    ADDED_LATER,
    DECODER,
    MUST_MATCH_ON_RESUME,
    TOY_IMAGE_RE,
    ToyEvalCallback,
    ToyEvaluation,
    build_model,
    format_metrics,
    num_classes,
    write_animation,
)
from ddpmkit.training.trainer import Trainer

logger = logging.getLogger(__name__)


def check_resume_config(saved: dict[str, Any], c: dict[str, Any], path: str) -> None:
    saved = {**ADDED_LATER, **saved}
    diffs = [f"--{k.replace('_', '-')} {saved[k]} (now {c[k]})" for k in MUST_MATCH_ON_RESUME
             if k in saved and saved[k] != c[k]]
    if diffs:
        raise UserError(f"checkpoint {path} was trained with {', '.join(diffs)}; pass the same "
                        "settings to resume it")


def toy_folder(c: dict[str, Any], image_dir: str) -> RunFolder:
    """The run's files (checked, nothing written yet) by the rules of `train`
    (`recipes.common.prepare_folder`), with the reference's file names."""
    name = c["dataset"]
    folder = RunFolder(c["chkpt_dir"], f"ddpm_{name}", c, image_dir,
                       config_name=f"ddpm_{name}_config.json", log_name=f"ddpm_{name}_log.jsonl",
                       image_pattern=TOY_IMAGE_RE, elsewhere="another --chkpt-dir",
                       start_fresh="run without --resume to start a new run")
    options = {"resume": c["resume"], "overwrite": c["overwrite"],
               "chkpt_path": os.path.expanduser(c["chkpt_path"]) if c["chkpt_path"] else None}
    size = checkpoint_bytes(lambda: build_model(c, build_diffusion(c, DECODER)),
                            c["ema_decay"] > 0)
    return prepare_folder(folder, options, lambda state, path: check_resume_config(
        state.get("config") or {}, c, path), size)


def train_settings(c: dict[str, Any], batches_per_epoch: int) -> TrainCfg:
    """The toy flags (the reference's spellings) as the training settings every recipe hands
    the trainer: one key per concept (`--lr-warmup` epochs -> `warmup` updates, `--grad-clip`
    -> `grad_norm`, `--ema-decay` 0 -> no EMA, `--log-every` -> `log_intv`)."""
    return TrainCfg(epochs=c["epochs"], lr=c["lr"], beta1=c["beta1"], beta2=c["beta2"],
                    batch_size=c["batch_size"], warmup=c["lr_warmup"] * batches_per_epoch,
                    grad_norm=c["grad_clip"], use_ema=c["ema_decay"] > 0,
                    ema_decay=c["ema_decay"], chkpt_intv=c["chkpt_intv"],
                    chkpt_every_minutes=c["chkpt_every_minutes"], chkpt_every_steps=0,
                    log_intv=c["log_every"], seed=c["seed"], class_cond=c["class_cond"],
                    class_dropout=c["class_dropout"])


def _build_trainer(c: dict[str, Any], device, folder: RunFolder, callback: ToyEvalCallback,
                   stop: StopFlag) -> Trainer:
    # Only the CLI seeds the global RNG (model initialization); everything else is explicit.
    torch.manual_seed(c["seed"])
    data, labels = make_labeled_toy_data(c["dataset"], c["size"], toy_generator(c["seed"]))
    if num_classes(c) is None:
        labels = None
    # On the device once: batches are then gathered there, with no host-to-device copies.
    batches = TensorBatches(data.to(device), c["batch_size"], seed=c["seed"],
                            labels=None if labels is None else labels.to(device))
    diffusion = callback.evaluation.diffusion
    model = build_model(c, diffusion).to(device)
    options = trainer_options(train_settings(c, len(batches)), folder, [callback], c, stop)
    return Trainer(model, diffusion, batches, **options, lr_decay=c["lr_decay"], device=device,
                   progress=not c["no_progress"])


def train_toy(config: ToyRunConfig | dict[str, Any],
              report: Callable[[str], None] = logger.info) -> int:
    """Train, evaluate and plot a toy model as `ddpmkit train-toy` does; returns the exit
    status (0, or 128 + the signal that stopped it). `config`: a `ToyRunConfig` (or its
    `to_dict()`); the run records the device it resolved to."""
    from ddpmkit.runtime.devices import resolve_device

    t_start = time.perf_counter()
    if not isinstance(config, ToyRunConfig):
        config = ToyRunConfig.from_dict(config)
    device = resolve_device(config.device)
    config = config.replace(device_resolved=str(device),
                            chkpt_dir=os.path.expanduser(config.chkpt_dir))
    c = config.to_dict()  # the flat dict the run's helpers read and its checkpoints store
    image_dir = os.path.join(os.path.expanduser(c["image_dir"]), c["dataset"])
    folder = toy_folder(c, image_dir)
    report("config: " + json.dumps({k: c[k] for k in sorted(c)}))
    evaluation = ToyEvaluation(c, build_diffusion(c, DECODER), device, image_dir, report)
    callback = ToyEvalCallback(evaluation, c)
    with StopFlag() as stop:
        trainer = _build_trainer(c, device, folder, callback, stop)
        resume_from(trainer, folder, report)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        report(f"{c['dataset']}: {c['size']:,} points, {trainer.batches_per_epoch} steps/epoch, "
               f"model {n_params:,} parameters, {evaluation.diffusion}, device {device}")
        t_train = time.perf_counter()
        summary = trainer.fit()
    code = stop_exit_code(summary, trainer, report)
    if code is not None:
        return code
    _finish(c, image_dir, callback, summary, time.perf_counter() - t_train,
            time.perf_counter() - t_start, report)
    return 0


def _finish(c, image_dir, callback, summary, train_s, total_s, report) -> None:
    from ddpmkit.config import dump_json

    anim = write_animation(image_dir, c["animation_format"])
    final = callback.final
    if final is not None:
        result = {k: v for k, v in final.items() if k != "mode_counts"}
        result.update({"train_s": round(train_s, 1), "total_s": round(total_s, 1),
                       "steps": summary["step"], "final_loss": summary["loss"]})
        dump_json(result, os.path.join(image_dir, "metrics.json"))
        report(f"final: {format_metrics(final)}")
    report(f"done: {summary['step']} steps, loss {summary['loss']}, wall time {total_s:.1f} s "
           f"(training incl. evaluations {train_s:.1f} s); plots in {image_dir}"
           + (f", animation {anim}" if anim else ""))
