"""The schema is the one source of defaults: every fallback written elsewhere equals its default,
and code that reads a config without a key gets the schema's value."""

import ast
from pathlib import Path

import pytest
import torch

from ddpmkit.build import DIFFUSION_DEFAULTS
from ddpmkit.config import schema
from ddpmkit.models.unet import MODEL_DEFAULTS

PACKAGE = Path(__file__).resolve().parents[1] / "ddpmkit"


@pytest.mark.parametrize("section, fallbacks", [("diffusion", DIFFUSION_DEFAULTS),
                                                ("model", MODEL_DEFAULTS)])
def test_library_fallbacks_are_the_schema_defaults(section, fallbacks):
    for name, value in fallbacks.items():
        assert name in schema.SCHEMA[section], f"{section}.{name} is not in the schema"
        assert schema.SCHEMA[section][name].default == value, f"{section}.{name}"


def test_training_reads_missing_eval_keys_from_the_schema():
    from ddpmkit.config import DatasetCfg, EvalCfg
    from ddpmkit.training.eval_callback import FIDCallback

    config = {"dataset": {"name": "cifar10"}}  # an old config: no eval section at all
    callback = FIDCallback(EvalCfg.from_dict(config.get("eval")),
                           DatasetCfg.from_dict(config["dataset"]), None, (3, 8, 8),
                           torch.device("cpu"))
    ev = schema.SCHEMA["eval"]
    assert callback.skip_schedule == ev["skip_schedule"].default == "quadratic"
    assert (callback.total, callback.batch) == (ev["total_size"].default,
                                                ev["batch_size"].default)
    assert callback.guidance_scale == ev["guidance_scale"].default


def _literal_eval_fallbacks():
    """`x.get("<eval key>", <literal>)` calls in training code: fallbacks written by hand."""
    found = []
    for path in sorted((PACKAGE / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "get" and len(node.args) == 2
                    and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in schema.SCHEMA["eval"]
                    and isinstance(node.args[1], ast.Constant)):
                found.append(f"{path.name}:{node.lineno} {node.args[0].value}")
    return found


def test_no_eval_fallback_is_written_by_hand_in_training():
    assert _literal_eval_fallbacks() == []
