"""Logging setup for a process: each command's entry point (and each spawned worker) calls it;
library code only logs."""

import logging


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Plain `logging` to stderr; called by each command's entry point, never by library code.
    `quiet` (processes other than rank 0) shows warnings and errors only."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)
