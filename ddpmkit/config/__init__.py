"""Config resolution: built-in defaults < JSON config file < flags the user typed.

The reference project let its JSON file silently override typed flags; here a typed flag always
wins. `parse_with_explicit` tells which flags were typed so the merge can respect that.
"""

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Set, Tuple

from ddpmkit.errors import UserError

# The shipped configs sit in the package folder (ddpmkit/configs), beside this package.
PACKAGE_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "configs")


def parse_with_explicit(
    parser: argparse.ArgumentParser, argv: Optional[List[str]]
) -> Tuple[argparse.Namespace, Set[str]]:
    """Parse `argv`; also return the `dest` names of the options the user actually typed."""
    args = parser.parse_args(argv)
    saved = {}
    for action in parser._actions:  # argparse has no public API for "was this flag given"
        saved[action.dest] = action.default
        action.default = argparse.SUPPRESS
    try:
        typed, _ = parser.parse_known_args(argv)
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    return args, set(vars(typed))


def find_config_file(dataset: str, config_path: Optional[str] = None,
                     config_dir: Optional[str] = None) -> str:
    """Locate `<dataset>.json`: `config_path` if given, else `config_dir`, else the package's."""
    if config_path:
        if not os.path.isfile(config_path):
            raise UserError(f"config file {config_path!r} does not exist")
        return config_path
    for folder in (config_dir, PACKAGE_CONFIG_DIR):
        if folder:
            candidate = os.path.join(folder, f"{dataset}.json")
            if os.path.isfile(candidate):
                return candidate
    raise UserError(
        f"no config for dataset {dataset!r}: expected {dataset}.json in "
        f"{config_dir or PACKAGE_CONFIG_DIR}; pass --config-path FILE"
    )


def architecture_config(dataset: Optional[str], config_path: Optional[str] = None,
                        config_dir: Optional[str] = None,
                        required: bool = True) -> Optional[Dict[str, Any]]:
    """The config giving the architecture of a checkpoint file that carries none:
    `config_path`, else `<dataset>.json` (see `find_config_file`); None when neither is named,
    or, unless `required`, when `dataset` has no config file."""
    if not config_path and not dataset:
        return None
    folder = os.path.expanduser(config_dir) if config_dir else None
    try:
        return load_json(find_config_file(dataset or "", config_path or None, folder))
    except UserError:
        if required or config_path:
            raise
        return None


def load_json(path: str) -> Dict[str, Any]:
    """Read a JSON config file (plain data only: no code runs from a config)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read config {path!r}: {exc}") from exc
    except (UnicodeDecodeError, RecursionError) as exc:  # a binary file, absurd nesting
        raise UserError(f"cannot read config {path!r}: not a UTF-8 JSON text file") from exc
    if not isinstance(data, dict):
        raise UserError(f"config {path!r} must hold a JSON object at the top level")
    return data


def deep_update(base: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, Any]:
    """Return a copy of `base` with `other` merged in, recursing into nested dicts."""
    out = dict(base)
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def dump_json(config: Dict[str, Any], path: str) -> None:
    """Write the resolved config next to a run's outputs (atomically)."""
    from ddpmkit.utils.io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


# The frozen run configurations (imported last: they read the schema of this package).
from ddpmkit.config.run import (  # noqa: E402,F401
    DatasetCfg,
    DiffusionCfg,
    EvalCfg,
    ImageRunConfig,
    ModelCfg,
    RunPaths,
    TrainCfg,
)
from ddpmkit.config.toy import ToyRunConfig  # noqa: E402,F401
