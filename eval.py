"""Reference-compatible entry point: `python eval.py ...` is `ddpmkit eval ...`."""

import sys

from ddpmkit.cli.eval import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
