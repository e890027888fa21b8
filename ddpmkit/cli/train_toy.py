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
import sys
from typing import Any

from ddpmkit.cli import CLIParser, add_objective_flags
from ddpmkit.config import parse_with_explicit
from ddpmkit.config.toy import ToyRunConfig
from ddpmkit.config.toy_schema import DEFAULT_TOY_GUIDANCE_SCALE, TOY_KEYS, toy_default

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

_t = toy_default  # the one copy of each toy default: the toy section of the schema


def _c(name: str) -> tuple:
    return TOY_KEYS[name].choices


def build_parser() -> argparse.ArgumentParser:
    p = CLIParser(prog="ddpmkit train-toy",
                description="Train a DDPM on 2-D toy data (gaussian8, gaussian25, swissroll).")
    # ---- the reference project's flags (names, types, defaults) ----
    p.add_argument("--dataset", choices=_c("dataset"), default=_t("dataset"))
    p.add_argument("--size", type=int, default=_t("size"), help="number of training points")
    p.add_argument("--root", type=str, default=_t("root"),
                   help="root directory of datasets (unused: toy data is generated)")
    p.add_argument("--epochs", type=int, default=_t("epochs"),
                   help="total number of training epochs")
    p.add_argument("--lr", type=float, default=_t("lr"), help="learning rate")
    p.add_argument("--beta1", type=float, default=_t("beta1"), help="beta_1 in Adam")
    p.add_argument("--beta2", type=float, default=_t("beta2"), help="beta_2 in Adam")
    p.add_argument("--lr-warmup", type=int, default=_t("lr_warmup"),
                   help="number of warming-up epochs")
    p.add_argument("--batch-size", type=int, default=_t("batch_size"))
    p.add_argument("--timesteps", type=int, default=_t("timesteps"),
                   help="number of diffusion steps")
    p.add_argument("--beta-schedule", choices=_c("beta_schedule"), default=_t("beta_schedule"))
    p.add_argument("--beta-start", type=float, default=_t("beta_start"))
    p.add_argument("--beta-end", type=float, default=_t("beta_end"))
    # the reference's order of choices (in --help and its errors); the schema holds the same
    p.add_argument("--model-mean-type", choices=("mean", "x_0", "eps", "v"),
                   default=_t("model_mean_type"))
    p.add_argument("--model-var-type", choices=("learned", "fixed-small", "fixed-large"),
                   default=_t("model_var_type"))
    p.add_argument("--loss-type", choices=("kl", "mse"), default=_t("loss_type"))
    p.add_argument("--image-dir", type=str, default=_t("image_dir"))
    p.add_argument("--chkpt-dir", type=str, default=_t("chkpt_dir"))
    p.add_argument("--chkpt-intv", type=int, default=_t("chkpt_intv"),
                   help="frequency of saving a checkpoint")
    p.add_argument("--eval-intv", type=int, default=_t("eval_intv"))
    p.add_argument("--seed", type=int, default=_t("seed"), help="random seed")
    p.add_argument("--resume", action="store_true", help="to resume training from a checkpoint")
    p.add_argument("--device", type=str, default=_t("device"), help="auto, cpu, cuda or cuda:N")
    p.add_argument("--mid-features", type=int, default=_t("mid_features"))
    p.add_argument("--num-temporal-layers", type=int, default=_t("num_temporal_layers"))
    # ---- beyond the reference (defaults keep its behaviour) ----
    p.add_argument("--recipe", choices=_c("recipe"), default=_t("recipe"),
                   help="preset defaults: 'reference' (the reference project's) or 'sharp' "
                        "(the recommended toy recipe); typed flags override either")
    p.add_argument("--chkpt-path", type=str, default=_t("chkpt_path"),
                   help="checkpoint to resume from (with --resume; default: the one in "
                        "--chkpt-dir with the highest step)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the saved run of the dataset in --chkpt-dir (its checkpoints, "
                        "log and plots) with a new one")
    p.add_argument("--chkpt-every-minutes", type=float, default=_t("chkpt_every_minutes"),
                   help="minutes between rolling checkpoints of the latest state (0: off)")
    p.add_argument("--lr-decay", choices=_c("lr_decay"), default=_t("lr_decay"),
                   help="LR decay after warmup, to 0 at the last step")
    p.add_argument("--grad-clip", type=float, default=_t("grad_clip"),
                   help="max global gradient norm (0: no clipping)")
    p.add_argument("--ema-decay", type=float, default=_t("ema_decay"),
                   help="EMA of the weights, sampled from when on (0: off)")
    p.add_argument("--fourier-features", type=int, default=_t("fourier_features"),
                   help="random Fourier features of the input point (0: off)")
    p.add_argument("--fourier-scale", type=float, default=_t("fourier_scale"),
                   help="std of the Fourier frequencies, in cycles per data unit")
    p.add_argument("--num-eval-samples", type=int, default=_t("num_eval_samples"),
                   help="points generated for the final evaluation")
    p.add_argument("--num-interim-samples", type=int, default=_t("num_interim_samples"),
                   help="points generated at each --eval-intv evaluation before the last")
    p.add_argument("--sampler", choices=_c("sampler"), default=_t("sampler"),
                   help="sampler used for evaluation")
    p.add_argument("--steps", type=int, default=_t("steps"),
                   help="sampling steps of every sampler but ddpm (ddim: T, heun: 10, the "
                        "others: 20)")
    p.add_argument("--eta", type=float, default=_t("eta"), help="DDIM eta")
    p.add_argument("--animation-format", choices=_c("animation_format"),
                   default=_t("animation_format"),
                   help="format of the animation of the evaluation plots")
    p.add_argument("--class-cond", action="store_true",
                   help="class-conditional on the mixture's mode index (gaussian8, gaussian25), "
                        "for classifier-free guidance; evaluations ask for the modes in turn")
    p.add_argument("--class-dropout", type=float, default=_t("class_dropout"),
                   help="with --class-cond: probability that a label is replaced by \"no "
                        "class\" during training")
    p.add_argument("--guidance-scale", type=float, default=_t("guidance_scale"),
                   help="with --class-cond: guidance scale w of the evaluation samples, "
                        f"eps = (1 + w) eps(x_t, y) - w eps(x_t, no class) (default "
                        f"{DEFAULT_TOY_GUIDANCE_SCALE:g})")
    add_objective_flags(p, _t("loss_weight"), _t("min_snr_gamma"), _t("zero_terminal_snr"))
    p.add_argument("--log-every", type=int, default=_t("log_every"),
                   help="steps between JSONL log records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_config(argv: list[str] | None) -> dict[str, Any]:
    """Parse flags and apply the recipe's defaults under the flags the user typed; the values
    are checked by `ToyRunConfig` (the dict is its `to_dict()`)."""
    parser = build_parser()
    args, typed = parse_with_explicit(parser, argv)
    config = vars(args)
    for key, value in RECIPES[config["recipe"]].items():
        if key not in typed:
            config[key] = value
    return ToyRunConfig.from_dict(config).to_dict()


def run(argv: list[str] | None) -> int:
    from ddpmkit.cli import setup_logging

    c = resolve_config(argv)
    setup_logging()
    from ddpmkit.recipes.toy import train_toy  # torch loads here, after the flags are checked

    return train_toy(c, report=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None) -> int:
    from ddpmkit.cli import run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: run(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
