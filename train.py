"""Reference-compatible entry point: `python train.py ...` is `ddpmkit train ...`."""

import sys

from ddpmkit.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
