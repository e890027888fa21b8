"""Moved to `ddpmkit.runtime.distributed`: this old path is the same module object (so imports and
monkeypatches at either path agree), kept for code written against it until its users move."""

import sys

from ddpmkit.runtime import distributed

sys.modules[__name__] = distributed
