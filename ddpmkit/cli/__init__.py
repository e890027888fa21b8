"""The `ddpmkit` console command: one subcommand per module in this package.

Each subcommand module exposes `build_parser()` and `main(argv) -> int`; `main` here dispatches.
`run_guarded` turns a `UserError` into a one-line message and exit status 2.

Nothing here, and nothing a subcommand module imports at its top, loads torch: `--help` and flag
errors answer at once, and torch is imported inside the functions that do the work.
"""

import argparse
import importlib
import math
import re
import sys
from typing import Callable, List, Optional

from ddpmkit.errors import UserError, cause_of_type, user_message
from ddpmkit.runtime.logs import setup_logging  # noqa: F401  (the commands' entry points use it)

# subcommand name -> (module under ddpmkit.cli, what it does)
SUBCOMMANDS = {
    "train-toy": ("train_toy", "train on 2-D toy data, with metrics and plots"),
    "train": ("train", "train on images (one process, torchrun, or spawn)"),
    "generate": ("generate", "write samples as PNGs, grids, animations"),
    "eval": ("eval", "FID, precision/recall, KID, IS, bits/dim"),
    "export": ("export", "a model as a diffusers pipeline folder or a .safetensors file"),
}

USAGE = ("usage: ddpmkit {" + ",".join(SUBCOMMANDS) + "} [flags]\n\n"
         + "\n".join(f"  {name:<10} {what}" for name, (_, what) in SUBCOMMANDS.items())
         + "\n\n`ddpmkit COMMAND --help` lists a command's flags and their defaults; "
         + "`ddpmkit --version` prints the version.")

# argparse reads "-1e-3" as an option, not a value: its test for negative numbers knows no
# exponents. This one also accepts -1e-3, -2.5E+4, -.5e1.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default after its help text (flags without help text get one too)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text \
                or not action.option_strings:
            return text
        return (text + " " if text else "") + "(default: %(default)s)"


class CLIParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a one-line UserError (exit 2 via `run_guarded`), not usage
    text and a SystemExit from deep inside the parser; defaults are shown in --help; and
    negative numbers in scientific notation are values (`--lr -1e-3`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")

    def _get_value(self, action, arg_string):
        # Every number a flag takes is finite: NaN passes every `<` / `>` range check.
        value = super()._get_value(action, arg_string)
        if isinstance(value, float) and not math.isfinite(value):
            flag = action.option_strings[0] if action.option_strings else action.dest
            raise UserError(f"{flag} must be a finite number, got {arg_string}")
        return value


def add_speed_flags(group, what: str) -> None:
    """`--channels-last` and `--compile [MODE]`, shared by train and generate; `what` names the
    network in the help text."""
    from ddpmkit.choices import COMPILE_MODES

    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels_last memory format (default: off; slower for this UNet "
                            "on an H100)")
    group.add_argument("--compile", nargs="?", const="default", default=None,
                       choices=COMPILE_MODES, metavar="MODE",
                       help=f"torch.compile the {what}; MODE: {', '.join(COMPILE_MODES)} "
                            "(MODE defaults to default)")


def add_objective_flags(group, loss_weight: str, min_snr_gamma: float,
                        zero_terminal_snr: bool) -> None:
    """`--loss-weight`, `--min-snr-gamma` and `--(no-)zero-terminal-snr`, shared by train and
    train-toy (each passes its defaults)."""
    from ddpmkit.choices import LOSS_WEIGHTS

    group.add_argument("--loss-weight", choices=LOSS_WEIGHTS, default=loss_weight,
                       help="weight of the MSE over t: uniform (DDPM), or min-snr (Hang et al. "
                            "2023: min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x_0, "
                            "min(SNR, gamma) / (SNR + 1) for v)")
    group.add_argument("--min-snr-gamma", type=float, default=min_snr_gamma,
                       help=f"gamma of --loss-weight min-snr (default {min_snr_gamma:g})")
    group.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction,
                       default=zero_terminal_snr,
                       help="rescale the betas to zero SNR at the last step (Lin et al. 2024, "
                            "Algorithm 1); not with --model-mean-type eps (use v)")


def add_weights_flags(group, what: str = "use") -> None:
    """`--use-ema`, `--no-ema` and `--group-norm-eps`: which weights of a checkpoint to take,
    shared by generate and eval (`weights_choice` reads them back)."""
    group.add_argument("--use-ema", action="store_true",
                       help="demand the EMA weights (an error if the checkpoint has none); "
                            "without it they are used whenever the checkpoint has them")
    group.add_argument("--no-ema", action="store_true",
                       help=f"{what} the raw weights even when the checkpoint has EMA weights")
    group.add_argument("--group-norm-eps", type=float, default=None,
                       help="GroupNorm epsilon of checkpoints without a config (the reference "
                            "project's files): 1e-5, the default, for its released "
                            "checkpoints; 1e-6 for models trained with its code after "
                            "2023-07-16")


def weights_choice(args) -> Optional[bool]:
    """The `use_ema` of the loaders from those flags: True, False, or None (EMA if present);
    contradictory or impossible values are a UserError."""
    if args.use_ema and args.no_ema:
        raise UserError("--use-ema and --no-ema contradict each other; give one")
    if args.group_norm_eps is not None and not args.group_norm_eps > 0:
        raise UserError(f"--group-norm-eps must be positive, got {args.group_norm_eps}")
    return True if args.use_ema else False if args.no_ema else None


def run_guarded(fn: Callable[[], Optional[int]]) -> int:
    """Run a command body; a UserError or Ctrl-C becomes a one-line message and exit status 2
    or 130, not a traceback. (Training and generation stop gracefully on the first SIGINT or
    SIGTERM themselves: see `ddpmkit.runtime.stops`.)"""
    try:
        code = fn()
    except UserError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if cause_of_type(exc, KeyboardInterrupt) is None:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ddpmkit import __version__

        print(f"ddpmkit {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"ddpmkit.cli.{SUBCOMMANDS[name][0]}")
    return module.main(rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
