"""`ddpmkit eval` (and `python eval.py`): FID, precision/recall, KID and IS of a folder of samples.

Samples are the image files in `<eval-dir>/<folder-name>/` (or `--sample-folder PATH`). The
reference is the real dataset (`--dataset`, statistics cached in `--precomputed-dir`) or another
folder (`--ref-folder`). Results are printed and appended as one JSON line to `metrics.jsonl`
beside the sample folder. Class-conditional samples (a folder with `labels.csv`, as
`ddpmkit generate` writes it) are scored as a whole like any others; `--per-class` adds the FID
of each class against the dataset's images of that class.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from ddpmkit.choices import IMAGE_DATASETS
from ddpmkit.cli import (
    CLIParser,
    add_weights_flags,
    run_guarded,
    setup_logging,
    weights_choice,
)
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

METRIC_CHOICES = ("fid", "pr", "kid", "is", "bpd")
METRICS_FILE = "metrics.jsonl"
# what each result key is called when printed
LABELS = {"fid": "FID", "precision": "Precision", "recall": "Recall", "kid_mean": "KID",
          "kid_std": "KID std", "is_mean": "IS", "is_std": "IS std", "bpd": "bits/dim",
          "bpd_stderr": "bits/dim stderr", "prior_bpd": "prior bits/dim",
          "decoder_bpd": "decoder bits/dim", "num_images": "images"}


def build_parser() -> argparse.ArgumentParser:
    p = CLIParser(
        prog="ddpmkit eval",
        description="Evaluate generated images: FID, precision/recall, KID, Inception Score.")
    p.add_argument("--root", default="~/datasets", help="root directory of datasets")
    p.add_argument("--dataset", choices=IMAGE_DATASETS, default="cifar10",
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
    p.add_argument("--num-workers", type=int, default=None,
                   help="image-loading processes (default: up to 4, no more than the CPUs "
                        "available)")
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
                   help="seed of the sample subset and the precision/recall reference subset")
    p.add_argument("--rng-seed", type=int, default=2020,
                   help="seed of the KID subsets and the Inception Score shuffle "
                        "(torch-fidelity's --rng-seed, same default: same numbers)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (default: torch hub's checkpoint "
                        "folder, downloaded when missing)")
    p.add_argument("--tf32", action="store_true",
                   help="run Inception with TF32 tensor cores on CUDA (Ampere and newer): "
                        "faster, but features differ from the float32 reference, so the "
                        "numbers are not comparable with published ones (reference statistics "
                        "are cached separately)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile Inception with its weights frozen in (2.4x on a CPU; "
                        "features move by float32 rounding only; compiling takes a minute)")
    g = p.add_argument_group("bits/dim (--metrics bpd): the variational bound of a checkpoint")
    g.add_argument("--chkpt-path", default=None, help="model checkpoint (ours or the "
                   "reference project's), .safetensors file, diffusers folder or Hub id")
    g.add_argument("--config-path", default=None, help="JSON config for checkpoints that carry "
                   "none (default: configs/<dataset>.json)")
    add_weights_flags(g, "evaluate")
    g.add_argument("--bpd-split", default="test", help="dataset split to evaluate on")
    p.add_argument("--per-class", action="store_true",
                   help="also the FID of each class of class-conditional samples (their "
                        "labels.csv) against the --dataset images of that class")
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
    if args.num_workers is None:
        from ddpmkit.data.images import default_num_workers

        args.num_workers = default_num_workers()
    if args.num_workers < 0:
        raise UserError("--num-workers must be >= 0")
    if args.sample_folder and args.folder_name:
        raise UserError("give --sample-folder PATH or --folder-name NAME, not both")
    weights_choice(args)
    if args.per_class and args.ref_folder:
        raise UserError("--per-class compares each class with the --dataset images of that "
                        "class; a --ref-folder has no labels: drop one of them")


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
    from ddpmkit.runtime.devices import resolve_device

    return (resolve_device(args.model_device or args.device),
            resolve_device(args.eval_device or args.device))


def sample_folder_of(args: argparse.Namespace) -> str:
    if args.sample_folder:
        return os.path.expanduser(args.sample_folder)
    return os.path.join(os.path.expanduser(args.eval_dir), args.folder_name or args.dataset)


def sample_labels(folder: str, paths: list[str], dataset: str):
    """(label per sample path, {label: class name}) from the folder's labels.csv, checked
    against the reference dataset's class names."""
    from ddpmkit.data.images import CLASS_NAMES
    from ddpmkit.generation import LABELS_NAME, read_labels_file

    found = read_labels_file(folder)
    if found is None:
        raise UserError(f"--per-class needs the samples' labels: {folder} has no {LABELS_NAME} "
                        "(`ddpmkit generate` writes it for class-conditional models)")
    by_file, names = found
    missing = [os.path.basename(p) for p in paths if os.path.basename(p) not in by_file]
    if missing:
        raise UserError(f"{LABELS_NAME} in {folder} has no label for {len(missing)} sample(s), "
                        f"e.g. {missing[0]}")
    known = CLASS_NAMES.get(dataset)
    if known is None:
        raise UserError(f"--per-class needs a reference dataset with labels "
                        f"({', '.join(CLASS_NAMES)}), not {dataset}")
    wrong = [f"{k} is {v!r} there, {known[k]!r} in {dataset}" for k, v in sorted(names.items())
             if k >= len(known) or (v != str(k) and v != known[k])]
    if wrong:
        raise UserError(f"the samples' classes do not match {dataset}'s ({wrong[0]}): "
                        "per-class FID needs the classes the model was trained on")
    return [by_file[os.path.basename(p)] for p in paths], {k: known[k] for k in names}


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
                                       download=args.download, need_labels=args.per_class)
    except UserError as exc:
        raise UserError(f"{exc}; or pass --ref-folder PATH to compare with a folder of real "
                        "images") from exc


