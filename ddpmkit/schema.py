"""Moved to `ddpmkit.config.schema`: this old path is the same module object (so imports and
monkeypatches at either path agree), kept for code written against it until its users move."""

import sys

from ddpmkit.config import schema

sys.modules[__name__] = schema
