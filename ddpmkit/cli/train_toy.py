"""`ddpmkit train-toy` (and `python train_toy.py`): train a diffusion model on 2-D toy data.

Every flag of the reference project's `train_toy.py` works with its meaning and default; the
extra flags default to the reference's behaviour. `--recipe sharp` switches to the recommended
settings (typed flags still win). Every `--eval-intv` epochs and at the end, the command samples
points, prints the metrics (2-D histogram KL against the estimator's floor, and for the Gaussian
mixtures modes covered and the share of points within 3 std of a mode) and saves a
true-vs-generated scatter plot; at the end it also writes an animation of those plots.
`--class-cond` makes the network conditional on the mixture's mode index (classifier-free
guidance): the evaluations then ask for each mode in turn, sample with `--guidance-scale`, and
also report the share of points within 3 std of the mode they asked for.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from ddpmkit.choices import ANIMATION_FORMATS, BETA_SCHEDULES, SAMPLERS, TOY_DATASETS
from ddpmkit.cli import CLIParser, add_objective_flags
from ddpmkit.config import parse_with_explicit
from ddpmkit.errors import UserError

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

# Guidance scale of a class-conditional run's evaluations when --guidance-scale is not given.
DEFAULT_TOY_GUIDANCE_SCALE = 1.0


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
    p.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default="linear")
    p.add_argument("--beta-start", type=float, default=0.001)
    p.add_argument("--beta-end", type=float, default=0.2)
    p.add_argument("--model-mean-type", choices=("mean", "x_0", "eps", "v"), default="eps")
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
                   help="checkpoint to resume from (with --resume; default: the one in "
                        "--chkpt-dir with the highest step)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the saved run of the dataset in --chkpt-dir (its checkpoints, "
                        "log and plots) with a new one")
    p.add_argument("--chkpt-every-minutes", type=float, default=10.0,
                   help="minutes between rolling checkpoints of the latest state (0: off)")
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
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="sampler used for evaluation")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps of every sampler but ddpm (ddim: T, heun: 10, the "
                        "others: 20)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--animation-format", choices=(*ANIMATION_FORMATS, "none"), default="gif",
                   help="format of the animation of the evaluation plots")
    p.add_argument("--class-cond", action="store_true",
                   help="class-conditional on the mixture's mode index (gaussian8, gaussian25), "
                        "for classifier-free guidance; evaluations ask for the modes in turn")
    p.add_argument("--class-dropout", type=float, default=0.1,
                   help="with --class-cond: probability that a label is replaced by \"no "
                        "class\" during training")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="with --class-cond: guidance scale w of the evaluation samples, "
                        f"eps = (1 + w) eps(x_t, y) - w eps(x_t, no class) (default "
                        f"{DEFAULT_TOY_GUIDANCE_SCALE:g})")
    add_objective_flags(p, "uniform", 5.0, False)
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(c: dict[str, Any]) -> None:
    """Every value in range before anything runs (NaN and inf are out of every range)."""
    for name, value in c.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{_flag(name)} must be a finite number, got {value}")
    for name in ("size", "epochs", "lr", "batch_size", "timesteps", "mid_features",
                 "eval_intv", "chkpt_intv", "num_eval_samples", "num_interim_samples",
                 "log_every", "min_snr_gamma"):
        if c[name] is None or c[name] <= 0:
            raise UserError(f"{_flag(name)} must be positive, got {c[name]}")
    for name in ("num_temporal_layers", "lr_warmup", "grad_clip", "fourier_features",
                 "chkpt_every_minutes"):
        if c[name] < 0:
            raise UserError(f"{_flag(name)} must be >= 0, got {c[name]}")
    if c["timesteps"] < 2:
        raise UserError("--timesteps must be at least 2")
    if c["batch_size"] > c["size"]:
        raise UserError(f"--batch-size {c['batch_size']} is larger than --size {c['size']}")
    for name in ("beta1", "beta2", "ema_decay"):
        if not 0 <= c[name] < 1:
            raise UserError(f"{_flag(name)} must be in [0, 1), got {c[name]}")
    if c["steps"] is not None and c["steps"] <= 0:
        raise UserError(f"--steps must be positive, got {c['steps']}")
    if c["eta"] != 0 and c["sampler"] != "ddim":
        raise UserError(f"--eta applies to ddim only, not to {c['sampler']}")
    _validate_classes(c)
    if c["chkpt_path"] and not c["resume"]:
        raise UserError("--chkpt-path names the checkpoint to resume from: add --resume, or "
                        "drop --chkpt-path to start a new run")


def _validate_classes(c: dict[str, Any]) -> None:
    """Class conditioning needs labels (the mixtures' modes); guidance needs conditioning."""
    if not 0 <= c["class_dropout"] < 1:
        raise UserError(f"--class-dropout must be in [0, 1), got {c['class_dropout']}")
    if c["class_cond"] and c["dataset"] == "swissroll":
        raise UserError("--class-cond needs labels, and swissroll has none: use gaussian8 or "
                        "gaussian25 (labels are the mode index)")
    if c["guidance_scale"] is not None:
        if not c["class_cond"]:
            raise UserError("--guidance-scale needs --class-cond (an unconditional model has "
                            "nothing to guide)")
        if not 0 <= c["guidance_scale"] < math.inf:
            raise UserError(f"--guidance-scale must be a finite number >= 0, got "
                            f"{c['guidance_scale']}")
    elif c["class_cond"]:
        c["guidance_scale"] = DEFAULT_TOY_GUIDANCE_SCALE


def run(argv: list[str] | None) -> int:
    from ddpmkit.cli import setup_logging

    c = resolve_config(argv)
    setup_logging()
    from ddpmkit.training.toy import train_toy  # torch loads here, after the flags are checked

    return train_toy(c, report=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None) -> int:
    from ddpmkit.cli import run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: run(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
