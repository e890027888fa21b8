"""`ddpmkit eval` (and `python eval.py`): FID, precision/recall, KID and IS of a folder of samples.

Samples are the image files in `<eval-dir>/<folder-name>/` (or `--sample-folder PATH`). The
reference is the real dataset (`--dataset`, statistics cached in `--precomputed-dir`) or another
folder (`--ref-folder`). Results are printed and appended as one JSON line to `metrics.jsonl`
beside the sample folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from ddpmkit.cli import run_guarded, setup_logging
from ddpmkit.devices import resolve_device
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "cifar10", "celeba", "celebahq")
METRIC_CHOICES = ("fid", "pr", "kid", "is")
METRICS_FILE = "metrics.jsonl"
# what each result key is called when printed
LABELS = {"fid": "FID", "precision": "Precision", "recall": "Recall", "kid_mean": "KID",
          "kid_std": "KID std", "is_mean": "IS", "is_std": "IS std"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddpmkit eval",
        description="Evaluate generated images: FID, precision/recall, KID, Inception Score.")
    p.add_argument("--root", default="~/datasets", help="root directory of datasets")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10",
                   help="reference dataset (also the default sample folder name)")
    p.add_argument("--ref-split", default="train",
                   help="split of --dataset used as the reference set")
    p.add_argument("--download", action="store_true",
                   help="download the reference dataset with torchvision when it is missing")
    p.add_argument("--ref-folder", default=None, metavar="PATH",
                   help="a folder of real images to use as the reference instead of --dataset "
                        "(not cached)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--model-device", default=None,
                   help="device of the Inception network (default: --device)")
    p.add_argument("--eval-device", default=None,
                   help="device of the distance and kernel computations (default: --device)")
    p.add_argument("--eval-batch-size", type=int, default=512,
                   help="images per Inception batch")
    p.add_argument("--eval-total-size", type=int, default=50000,
                   help="evaluate at most this many samples (a fixed-seed random subset); also "
                        "the largest reference set used for precision/recall")
    p.add_argument("--num-workers", type=int, default=4, help="image-loading processes")
    p.add_argument("--nhood-size", type=int, default=3,
                   help="k of the k-nearest-neighbour balls of precision/recall")
    p.add_argument("--row-batch-size", type=int, default=10000,
                   help="rows of each distance block of precision/recall")
    p.add_argument("--col-batch-size", type=int, default=10000,
                   help="columns of each distance block of precision/recall")
    p.add_argument("--eval-dir", default="./images/eval",
                   help="folder holding the sample folders")
    p.add_argument("--folder-name", default=None,
                   help="sample folder inside --eval-dir (default: the dataset name)")
    p.add_argument("--sample-folder", default=None, metavar="PATH",
                   help="the sample folder itself (instead of --eval-dir/--folder-name)")
    p.add_argument("--precomputed-dir", default="./precomputed",
                   help="cache of reference statistics")
    p.add_argument("--metrics", nargs="+", choices=METRIC_CHOICES, default=["fid", "pr"],
                   help="metrics to compute")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed of the sample subset, the precision/recall reference subset and "
                        "the KID subsets")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (default: torch hub's checkpoint "
                        "folder, downloaded when missing)")
    p.add_argument("--kid-subsets", type=int, default=100, help="number of KID subsets")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="images per KID subset")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("eval_batch_size", "eval_total_size", "nhood_size", "row_batch_size",
                 "col_batch_size", "kid_subsets", "is_splits"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.kid_subset_size < 2:
        raise UserError("--kid-subset-size must be >= 2")
    if args.num_workers < 0:
        raise UserError("--num-workers must be >= 0")
    if args.sample_folder and args.folder_name:
        raise UserError("give --sample-folder PATH or --folder-name NAME, not both")


def _check_counts(args: argparse.Namespace, metrics: list[str], num_samples: int,
                  num_reference: int | None) -> None:
    """Enough images for the requested metrics (checked before the long feature extraction)."""
    if "pr" in metrics:
        pr_sets = [("samples", num_samples),
                   ("reference images", min(num_reference, args.eval_total_size))]
        for name, count in pr_sets:
            if count <= args.nhood_size:
                raise UserError(f"precision/recall with --nhood-size {args.nhood_size} needs "
                                f"more than {args.nhood_size} {name}, got {count}")
    if "kid" in metrics:
        for name, count in (("samples", num_samples), ("reference images", num_reference)):
            if count < args.kid_subset_size:
                raise UserError(f"KID needs at least --kid-subset-size ({args.kid_subset_size}) "
                                f"{name}, got {count}: lower --kid-subset-size")
    if "is" in metrics and num_samples < args.is_splits:
        raise UserError(f"the Inception Score needs at least --is-splits ({args.is_splits}) "
                        f"samples, got {num_samples}")


def devices_of(args: argparse.Namespace):
    """(Inception device, distance/kernel device): --model-device / --eval-device, else --device."""
    return (resolve_device(args.model_device or args.device),
            resolve_device(args.eval_device or args.device))


def sample_folder_of(args: argparse.Namespace) -> str:
    if args.sample_folder:
        return os.path.expanduser(args.sample_folder)
    return os.path.join(os.path.expanduser(args.eval_dir), args.folder_name or args.dataset)


def reference_stats(args: argparse.Namespace, model, progress: bool):
    from ddpmkit.metrics.folder import folder_batches
    from ddpmkit.metrics.stats import compute_reference_stats, dataset_reference_stats

    if args.ref_folder:
        folder = os.path.expanduser(args.ref_folder)
        loader = folder_batches(folder, args.eval_batch_size, args.num_workers)
        return compute_reference_stats(model, loader, f"folder:{os.path.abspath(folder)}",
                                       progress=progress, total=len(loader))
    try:
        return dataset_reference_stats(model, args.dataset, args.root, args.precomputed_dir,
                                       split=args.ref_split, batch_size=args.eval_batch_size,
                                       num_workers=args.num_workers, progress=progress,
                                       download=args.download)
    except UserError as exc:
        raise UserError(f"{exc}; or pass --ref-folder PATH to compare with a folder of real "
                        "images") from exc


def evaluate(args: argparse.Namespace) -> int:
    from ddpmkit.metrics.evaluate import NEEDS_REFERENCE, compute_metrics
    from ddpmkit.metrics.folder import folder_batches
    from ddpmkit.metrics.inception import extract_features, load_fid_inception

    _check_args(args)
    model_device, eval_device = devices_of(args)
    progress = sys.stderr.isatty()
    metrics = list(dict.fromkeys(args.metrics))

    sample_folder = sample_folder_of(args)
    loader = folder_batches(sample_folder, args.eval_batch_size, args.num_workers,
                            max_images=args.eval_total_size, seed=args.seed)
    model = load_fid_inception(args.inception_weights, model_device)
    ref = None
    if NEEDS_REFERENCE.intersection(metrics):  # first: a missing reference fails fast
        ref = reference_stats(args, model, progress)
        sample_size = tuple(loader.dataset[0].shape[-2:])
        if tuple(ref.image_size) != sample_size:
            logger.info("samples are %dx%d, reference images %dx%d: both are resized to "
                        "299x299 for Inception", *sample_size, *ref.image_size)
    _check_counts(args, metrics, len(loader.dataset), ref.num_images if ref else None)
    logger.info("Inception features of %d samples in %s", len(loader.dataset), sample_folder)
    features = extract_features(model, loader, progress=progress, total=len(loader))
    results = compute_metrics(
        features, ref, metrics, nhood_size=args.nhood_size,
        row_batch_size=args.row_batch_size, col_batch_size=args.col_batch_size,
        pr_reference_size=args.eval_total_size, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, is_splits=args.is_splits, seed=args.seed,
        device=eval_device)

    for key, value in results.items():
        print(f"{LABELS[key]}: {value:.6g}")
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "folder_name": os.path.basename(os.path.normpath(sample_folder)),
        "sample_folder": os.path.abspath(sample_folder),
        "num_samples": features.num_images,
        "reference": ref.source if ref is not None else None,
        "num_reference": ref.num_images if ref is not None else None,
        "extractor": model.identity,
        "metrics": results,
    }
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(sample_folder)), METRICS_FILE)
    with open(metrics_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {metrics_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_guarded(lambda: evaluate(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
