"""`ddpmkit export`: a checkpoint -> a diffusers pipeline folder or a .safetensors file.

    ddpmkit export CHECKPOINT --format diffusers OUT_DIR     # DDPMPipeline.from_pretrained(OUT_DIR)
    ddpmkit export CHECKPOINT --format safetensors OUT.safetensors

CHECKPOINT is anything `generate --chkpt-path` takes. The EMA weights are exported when the
checkpoint has them (`--no-ema`: the raw ones). The library side is `ddpmkit.interop.export`.
"""
from __future__ import annotations

import argparse
import sys

from ddpmkit.choices import CONFIG_DATASETS
from ddpmkit.cli import CLIParser, run_guarded, setup_logging
from ddpmkit.errors import UserError
from ddpmkit.interop.export import FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = CLIParser(prog="ddpmkit export",
                  description="Write a model in a format other tools load: a diffusers "
                              "pipeline folder (UNet2DModel + DDPMScheduler) or one "
                              ".safetensors file with ddpmkit's config in its metadata.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint file (ddpmkit's or the reference project's), .safetensors "
                        "file, diffusers folder or Hugging Face Hub id")
    p.add_argument("out", metavar="OUT",
                   help="output folder (--format diffusers) or file (--format safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="diffusers: model_index.json + unet/ + scheduler/; safetensors: one "
                        "file of weights with the config as metadata")
    p.add_argument("--no-ema", action="store_true",
                   help="export the raw weights (default: the EMA weights when present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--dataset", choices=CONFIG_DATASETS, default=None,
                   help="for checkpoints without a config: use configs/<dataset>.json")
    p.add_argument("--config-path", default="",
                   help="for checkpoints without a config: the config file of the architecture")
    p.add_argument("--config-dir", default="./configs",
                   help="folder of <dataset>.json configs (falls back to the shipped ones)")
    return p


def export(argv: list[str] | None = None) -> int:
    import os

    from ddpmkit.config import architecture_config
    from ddpmkit.interop.export import export_checkpoint

    args = build_parser().parse_args(argv)
    fallback = architecture_config(args.dataset, args.config_path, args.config_dir)
    if not args.out.strip():
        raise UserError("OUT must be a path")
    result = export_checkpoint(args.checkpoint, os.path.expanduser(args.out), args.format,
                               use_ema=False if args.no_ema else None,
                               overwrite=args.overwrite, config=fallback)
    print(f"wrote {result.path} ({result.format}: {result.weights} weights, "
          f"{result.num_tensors} tensors)")
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_guarded(lambda: export(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
