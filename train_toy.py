"""Reference-compatible entry point: `python train_toy.py ...` is `ddpmkit train-toy ...`."""

import sys

from ddpmkit.cli.train_toy import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