def bits_per_dim(args: argparse.Namespace, device, progress: bool) -> dict:
    """The DDPM bound in bits/dim of --chkpt-path on --dataset's --bpd-split."""
    import math

    from torch.utils.data import DataLoader, Subset

    from ddpmkit.build import build_diffusion
    from ddpmkit.config import architecture_config
    from ddpmkit.data.images import FolderOptions, build_dataset
    from ddpmkit.interop.sources import load_model_from_checkpoint
    from ddpmkit.metrics.bpd import dataset_bpd
    from ddpmkit.metrics.folder import choose_subset

    if not args.chkpt_path:
        raise UserError("--metrics bpd needs --chkpt-path FILE (the model to evaluate)")
    fallback = architecture_config(args.dataset, args.config_path, required=False)
    use_ema = weights_choice(args)
    model, config = load_model_from_checkpoint(args.chkpt_path, fallback, use_ema, device,
                                               group_norm_eps=args.group_norm_eps)
    diffusion = build_diffusion(config["diffusion"], decoder="discretized")
    data = config.get("dataset") or {}
    folder = FolderOptions.from_config(data) if args.dataset == "folder" else None
    dataset = build_dataset(args.dataset, args.root, split=args.bpd_split,
                            image_size=data.get("resolution"), random_flip=False,
                            download=args.download, folder=folder)
    subset = choose_subset(len(dataset), args.eval_total_size, args.seed)
    if subset is not None:
        dataset = Subset(dataset, subset.tolist())
    loader = DataLoader(dataset, batch_size=args.eval_batch_size, shuffle=False,
                        num_workers=args.num_workers)
    images = (batch[0] for batch in loader)
    logger.info("bits/dim of %s on %d images of %s/%s (%d network calls per image)",
                args.chkpt_path, len(dataset), args.dataset, args.bpd_split, diffusion.T)
    summary = dataset_bpd(diffusion, model, images, device, seed=args.seed, progress=progress,
                          total=math.ceil(len(dataset) / args.eval_batch_size))
    return summary._asdict()


def metrics_path_of(args: argparse.Namespace, sample_folder: str | None) -> str:
    """Where the results are appended: beside the sample folder; for bits/dim alone, beside
    the checkpoint (a Hub id: the working folder, not inside the Hugging Face cache)."""
    if sample_folder:
        return os.path.join(os.path.dirname(os.path.abspath(sample_folder)), METRICS_FILE)
    if os.path.exists(os.path.expanduser(args.chkpt_path or "")):
        return os.path.join(
            os.path.dirname(os.path.abspath(os.path.expanduser(args.chkpt_path))), METRICS_FILE)
    return os.path.abspath(METRICS_FILE)


def check_outputs(args: argparse.Namespace, metrics: list[str]) -> None:
    """Before any work: the folder of the metrics file can be written, and so can
    --precomputed-dir when the dataset's statistics will be cached there for the first time."""
    from ddpmkit.metrics.evaluate import NEEDS_REFERENCE
    from ddpmkit.utils.io import check_writable_folder

    only_bpd = set(metrics) == {"bpd"}
    path = metrics_path_of(args, None if only_bpd else sample_folder_of(args))
    check_writable_folder(os.path.dirname(path), f"{METRICS_FILE} folder")
    needs_stats = (NEEDS_REFERENCE.intersection(metrics) or args.per_class) \
        and not args.ref_folder
    precomputed = os.path.expanduser(args.precomputed_dir)
    if needs_stats and not os.path.isdir(precomputed):
        check_writable_folder(precomputed, "--precomputed-dir")


