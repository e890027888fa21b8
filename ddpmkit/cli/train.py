"""`ddpmkit train` (and `python train.py`): train a DDPM on images.

Flags keep the reference project's names. Config precedence: built-in defaults < the dataset's
JSON config (configs/<dataset>.json, or --config-path) < flags typed on the command line.
"""

import argparse
import logging
import os
from typing import Any, Dict, List, Optional, Set

from ddpmkit.cli import CLIParser, add_speed_flags, run_guarded, setup_logging
from ddpmkit.config import deep_update, find_config_file, load_json, parse_with_explicit
from ddpmkit.diffusion import BETA_SCHEDULES, LOSS_TYPES, MODEL_MEAN_TYPES, MODEL_VAR_TYPES
from ddpmkit.diffusion.schedules import SKIP_SCHEDULES
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_DATASETS = ("mnist", "cifar10", "celeba", "celebahq", "folder")

# dest of a flag -> (config section, key). Only these flags end up in the resolved config.
FLAG_TO_CONFIG = {
    "root": ("dataset", "root"),
    "image_size": ("dataset", "resolution"),
    "random_flip": ("dataset", "random_flip"),
    "download": ("dataset", "download"),
    "num_workers": ("dataset", "num_workers"),
    "timesteps": ("diffusion", "timesteps"),
    "beta_schedule": ("diffusion", "beta_schedule"),
    "beta_start": ("diffusion", "beta_start"),
    "beta_end": ("diffusion", "beta_end"),
    "model_mean_type": ("diffusion", "model_mean_type"),
    "model_var_type": ("diffusion", "model_var_type"),
    "loss_type": ("diffusion", "loss_type"),
    "block_size": ("model", "block_size"),
    "hid_channels": ("model", "hid_channels"),
    "ch_multipliers": ("model", "ch_multipliers"),
    "num_res_blocks": ("model", "num_res_blocks"),
    "apply_attn": ("model", "apply_attn"),
    "drop_rate": ("model", "drop_rate"),
    "group_norm_eps": ("model", "group_norm_eps"),
    "epochs": ("train", "epochs"),
    "max_steps": ("train", "max_steps"),
    "lr": ("train", "lr"),
    "beta1": ("train", "beta1"),
    "beta2": ("train", "beta2"),
    "weight_decay": ("train", "weight_decay"),
    "batch_size": ("train", "batch_size"),
    "num_accum": ("train", "num_accum"),
    "grad_norm": ("train", "grad_norm"),
    "warmup": ("train", "warmup"),
    "use_ema": ("train", "use_ema"),
    "ema_decay": ("train", "ema_decay"),
    "image_intv": ("train", "image_intv"),
    "num_samples": ("train", "num_samples"),
    "chkpt_intv": ("train", "chkpt_intv"),
    "log_intv": ("train", "log_intv"),
    "seed": ("train", "seed"),
    "precision": ("train", "precision"),
    "channels_last": ("train", "channels_last"),
    "compile": ("train", "compile"),
    "eval": ("eval", "enabled"),
    "eval_intv": ("eval", "intv"),
    "eval_total_size": ("eval", "total_size"),
    "eval_batch_size": ("eval", "batch_size"),
    "use_ddim": ("eval", "use_ddim"),
    "skip_schedule": ("eval", "skip_schedule"),
    "subseq_size": ("eval", "subseq_size"),
}


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def _bool_list(text: str) -> List[bool]:
    return [bool(v) for v in _int_list(text)]


