"""`ddpmkit train-toy` (and `python train_toy.py`): train a diffusion model on 2-D toy data.

Every flag of the reference project's `train_toy.py` works with its meaning and default; the
extra flags default to the reference's behaviour. `--recipe sharp` switches to the recommended
settings (typed flags still win). Every `--eval-intv` epochs and at the end, the command samples
points, prints the metrics (2-D histogram KL against the estimator's floor, and for the Gaussian
mixtures modes covered and the share of points within 3 std of a mode) and saves a
true-vs-generated scatter plot; at the end it also writes an animation of those plots.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from typing import Any

import torch

from ddpmkit.cli import CLIParser
from ddpmkit.config import dump_json, parse_with_explicit
from ddpmkit.data.toy import TOY_DATASETS, TensorBatches, make_toy_data, toy_generator, toy_mixture
from ddpmkit.errors import UserError
from ddpmkit.training.trainer import Callback

logger = logging.getLogger(__name__)

# Points of the true distribution the metrics compare against: enough that the histogram-KL
# floor (two samples of the same distribution) stays below 0.02 with 50,000 generated points
# on every toy dataset (measured: about 0.002 / 0.005 / 0.015 for gaussian8 / 25 / swissroll).
NUM_TRUE_EVAL_POINTS = 400_000
# Generated points per sampling batch (bounds memory for large --num-eval-samples).
SAMPLE_CHUNK = 65_536
# Seed offsets: separate, reproducible streams for the training data, the true evaluation
# points, the floor's reference points and the evaluation samples.
SEED_EVAL_TRUE, SEED_EVAL_REF, SEED_SAMPLING = 1, 2, 3

BETA_SCHEDULE_CHOICES = ("quad", "linear", "warmup10", "warmup50", "jsd", "cosine", "const")

# Recommended settings (see the README's toy section for what they buy and why). Applied as
# defaults: flags the user typed still win.
RECIPES: dict[str, dict[str, Any]] = {
    "reference": {},
    # Sharp modes at the reference's cost (same T, steps and width). The quad schedule spends
    # its steps near the data, so the last reverse steps are small enough for `fixed-large`
    # to neither blur nor shrink narrow modes; Fourier input features let the MLP draw the
    # sharp borders between modes; cosine LR decay and EMA remove the weight noise of a
    # constant LR.
    "sharp": {
        "beta_schedule": "quad",
        "beta_start": 1e-4,
        "beta_end": 0.2,
        "lr_decay": "cosine",
        "ema_decay": 0.999,
        "fourier_features": 64,
        "fourier_scale": 2.0,
    },
}

# Settings a checkpoint must share with the command resuming from it.
MUST_MATCH_ON_RESUME = ("dataset", "timesteps", "beta_schedule", "beta_start", "beta_end",
                        "model_mean_type", "model_var_type", "loss_type", "mid_features",
                        "num_temporal_layers", "fourier_features", "fourier_scale")


def build_parser() -> argparse.ArgumentParser:
    p = CLIParser(prog="ddpmkit train-toy",
                description="Train a DDPM on 2-D toy data (gaussian8, gaussian25, swissroll).")
    # ---- the reference project's flags (names, types, defaults) ----
    p.add_argument("--dataset", choices=TOY_DATASETS, default="gaussian8")
    p.add_argument("--size", type=int, default=100_000, help="number of training points")
    p.add_argument("--root", type=str, default="~/datasets",
                   help="root directory of datasets (unused: toy data is generated)")
    p.add_argument("--epochs", type=int, default=100, help="total number of training epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--beta1", type=float, default=0.9, help="beta_1 in Adam")
    p.add_argument("--beta2", type=float, default=0.999, help="beta_2 in Adam")
    p.add_argument("--lr-warmup", type=int, default=0, help="number of warming-up epochs")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--timesteps", type=int, default=100, help="number of diffusion steps")
    p.add_argument("--beta-schedule", choices=BETA_SCHEDULE_CHOICES, default="linear")
    p.add_argument("--beta-start", type=float, default=0.001)
    p.add_argument("--beta-end", type=float, default=0.2)
    p.add_argument("--model-mean-type", choices=("mean", "x_0", "eps"), default="eps")
    p.add_argument("--model-var-type", choices=("learned", "fixed-small", "fixed-large"),
                   default="fixed-large")
    p.add_argument("--loss-type", choices=("kl", "mse"), default="mse")
    p.add_argument("--image-dir", type=str, default="./images/train")
    p.add_argument("--chkpt-dir", type=str, default="./chkpts")
    p.add_argument("--chkpt-intv", type=int, default=100, help="frequency of saving a checkpoint")
    p.add_argument("--eval-intv", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    p.add_argument("--resume", action="store_true", help="to resume training from a checkpoint")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--mid-features", type=int, default=128)
    p.add_argument("--num-temporal-layers", type=int, default=3)
    # ---- beyond the reference (defaults keep its behaviour) ----
    p.add_argument("--recipe", choices=tuple(RECIPES), default="reference",
                   help="preset defaults: 'reference' (the reference project's) or 'sharp' "
                        "(the recommended toy recipe); typed flags override either")
    p.add_argument("--chkpt-path", type=str, default=None,
                   help="checkpoint to resume from (default: the newest in --chkpt-dir)")
    p.add_argument("--lr-decay", choices=("none", "cosine", "linear"), default="none",
                   help="LR decay after warmup, to 0 at the last step")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="max global gradient norm (0: no clipping)")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="EMA of the weights, sampled from when on (0: off)")
    p.add_argument("--fourier-features", type=int, default=0,
                   help="random Fourier features of the input point (0: off)")
    p.add_argument("--fourier-scale", type=float, default=1.0,
                   help="std of the Fourier frequencies, in cycles per data unit")
    p.add_argument("--num-eval-samples", type=int, default=50_000,
                   help="points generated for the final evaluation")
    p.add_argument("--num-interim-samples", type=int, default=5_000,
                   help="points generated at each --eval-intv evaluation before the last")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm-solver++"), default="ddpm",
                   help="sampler used for evaluation")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps for ddim / dpm-solver++ (ddim: T, dpm-solver++: 20)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--animation-format", choices=("gif", "webp", "none"), default="gif",
                   help="format of the animation of the evaluation plots")
    p.add_argument("--log-every", type=int, default=100, help="steps between JSONL log records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_config(argv: list[str] | None) -> dict[str, Any]:
    """Parse flags and apply the recipe's defaults under the flags the user typed."""
    parser = build_parser()
    args, typed = parse_with_explicit(parser, argv)
    config = vars(args)
    for key, value in RECIPES[config["recipe"]].items():
        if key not in typed:
            config[key] = value
    validate(config)
    return config


