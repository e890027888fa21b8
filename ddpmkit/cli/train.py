"""`ddpmkit train` (and `python train.py`): train a DDPM on images.

Flags keep the reference project's names. Config precedence: built-in defaults < the dataset's
JSON config (configs/<dataset>.json, or --config-path) < flags typed on the command line. Every
config key is described, typed and bounded in `ddpmkit.config.schema`; files and flags are checked
against it before anything runs or is written. This module imports no torch: the work is done
by `ddpmkit.training.images.launch`.
"""

import argparse
import json
import logging
import os
from typing import Any, Dict, List, Optional, Set

from ddpmkit.choices import (
    BETA_SCHEDULES,
    IMAGE_DATASETS,
    LOSS_TYPES,
    MODEL_MEAN_TYPES,
    MODEL_VAR_TYPES,
    PRECISIONS,
    RESIZE_MODES,
    SAMPLERS,
    SKIP_SCHEDULES,
)
from ddpmkit.cli import (
    CLIParser,
    add_objective_flags,
    add_speed_flags,
    run_guarded,
    setup_logging,
)
from ddpmkit.config import PACKAGE_CONFIG_DIR, parse_with_explicit, schema
from ddpmkit.config.facts import elastic_restart
from ddpmkit.config.resolve import (  # noqa: F401 (validate_config: the checks' public name)
    OPTION_KEYS,
    resolve_image_dict,
    resolve_image_run,
    validate_config,
)
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

# dest of a flag -> (config section, key): the resolver's option names are the flags' dests.
FLAG_TO_CONFIG = OPTION_KEYS


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def _image_size(text: str):
    try:
        return schema.parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected S or H,W (positive integers, e.g. 32 or 16,32), got {text!r}") from None


def _bool_list(text: str) -> List[bool]:
    return [bool(v) for v in _int_list(text)]


def _d(section: str, key: str) -> Any:
    """The schema's built-in default of a key (the one place defaults are written)."""
    return schema.SCHEMA[section][key].default