def build_parser() -> argparse.ArgumentParser:
    p = CLIParser(
        prog="ddpmkit train",
        description="Train a DDPM on an image dataset (flags of the reference train.py). "
                    "Precedence: defaults < configs/<dataset>.json < typed flags.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=IMAGE_DATASETS, default="cifar10")
    g.add_argument("--root", default="~/datasets", help="root directory of datasets "
                   "(for --dataset folder: the image folder)")
    g.add_argument("--image-size", type=int, default=None,
                   help="image resolution (required for --dataset folder)")
    g.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: the dataset's)")
    g.add_argument("--split", default=None, help="dataset split to train on (default: the "
                   "dataset's training split; e.g. test for the MNIST test files)")
    g.add_argument("--download", action="store_true", help="download the dataset if missing")
    g.add_argument("--num-workers", type=int, default=4, help="data loader worker processes")

    g = p.add_argument_group("diffusion")
    g.add_argument("--timesteps", type=int, default=1000, help="number of diffusion steps")
    g.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default="linear")
    g.add_argument("--beta-start", type=float, default=0.0001)
    g.add_argument("--beta-end", type=float, default=0.02)
    g.add_argument("--model-mean-type", choices=MODEL_MEAN_TYPES, default="eps")
    g.add_argument("--model-var-type", choices=MODEL_VAR_TYPES, default="fixed-large")
    g.add_argument("--loss-type", choices=LOSS_TYPES, default="mse")

    g = p.add_argument_group("model (defaults come from the config file)")
    g.add_argument("--block-size", type=int, default=1, help="block size used for pixel shuffle")
    g.add_argument("--hid-channels", type=int, default=None, help="base channels")
    g.add_argument("--ch-multipliers", type=_int_list, default=None, help="e.g. 1,2,2,2")
    g.add_argument("--num-res-blocks", type=int, default=None)
    g.add_argument("--apply-attn", type=_bool_list, default=None,
                   help="attention per level, e.g. 0,1,0,0")
    g.add_argument("--drop-rate", type=float, default=None)
    g.add_argument("--group-norm-eps", type=float, default=None)

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=50, help="total number of training epochs")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer updates (overrides --epochs)")
    g.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    g.add_argument("--beta1", type=float, default=0.9, help="beta_1 in Adam")
    g.add_argument("--beta2", type=float, default=0.999, help="beta_2 in Adam")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--batch-size", type=int, default=128,
                   help="global batch: split across processes and accumulation steps")
    g.add_argument("--num-accum", type=int, default=1,
                   help="number of mini-batches before an update")
    g.add_argument("--grad-norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--warmup", type=int, default=5000, help="linear LR warmup steps")
    g.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=False,
                   help="whether to use exponential moving average (--no-use-ema turns off "
                   "a config's EMA)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="decay factor of ema")
    g.add_argument("--seed", type=int, default=1234, help="random seed")

    g = p.add_argument_group("speed")
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 autocast (CUDA, or CPUs with bf16 support); weights stay fp32")
    add_speed_flags(g, "model")

    g = p.add_argument_group("devices and distributed")
    g.add_argument("--train-device", "--device", dest="train_device", default="auto",
                   help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--eval-device", default="auto")
    g.add_argument("--distributed", action="store_true", help="whether to use distributed "
                   "training (also implied by torchrun)")
    g.add_argument("--rigid-launch", action="store_true",
                   help="spawn --num-gpus processes here instead of using torchrun")
    g.add_argument("--num-gpus", type=int, default=1, help="number of gpus for distributed "
                   "training (with --rigid-launch)")

    g = p.add_argument_group("outputs")
    g.add_argument("--exp-name", default=None, help="run name (default: the dataset name)")
    g.add_argument("--image-dir", default="./images/train")
    g.add_argument("--image-intv", type=int, default=10, help="epochs between sample grids")
    g.add_argument("--num-save-images", "--num-samples", dest="num_samples", type=int,
                   default=64, help="images in each sample grid")
    g.add_argument("--config-dir", default="./configs")
    g.add_argument("--config-path", default=None, help="JSON config (default: "
                   "<config-dir>/<dataset>.json, else the shipped one)")
    g.add_argument("--chkpt-dir", default="./chkpts")
    g.add_argument("--chkpt-name", default="", help="checkpoint file prefix "
                   "(default ddpm_<dataset>)")
    g.add_argument("--chkpt-intv", type=int, default=120, help="epochs between checkpoints")
    g.add_argument("--log-intv", type=int, default=50, help="steps between JSONL log lines")
    g.add_argument("--resume", action="store_true", help="resume from --chkpt-path, or the "
                   "newest checkpoint of the run")
    g.add_argument("--chkpt-path", default="", help="checkpoint to resume from")
    g.add_argument("--dry-run", action="store_true",
                   help="test-run till the first model update completes")

    g = p.add_argument_group("evaluation during training")
    g.add_argument("--eval", action="store_true", help="whether to evaluate fid during training")
    g.add_argument("--eval-intv", type=int, default=None,
                   help="epochs between evaluations (default: --chkpt-intv)")
    g.add_argument("--eval-total-size", type=int, default=50000)
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--use-ddim", action="store_true")
    g.add_argument("--skip-schedule", choices=SKIP_SCHEDULES, default="quadratic")
    g.add_argument("--subseq-size", type=int, default=50)
    g.add_argument("--inception-weights", default=None, help="path of the FID Inception weights")
    g.add_argument("--precomputed-dir", default="./precomputed")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


def builtin_defaults(parser: argparse.ArgumentParser) -> Dict[str, Dict[str, Any]]:
    """The parser's defaults, laid out as config sections (values that are None are left out)."""
    config: Dict[str, Dict[str, Any]] = {}
    for action in parser._actions:
        if action.dest in FLAG_TO_CONFIG and action.default is not None:
            section, key = FLAG_TO_CONFIG[action.dest]
            config.setdefault(section, {})[key] = action.default
    return config


def _file_config(args) -> Dict[str, Any]:
    """The JSON config for the run: --config-path, else the dataset's (folder: by image size)."""
    name = args.dataset
    if name == "folder" and not args.config_path:
        if not args.image_size:
            raise UserError("--dataset folder needs --image-size N (and optionally "
                            "--config-path FILE for the network)")
        by_size = {32: "cifar10", 64: "celeba", 256: "celebahq"}
        if args.image_size not in by_size:
            raise UserError(f"no shipped config for {args.image_size}x{args.image_size} images: "
                            "pass --config-path FILE (see configs/ for the schema)")
        name = by_size[args.image_size]
    path = find_config_file(name, args.config_path, args.config_dir)
    cfg = load_json(path)
    if isinstance(cfg.get("dataset"), str):  # the reference wrote "dataset": "cifar10"
        cfg["dataset"] = {"name": cfg["dataset"]}
    for section in ("dataset", "diffusion", "model", "train"):
        if not isinstance(cfg.get(section, {}), dict):
            raise UserError(f"config {path}: section {section!r} must be a JSON object")
    cfg.setdefault("dataset", {})["name"] = args.dataset
    if args.dataset == "folder":
        cfg["dataset"]["resolution"] = args.image_size
        cfg["dataset"].setdefault("channels", 3)
    cfg["config_file"] = os.path.abspath(path)
    return cfg


def resolve_config(args: argparse.Namespace, typed: Set[str],
                   parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, Any]:
    """defaults < JSON < typed flags, as one nested dict (stored in every checkpoint)."""
    parser = parser or build_parser()
    config = deep_update(builtin_defaults(parser), _file_config(args))
    for dest in typed:
        if dest in FLAG_TO_CONFIG:
            section, key = FLAG_TO_CONFIG[dest]
            config.setdefault(section, {})[key] = getattr(args, dest)
    config["dataset"]["name"] = args.dataset
    config.setdefault("eval", {}).setdefault("intv", config["train"]["chkpt_intv"])
    config["run"] = {
        "exp_name": args.exp_name or args.dataset,
        "chkpt_name": args.chkpt_name or f"ddpm_{args.dataset}",
        "image_dir": args.image_dir,
        "chkpt_dir": args.chkpt_dir,
    }
    return config


# (section, key, lowest allowed value, whether the bound itself is allowed)
_NUMERIC_BOUNDS = [
    ("train", "lr", 0.0, False), ("train", "batch_size", 1, True), ("train", "num_accum", 1, True),
    ("train", "epochs", 1, True), ("train", "warmup", 0, True), ("train", "grad_norm", 0.0, True),
    ("train", "weight_decay", 0.0, True), ("train", "image_intv", 0, True),
    ("train", "chkpt_intv", 0, True), ("train", "num_samples", 0, True),
    ("train", "log_intv", 1, True), ("diffusion", "timesteps", 2, True),
    ("dataset", "num_workers", 0, True),
]
_NAMES = {"lr": "learning rate (--lr)"}


def validate_config(config: Dict[str, Any]) -> None:
    """Reject impossible values up front, with the flag to fix, before any work starts."""
    for section, key, low, inclusive in _NUMERIC_BOUNDS:
        value = config.get(section, {}).get(key)
        if value is None:
            continue
        ok = value >= low if inclusive else value > low
        if not ok:
            name = _NAMES.get(key, f"--{key.replace('_', '-')}")
            relation = ">=" if inclusive else ">"
            raise UserError(f"{name} must be {relation} {low}, got {value}")
    max_steps = config["train"].get("max_steps")
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {max_steps}")
    decay = config["train"].get("ema_decay")
    if config["train"].get("use_ema") and not 0.0 <= decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {decay}")


def run(args: argparse.Namespace, typed: Set[str], parser: argparse.ArgumentParser) -> int:
    from ddpmkit.training.images import launch

    config = resolve_config(args, typed, parser)
    validate_config(config)
    return launch(config, args)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()

    def body() -> int:
        args, typed = parse_with_explicit(parser, argv)
        setup_logging(args.verbose)
        return run(args, typed, parser)

    return run_guarded(body)