def validate(c: dict[str, Any]) -> None:
    def positive(name: str):
        if c[name] is None or c[name] <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {c[name]}")

    for name in ("size", "epochs", "lr", "batch_size", "timesteps", "mid_features",
                 "eval_intv", "chkpt_intv", "num_eval_samples", "num_interim_samples",
                 "log_every"):
        positive(name)
    if c["num_temporal_layers"] < 0:
        raise UserError("--num-temporal-layers must be >= 0")
    if c["timesteps"] < 2:
        raise UserError("--timesteps must be at least 2")
    if c["batch_size"] > c["size"]:
        raise UserError(f"--batch-size {c['batch_size']} is larger than --size {c['size']}")
    for name in ("beta1", "beta2"):
        if not 0 <= c[name] < 1:
            raise UserError(f"--{name} must be in [0, 1), got {c[name]}")
    if not 0 <= c["ema_decay"] < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {c['ema_decay']}")
    for name in ("lr_warmup", "grad_clip", "fourier_features"):
        if c[name] < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {c[name]}")
    if c["steps"] is not None and c["steps"] <= 0:
        raise UserError(f"--steps must be positive, got {c['steps']}")


def build_diffusion(c: dict[str, Any]):
    from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule

    try:
        betas = get_beta_schedule(c["beta_schedule"], c["timesteps"], beta_start=c["beta_start"],
                                  beta_end=c["beta_end"])
        return GaussianDiffusion(betas, model_mean_type=c["model_mean_type"],
                                 model_var_type=c["model_var_type"], loss_type=c["loss_type"],
                                 decoder="continuous")
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def build_model(c: dict[str, Any], diffusion):
    from ddpmkit.models.toy import ToyMLP

    return ToyMLP(in_features=2, mid_features=c["mid_features"],
                       num_temporal_layers=c["num_temporal_layers"],
                       out_features=diffusion.model_out_channels(2),
                       fourier_features=c["fourier_features"], fourier_scale=c["fourier_scale"],
                       fourier_seed=c["seed"])


def build_sampler(c: dict[str, Any], diffusion):
    from ddpmkit.diffusion import make_sampler

    try:
        return make_sampler(diffusion, c["sampler"], steps=c["steps"], eta=c["eta"])
    except ValueError as exc:
        raise UserError(str(exc)) from exc


