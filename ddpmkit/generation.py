"""Moved to `ddpmkit.sampling`: this old path is the same module object (so imports at either
path agree), kept for code written against it until its users move."""

import sys

from ddpmkit import sampling

sys.modules[__name__] = sampling