def build_parser() -> argparse.ArgumentParser:
    p = CLIParser(
        prog="ddpmkit train",
        description="Train a DDPM on an image dataset (flags of the reference train.py). "
                    "Precedence: defaults < configs/<dataset>.json < typed flags; the config "
                    "keys are listed in the README.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=IMAGE_DATASETS, default=None,
                   help="dataset (default: the config file's, else cifar10)")
    g.add_argument("--root", default=_d("dataset", "root"), help="root directory of datasets "
                   "(for --dataset folder: the image folder)")
    g.add_argument("--image-size", type=_image_size, default=None,
                   help="image size S (square) or H,W (default: the dataset's; required for "
                        "folder)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="folder: model channels (default: 1 when every image is grayscale, "
                        "else 3; stated in the log)")
    g.add_argument("--resize-mode", choices=RESIZE_MODES, default=_d("dataset", "resize_mode"),
                   help="folder: center-crop (largest centred crop of the size's aspect, then "
                        "resize), resize (stretch) or pad (fit, black bars)")
    g.add_argument("--strict-images", action="store_true",
                   help="folder: refuse files that cannot be decoded instead of naming and "
                        "skipping them")
    g.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: the dataset's)")
    g.add_argument("--split", default=None, help="dataset split to train on (default: the "
                   "dataset's training split; e.g. test for the MNIST test files)")
    g.add_argument("--download", action="store_true", help="download the dataset if missing")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data loader worker processes (default: up to 4, no more than the "
                        "CPUs available)")

    g = p.add_argument_group("diffusion")
    g.add_argument("--timesteps", type=int, default=_d("diffusion", "timesteps"),
                   help="number of diffusion steps")
    g.add_argument("--beta-schedule", choices=BETA_SCHEDULES,
                   default=_d("diffusion", "beta_schedule"))
    g.add_argument("--beta-start", type=float, default=_d("diffusion", "beta_start"))
    g.add_argument("--beta-end", type=float, default=_d("diffusion", "beta_end"))
    g.add_argument("--model-mean-type", choices=MODEL_MEAN_TYPES,
                   default=_d("diffusion", "model_mean_type"))
    g.add_argument("--model-var-type", choices=MODEL_VAR_TYPES,
                   default=_d("diffusion", "model_var_type"))
    g.add_argument("--loss-type", choices=LOSS_TYPES, default=_d("diffusion", "loss_type"))
    add_objective_flags(g, _d("diffusion", "loss_weight"), _d("diffusion", "min_snr_gamma"),
                        _d("diffusion", "zero_terminal_snr"))

    g = p.add_argument_group("model (defaults come from the config file)")
    g.add_argument("--block-size", type=int, default=_d("model", "block_size"),
                   help="block size used for pixel shuffle")
    g.add_argument("--hid-channels", type=int, default=None, help="base channels")
    g.add_argument("--ch-multipliers", type=_int_list, default=None, help="e.g. 1,2,2,2")
    g.add_argument("--num-res-blocks", type=int, default=None)
    g.add_argument("--apply-attn", type=_bool_list, default=None,
                   help="attention per level, e.g. 0,1,0,0")
    g.add_argument("--drop-rate", type=float, default=None)
    g.add_argument("--group-norm-eps", type=float, default=None)

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=_d("train", "epochs"),
                   help="total number of training epochs")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer updates (overrides --epochs)")
    g.add_argument("--lr", type=float, default=_d("train", "lr"), help="learning rate")
    g.add_argument("--beta1", type=float, default=_d("train", "beta1"), help="beta_1 in Adam")
    g.add_argument("--beta2", type=float, default=_d("train", "beta2"), help="beta_2 in Adam")
    g.add_argument("--weight-decay", type=float, default=_d("train", "weight_decay"),
                   help="AdamW weight decay")
    g.add_argument("--batch-size", type=int, default=_d("train", "batch_size"),
                   help="global batch: split across processes and accumulation steps")
    g.add_argument("--num-accum", type=int, default=_d("train", "num_accum"),
                   help="number of mini-batches before an update")
    g.add_argument("--grad-norm", type=float, default=_d("train", "grad_norm"),
                   help="gradient clipping norm (0: off)")
    g.add_argument("--warmup", type=int, default=_d("train", "warmup"),
                   help="linear LR warmup steps")
    g.add_argument("--use-ema", action=argparse.BooleanOptionalAction,
                   default=_d("train", "use_ema"), help="whether to use exponential moving "
                   "average (--no-use-ema turns off a config's EMA)")
    g.add_argument("--ema-decay", type=float, default=_d("train", "ema_decay"),
                   help="decay factor of ema")
    g.add_argument("--seed", type=int, default=_d("train", "seed"), help="random seed")
    g.add_argument("--class-cond", action=argparse.BooleanOptionalAction,
                   default=_d("train", "class_cond"),
                   help="train a class-conditional model on the dataset's labels (mnist, "
                        "cifar10; folder: one class per subfolder), for classifier-free "
                        "guidance")
    g.add_argument("--class-dropout", type=float, default=_d("train", "class_dropout"),
                   help="with --class-cond: probability that a label is replaced by \"no "
                        "class\"")

    g = p.add_argument_group("speed")
    g.add_argument("--precision", choices=PRECISIONS, default=_d("train", "precision"),
                   help="bf16: autocast (weights stay fp32); fp16: autocast with dynamic "
                        "loss scaling, updates with inf/NaN gradients skipped and counted; "
                        "auto: bf16 on GPUs that support it and on CPUs with native bf16 "
                        "(AVX512_BF16, AMX), fp16 on older GPUs (compute capability below "
                        "8.0), else fp32 (bf16 is emulated there, 3-100x slower)")
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
                   "training (with --rigid-launch; CPU processes need --train-device cpu)")

    _add_output_flags(p)
    _add_eval_flags(p)
    _annotate_config_defaults(p)
    return p


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("outputs, checkpoints and resuming")
    g.add_argument("--exp-name", default=None, help="run name (default: the dataset name)")
    g.add_argument("--image-dir", default="./images/train")
    g.add_argument("--image-intv", type=int, default=_d("train", "image_intv"),
                   help="epochs between sample grids")
    g.add_argument("--num-save-images", "--num-samples", dest="num_samples", type=int,
                   default=_d("train", "num_samples"), help="images in each sample grid")
    g.add_argument("--config-dir", default="./configs")
    g.add_argument("--config-path", default=None, help="JSON config (default: "
                   "<config-dir>/<dataset>.json, else the shipped one)")
    g.add_argument("--chkpt-dir", default="./chkpts")
    g.add_argument("--chkpt-name", default="", help="checkpoint file prefix "
                   "(default ddpm_<dataset>)")
    g.add_argument("--chkpt-intv", type=int, default=_d("train", "chkpt_intv"),
                   help="epochs between permanent checkpoints")
    g.add_argument("--chkpt-every-minutes", type=float,
                   default=_d("train", "chkpt_every_minutes"),
                   help="minutes between rolling checkpoints of the latest state (the last "
                        "two are kept; 0: off)")
    g.add_argument("--chkpt-every-steps", type=int, default=_d("train", "chkpt_every_steps"),
                   help="updates between rolling checkpoints (0: off)")
    g.add_argument("--log-intv", type=int, default=_d("train", "log_intv"),
                   help="steps between JSONL log lines")
    g.add_argument("--resume", action="store_true", help="continue the run from --chkpt-path, "
                   "or from the checkpoint of its folder with the highest step")
    g.add_argument("--auto-resume", action="store_true",
                   help="resume when the run folder holds a checkpoint, else start fresh (for "
                        "jobs that a cluster requeues)")
    g.add_argument("--chkpt-path", default="", help="checkpoint to resume from (with --resume)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a folder that holds another run's checkpoints "
                        "(they are deleted once the new run has made its first update)")
    g.add_argument("--dry-run", action="store_true",
                   help="test-run till the first model update completes")
    g.add_argument("-v", "--verbose", action="store_true")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation during training")
    g.add_argument("--eval", action="store_true", help="whether to evaluate fid during training")
    g.add_argument("--eval-intv", type=int, default=None,
                   help="epochs between evaluations (default: --chkpt-intv)")
    g.add_argument("--eval-total-size", type=int, default=_d("eval", "total_size"))
    g.add_argument("--eval-batch-size", type=int, default=_d("eval", "batch_size"))
    g.add_argument("--use-ddim", action="store_true")
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="sampler of the sample grids and FID evaluations (default: ddim with "
                        "--use-ddim, else ddpm); --subseq-size gives its steps")
    g.add_argument("--skip-schedule", choices=SKIP_SCHEDULES, default=_d("eval", "skip_schedule"))
    g.add_argument("--subseq-size", type=int, default=_d("eval", "subseq_size"))
    g.add_argument("--guidance-scale", type=float, default=_d("eval", "guidance_scale"),
                   help="with --class-cond: guidance scale w of the sample grids and FID "
                        "evaluations")
    g.add_argument("--inception-weights", default=None, help="path of the FID Inception weights")
    g.add_argument("--precomputed-dir", default="./precomputed")