class ToyEvaluation:
    """Samples, scores and plots a toy model (used as a training callback and at the end)."""

    def __init__(self, c: dict[str, Any], diffusion, device: torch.device, image_dir: str):
        from ddpmkit.metrics.toy import ToyEvaluator

        self.c = c
        self.diffusion = diffusion
        self.sampler = build_sampler(c, diffusion)
        self.device = device
        self.image_dir = image_dir
        name, seed = c["dataset"], c["seed"]
        self.true = make_toy_data(name, NUM_TRUE_EVAL_POINTS, toy_generator(seed + SEED_EVAL_TRUE))
        mixture = toy_mixture(name)
        self.evaluator = ToyEvaluator(
            self.true, modes=None if mixture is None else mixture.modes,
            std=None if mixture is None else mixture.std)
        self._floors: dict[int, float] = {}
        self.history: list[dict[str, Any]] = []

    def floor(self, n: int) -> float:
        """KL(true || an independent true sample of n points): the best score n points get."""
        if n not in self._floors:
            ref = make_toy_data(self.c["dataset"], n,
                                toy_generator(self.c["seed"] + SEED_EVAL_REF))
            self._floors[n] = self.evaluator.kl(ref)
        return self._floors[n]

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, n: int, epoch: int) -> torch.Tensor:
        from ddpmkit.diffusion import sample

        was_training = model.training
        model.eval()
        g = torch.Generator(device=self.device)
        g.manual_seed(self.c["seed"] * 100_003 + SEED_SAMPLING * 1_009 + epoch)
        out = []
        for start in range(0, n, SAMPLE_CHUNK):
            x_T = torch.randn(min(SAMPLE_CHUNK, n - start), 2, generator=g, device=self.device)
            out.append(sample(self.diffusion, model, self.sampler, x_T, clip_denoised=False,
                              generator=g).float().cpu())
        model.train(was_training)
        return torch.cat(out)

    def run(self, model: torch.nn.Module, epoch: int, n: int) -> dict[str, Any]:
        from ddpmkit.utils.plots import save_scatter

        t0 = time.perf_counter()
        gen = self.generate(model, n, epoch)
        sample_s = time.perf_counter() - t0
        metrics = self.evaluator.evaluate(gen)
        metrics["kl_floor"] = self.floor(n)
        metrics["num_samples"] = n
        metrics["sample_s"] = round(sample_s, 2)
        metrics["epoch"] = epoch
        print(f"[eval] epoch {epoch}: {format_metrics(metrics)}", flush=True)
        path = os.path.join(self.image_dir, f"epoch_{epoch:04d}.png")
        title = f"{self.c['dataset']}, epoch {epoch}: {format_metrics(metrics, short=True)}"
        save_scatter(path, self.true[:n], gen, title=title,
                     value_range=self.evaluator.value_range)
        self.history.append(metrics)
        return metrics


def format_metrics(m: dict[str, Any], short: bool = False) -> str:
    parts = [f"hist-KL {m['kl']:.4f} (floor {m['kl_floor']:.4f})"]
    if "modes_covered" in m:
        parts.append(f"modes {m['modes_covered']}/{m['num_modes']}")
        parts.append(f"within 3 std {100 * m['high_quality']:.1f}%")
    if m.get("non_finite"):
        parts.append(f"{m['non_finite']} non-finite")
    if not short:
        parts.append(f"[{m['num_samples']:,} samples, {m['sample_s']:.1f} s]")
    return ", ".join(parts)


class _EvalCallback(Callback):
    def __init__(self, evaluation: ToyEvaluation, c: dict[str, Any]):
        self.evaluation = evaluation
        self.c = c
        self.final: dict[str, Any] | None = None

    def on_epoch_end(self, trainer) -> None:
        last = trainer.epoch == trainer.epochs
        if not last and trainer.epoch % self.c["eval_intv"]:
            return
        n = self.c["num_eval_samples"] if last else self.c["num_interim_samples"]
        metrics = self.evaluation.run(trainer.sampling_model, trainer.epoch, n)
        trainer.log_record({"step": trainer.step, "epoch": trainer.epoch,
                            "eval": {k: v for k, v in metrics.items() if k != "mode_counts"}})
        if last:
            self.final = metrics


def _find_resume_checkpoint(c: dict[str, Any]) -> str:
    from ddpmkit.training.checkpoint import latest_checkpoint

    if c["chkpt_path"]:
        return os.path.expanduser(c["chkpt_path"])
    path = latest_checkpoint(c["chkpt_dir"], f"ddpm_{c['dataset']}_*.pt")
    if path is None:
        raise UserError(
            f"--resume: no checkpoint ddpm_{c['dataset']}_<epoch>.pt in {c['chkpt_dir']!r}; "
            "run without --resume to start fresh, or pass --chkpt-path FILE")
    return path


