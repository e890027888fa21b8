"""The README's table of config keys, written from the schema (`markdown_table`); a test keeps
the README's copy equal to it."""

from __future__ import annotations

from typing import Mapping

from ddpmkit.config.schema import SCHEMA


def flag_for(section: str, name: str, flags: Mapping[str, tuple[str, str]]) -> str | None:
    """The command-line flag (e.g. `--lr`) that sets `section.name`, if any."""
    for dest, where in flags.items():
        if where == (section, name):
            return "--" + dest.replace("_", "-")
    return None


def markdown_table(flags: Mapping[str, tuple[str, str]] | None = None) -> str:
    """Every key as a Markdown table (section.key, kind, default, meaning, flag)."""
    flags = flags or {}
    rows = ["| key | value | default | meaning | flag |", "|---|---|---|---|---|"]
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            value = key.kind.replace("_", " ")
            if key.choices:
                value = " / ".join(f"`{c}`" for c in key.choices)
            if key.nullable:
                value += " or null"
            default = "" if key.default is None else f"`{key.default}`"
            flag = flag_for(section, name, flags)
            rows.append(f"| `{section}.{name}` | {value} | {default} | {key.doc} | "
                        f"{'`' + flag + '`' if flag else ''} |")
    return "\n".join(rows)