def _shipped_values() -> Dict[str, Dict[str, Dict[str, Any]]]:
    """{dataset: its shipped config} (json only: cheap enough for every parser build)."""
    out = {}
    for name in IMAGE_DATASETS:
        path = os.path.join(PACKAGE_CONFIG_DIR, f"{name}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out[name] = json.load(f)
    return out


def _annotate_config_defaults(p: argparse.ArgumentParser) -> None:
    """Say in --help which flags a dataset's config file sets, and to what."""
    shipped = _shipped_values()
    for action in p._actions:  # argparse has no public iterator over its actions
        where = FLAG_TO_CONFIG.get(action.dest)
        if where is None or where == ("dataset", "name"):
            continue
        section, key = where
        values = {name: cfg.get(section, {}).get(key) for name, cfg in shipped.items()}
        values = {n: v for n, v in values.items() if v is not None and v != action.default}
        if values:
            listed = ", ".join(f"{n} {json.dumps(v).replace(' ', '')}" for n, v in values.items())
            action.help = (action.help + "; " if action.help else "") + \
                f"configs/<dataset>.json sets: {listed}"


# ---- config resolution (in `ddpmkit.config.resolve`: plain values, no Namespace) ---------
def resolve_config(args: argparse.Namespace, typed: Set[str],
                   parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, Any]:
    """defaults < JSON < typed flags, as one nested dict (dataset facts not yet completed)."""
    return resolve_image_dict(vars(args), typed)


def launch_options(args: argparse.Namespace) -> Dict[str, Any]:
    """What the launch needs besides the config, as plain values."""
    if args.chkpt_path and not args.resume:
        raise UserError("--chkpt-path names the checkpoint to resume from: add --resume, or "
                        "drop --chkpt-path to start a new run")
    if (args.resume or args.auto_resume) and args.overwrite:
        raise UserError("--resume continues the run; --overwrite replaces it: pick one")
    return {
        "train_device": args.train_device, "eval_device": args.eval_device,
        "distributed": bool(args.distributed), "rigid_launch": bool(args.rigid_launch),
        "num_gpus": int(args.num_gpus), "resume": bool(args.resume),
        "auto_resume": bool(args.auto_resume),
        "chkpt_path": os.path.expanduser(args.chkpt_path) if args.chkpt_path else None,
        "dry_run": bool(args.dry_run), "overwrite": bool(args.overwrite),
        "inception_weights": args.inception_weights, "precomputed_dir": args.precomputed_dir,
        "verbose": bool(args.verbose),
    }


def run(args: argparse.Namespace, typed: Set[str], parser: argparse.ArgumentParser) -> int:
    options = launch_options(args)
    if args.num_gpus < 1:
        raise UserError(f"--num-gpus must be at least 1, got {args.num_gpus}")
    resuming = bool(args.resume or args.auto_resume or elastic_restart())
    config = resolve_image_run(vars(args), typed, resuming=resuming)
    from ddpmkit.recipes.image import launch

    return launch(config, options)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()

    def body() -> int:
        args, typed = parse_with_explicit(parser, argv)
        setup_logging(args.verbose)
        return run(args, typed, parser)

    return run_guarded(body)
