import sys

from ddpmkit.cli import main

sys.exit(main())
