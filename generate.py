"""Reference-compatible entry point: `python generate.py ...` is `ddpmkit generate ...`."""

import sys

from ddpmkit.cli.generate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
