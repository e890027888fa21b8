"""What every training recipe does the same way: prepare its run folder, map its training
settings to the one `Trainer`, continue from the state the folder found, and turn a stop signal
into the exit status and the message that says how to continue."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ddpmkit.config.run import TrainCfg
from ddpmkit.errors import signal_name
from ddpmkit.runtime.stops import StopFlag, exit_code
from ddpmkit.training.callbacks import Callback
from ddpmkit.training.run_folder import RunFolder
from ddpmkit.training.trainer import Trainer

# float32 copies of the parameters in a checkpoint: the weights and Adam's two moments, plus
# the EMA weights when kept.
_COPIES_WITHOUT_EMA = 3


def checkpoint_bytes(build_network: Callable[[], Any], use_ema: bool) -> int:
    """About how many bytes one checkpoint of a run takes, counted on the network
    `build_network()` makes on the meta device: no memory, no time, and the RNG left as it
    was."""
    import torch

    rng = torch.get_rng_state()
    try:
        with torch.device("meta"):
            network = build_network()
    finally:
        torch.set_rng_state(rng)
    copies = _COPIES_WITHOUT_EMA + (1 if use_ema else 0)
    return copies * 4 * sum(p.numel() for p in network.parameters())


def prepare_folder(folder: RunFolder, options: Mapping[str, Any],
                   check_resume: Callable[[dict[str, Any], str], None],
                   free_bytes: int = 0, restarted: bool = False) -> RunFolder:
    """The run's files, checked before any work (writable, `free_bytes` free) and by the
    rules of `RunFolder.prepare`: the resume point (`folder.resumed`), or a folder free of
    saved progress. `options`: resume, chkpt_path, overwrite, auto_resume (plain values);
    `restarted`: an elastic restart, which resumes from the newest checkpoint."""
    folder.preflight(free_bytes)
    overwrite = bool(options.get("overwrite"))
    if restarted and overwrite and not folder.holds_config(folder.config):
        # The first attempt died before it replaced the old run: replace it now.
        folder.check_new_run(overwrite=True)
        return folder
    folder.prepare(bool(options.get("resume")), options.get("chkpt_path"), overwrite,
                   check_resume, auto_resume=bool(options.get("auto_resume")) or restarted)
    return folder


def trainer_options(tr: TrainCfg, folder: RunFolder, callbacks: Sequence[Callback],
                    config: dict[str, Any], stop: StopFlag) -> dict[str, Any]:
    """The `Trainer` keyword arguments that come from a run's training settings and its run
    folder: the one place config names become the trainer's (`grad_norm` -> `grad_clip`,
    `warmup` -> `warmup_steps`, `use_ema` + `ema_decay` -> `ema_decay` or None, `log_intv` ->
    `log_every`, ...). `config`: what the checkpoints store."""
    return dict(
        epochs=tr.epochs, lr=tr.lr, betas=(tr.beta1, tr.beta2), weight_decay=tr.weight_decay,
        optimizer="adamw" if tr.weight_decay > 0 else "adam", warmup_steps=tr.warmup,
        grad_clip=float(tr.grad_norm or 0.0), num_accum=tr.num_accum,
        ema_decay=float(tr.ema_decay) if tr.use_ema else None, seed=tr.seed,
        chkpt_dir=folder.folder, chkpt_prefix=folder.files.prefix, chkpt_intv=tr.chkpt_intv,
        chkpt_intv_steps=tr.chkpt_every_steps or 0,
        chkpt_every_minutes=float(tr.chkpt_every_minutes or 0.0), save_final=True,
        log_path=folder.log_path, log_every=tr.log_intv, callbacks=[folder, *callbacks],
        config=config, stop=stop,
        class_dropout=float(tr.class_dropout) if tr.class_cond else 0.0)


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