def evaluate(args: argparse.Namespace) -> int:
    from ddpmkit.metrics.evaluate import NEEDS_REFERENCE, compute_metrics, per_class_fid
    from ddpmkit.metrics.folder import folder_batches
    from ddpmkit.metrics.inception import extract_features, load_fid_inception

    _check_args(args)
    check_outputs(args, list(args.metrics))
    model_device, eval_device = devices_of(args)
    if args.tf32 and model_device.type != "cuda":
        raise UserError(f"--tf32 needs Inception on a CUDA GPU (Ampere or newer), not "
                        f"{model_device}; drop --tf32 or pass --model-device cuda")
    progress = sys.stderr.isatty()
    metrics = list(dict.fromkeys(args.metrics))
    results: dict = {}
    if "bpd" in metrics:
        metrics.remove("bpd")
        results.update(bits_per_dim(args, model_device, progress))
        if not metrics:
            return _report(args, results, None, None, None, None)

    sample_folder = sample_folder_of(args)
    loader = folder_batches(sample_folder, args.eval_batch_size, args.num_workers,
                            max_images=args.eval_total_size, seed=args.seed)
    labels = names = None
    if args.per_class:  # before any work: missing or mismatched labels fail fast
        labels, names = sample_labels(sample_folder, loader.dataset.paths, args.dataset)
    model = load_fid_inception(args.inception_weights, model_device, tf32=args.tf32,
                               compile=args.compile)
    ref = None
    if NEEDS_REFERENCE.intersection(metrics) or args.per_class:  # a missing reference fails fast
        ref = reference_stats(args, model, progress)
        sample_size = tuple(loader.dataset[0].shape[-2:])
        if tuple(ref.image_size) != sample_size:
            logger.info("samples are %dx%d, reference images %dx%d: both are resized to "
                        "299x299 for Inception", *sample_size, *ref.image_size)
    _check_counts(args, metrics, len(loader.dataset), ref.num_images if ref else None)
    logger.info("Inception features of %d samples in %s", len(loader.dataset), sample_folder)
    features = extract_features(model, loader, progress=progress, total=len(loader))
    results.update(compute_metrics(
        features, ref, metrics, nhood_size=args.nhood_size,
        row_batch_size=args.row_batch_size, col_batch_size=args.col_batch_size,
        pr_reference_size=args.eval_total_size, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, is_splits=args.is_splits, seed=args.seed,
        rng_seed=args.rng_seed, device=eval_device))
    if args.per_class:
        results.update(per_class_fid(features.pool, labels, ref))
    return _report(args, results, sample_folder, features.num_images, ref, model.identity,
                   names)


def _checkpoint_name(spec: str | None) -> str | None:
    """An absolute path for a local checkpoint, the id itself for a Hub id."""
    if not spec:
        return None
    path = os.path.expanduser(spec)
    return os.path.abspath(path) if os.path.exists(path) else spec


def _label(key: str, class_names: dict | None) -> str:
    """How a result is called when printed ("FID class 3 (cat)" for fid_class_3)."""
    if key == "fid_class_mean":
        return "FID per class, mean"
    if key.startswith("fid_class_"):
        k = int(key.rsplit("_", 1)[1])
        return f"FID class {k}" + (f" ({class_names[k]})" if class_names else "")
    return LABELS.get(key, key)


def _report(args, results, sample_folder, num_samples, ref, extractor,
            class_names: dict | None = None) -> int:
    """Print the results and append them as one JSON line to the metrics file."""
    for key, value in results.items():
        print(f"{_label(key, class_names)}: {value:.6g}")
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "folder_name": os.path.basename(os.path.normpath(sample_folder)) if sample_folder
        else None,
        "sample_folder": os.path.abspath(sample_folder) if sample_folder else None,
        "num_samples": num_samples,
        "reference": ref.source if ref is not None else None,
        "num_reference": ref.num_images if ref is not None else None,
        "extractor": extractor,
        "checkpoint": _checkpoint_name(args.chkpt_path),
        "metrics": results,
    }
    metrics_path = metrics_path_of(args, sample_folder)
    try:
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {metrics_path}: {exc.strerror or exc}; the results "
                        "are printed above") from exc
    print(f"appended to {metrics_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_guarded(lambda: evaluate(build_parser().parse_args(argv)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
