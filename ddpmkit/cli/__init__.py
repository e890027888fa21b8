"""The `ddpmkit` console command: one subcommand per module in this package.

Each subcommand module exposes `build_parser()` and `main(argv) -> int`; `main` here dispatches.
`run_guarded` turns a `UserError` into a one-line message and exit status 2.
"""

import argparse
import importlib
import logging
import sys
from typing import Callable, List, Optional

from ddpmkit.errors import UserError

# subcommand name -> module under ddpmkit.cli
SUBCOMMANDS = {
    "train-toy": "train_toy",
    "train": "train",
    "generate": "generate",
    "eval": "eval",
    "export": "export",
}

USAGE = "usage: ddpmkit {" + ",".join(SUBCOMMANDS) + "} [flags]   (ddpmkit SUBCOMMAND --help)"


class CLIParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a one-line UserError (exit 2 via `run_guarded`), not usage
    text and a SystemExit from deep inside the parser."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def add_speed_flags(group, what: str) -> None:
    """`--channels-last` and `--compile [MODE]`, shared by train and generate; `what` names the
    network in the help text."""
    from ddpmkit.devices import COMPILE_MODES

    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels_last memory format (default: off; slower for this UNet "
                            "on an H100)")
    group.add_argument("--compile", nargs="?", const="default", default=None,
                       choices=COMPILE_MODES, metavar="MODE",
                       help=f"torch.compile the {what}; MODE: {', '.join(COMPILE_MODES)} "
                            "(default: default)")


def run_guarded(fn: Callable[[], Optional[int]]) -> int:
    """Run a command body; a UserError (or Ctrl-C) becomes a one-line message, not a traceback."""
    try:
        code = fn()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def setup_logging(verbose: bool = False) -> None:
    """Plain `logging` to stderr; called by each command's entry point, never by library code."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"ddpmkit.cli.{SUBCOMMANDS[name]}")
    return module.main(rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