def _check_resume_config(saved: dict[str, Any], c: dict[str, Any], path: str) -> None:
    diffs = [f"--{k.replace('_', '-')} {saved[k]} (now {c[k]})" for k in MUST_MATCH_ON_RESUME
             if k in saved and saved[k] != c[k]]
    if diffs:
        raise UserError(f"checkpoint {path} was trained with {', '.join(diffs)}; pass the same "
                        "settings to resume it")


def _write_animation(image_dir: str, fmt: str) -> str | None:
    from ddpmkit.utils.plots import save_animation

    frames = sorted(glob.glob(os.path.join(image_dir, "epoch_*.png")))
    if fmt == "none" or not frames:
        return None
    path = os.path.join(image_dir, f"train.{fmt}")
    try:
        save_animation(path, frames)
    except (ValueError, OSError) as exc:
        raise UserError(f"could not write the animation {path}: {exc}") from exc
    return path


def run(argv: list[str] | None) -> int:
    from ddpmkit.cli import setup_logging
    from ddpmkit.devices import resolve_device
    from ddpmkit.training.checkpoint import load_checkpoint
    from ddpmkit.training.trainer import Trainer

    c = resolve_config(argv)
    setup_logging()
    t_start = time.perf_counter()
    device = resolve_device(c["device"])
    c["device_resolved"] = str(device)
    name = c["dataset"]
    image_dir = os.path.join(os.path.expanduser(c["image_dir"]), name)
    chkpt_dir = os.path.expanduser(c["chkpt_dir"])
    c["chkpt_dir"] = chkpt_dir

    resume_state = None
    resume_path = None
    if c["resume"]:
        resume_path = _find_resume_checkpoint(c)
        resume_state = load_checkpoint(resume_path, map_location="cpu")
        _check_resume_config(resume_state.get("config") or {}, c, resume_path)

    print("config: " + json.dumps({k: c[k] for k in sorted(c)}), flush=True)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(chkpt_dir, exist_ok=True)
    dump_json(c, os.path.join(chkpt_dir, f"ddpm_{name}_config.json"))

    # Only the CLI seeds the global RNG (model initialization); everything else is explicit.
    torch.manual_seed(c["seed"])
    data = make_toy_data(name, c["size"], toy_generator(c["seed"]))
    # On the device once: batches are then gathered there, with no host-to-device copies.
    batches = TensorBatches(data.to(device), c["batch_size"], seed=c["seed"])
    diffusion = build_diffusion(c)
    model = build_model(c, diffusion).to(device)
    evaluation = ToyEvaluation(c, diffusion, device, image_dir)
    callback = _EvalCallback(evaluation, c)
    trainer = Trainer(
        model, diffusion, batches, epochs=c["epochs"], lr=c["lr"],
        betas=(c["beta1"], c["beta2"]), warmup_steps=c["lr_warmup"] * len(batches),
        lr_decay=c["lr_decay"], grad_clip=c["grad_clip"], ema_decay=c["ema_decay"] or None,
        device=device, seed=c["seed"], chkpt_dir=chkpt_dir,
        chkpt_name=f"ddpm_{name}_{{epoch}}.pt", chkpt_intv=c["chkpt_intv"], save_final=True,
        log_path=os.path.join(chkpt_dir, f"ddpm_{name}_log.jsonl"), log_every=c["log_every"],
        progress=not c["no_progress"], callbacks=[callback], config=c)
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        trainer.last_checkpoint = resume_path
        print(f"resumed from {resume_path} (epoch {trainer.epoch}, step {trainer.step})")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {len(data):,} points, {len(batches)} steps/epoch, model {n_params:,} "
          f"parameters, {diffusion}, device {device}", flush=True)

    t_train = time.perf_counter()
    summary = trainer.fit()
    train_s = time.perf_counter() - t_train
    anim = _write_animation(image_dir, c["animation_format"])
    total_s = time.perf_counter() - t_start
    final = callback.final
    if final is not None:
        result = {k: v for k, v in final.items() if k != "mode_counts"}
        result.update({"train_s": round(train_s, 1), "total_s": round(total_s, 1),
                       "steps": summary["step"], "final_loss": summary["loss"]})
        dump_json(result, os.path.join(image_dir, "metrics.json"))
        print(f"final: {format_metrics(final)}")
    print(f"done: {summary['step']} steps, loss {summary['loss']}, wall time {total_s:.1f} s "
          f"(training incl. evaluations {train_s:.1f} s); plots in {image_dir}"
          + (f", animation {anim}" if anim else ""), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from ddpmkit.cli import run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: run(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
