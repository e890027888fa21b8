"""Classifier-free guidance on 2-D toy data: the share of samples on the mode they ask for, over
the guidance scale w, for one class-conditional toy model (CPU, minutes).

    python benchmarks/toy_guidance.py --chkpt-path chkpts/ddpm_gaussian25_100.pt
    python benchmarks/toy_guidance.py -- --dataset gaussian25 --recipe sharp --epochs 30

With `--chkpt-path` it scores that `train-toy --class-cond` checkpoint (EMA weights when it
has them, unless `--raw-weights`); otherwise it first trains one with the `train-toy` flags
given after `--` (plus `--class-cond`). Prints a Markdown table: w, share of points within
3 std of the requested mode (overall and for the worst mode), share within 3 std of any mode,
modes covered and the histogram KL of all points against the mixture (point i asks for mode
i mod K, so all points together should follow the mixture).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import torch

DEFAULT_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chkpt-path", default=None, help="a train-toy --class-cond checkpoint")
    p.add_argument("--scales", default=",".join(f"{w:g}" for w in DEFAULT_SCALES),
                   help="guidance scales to score, comma-separated")
    p.add_argument("--num-points", type=int, default=10000, help="samples per scale")
    p.add_argument("--sampler", default=None, help="sampler (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps")
    p.add_argument("--raw-weights", action="store_true",
                   help="score the trained weights, not the EMA ones")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv), train_flags


def train(flags: list[str]) -> str:
    """Run `train-toy --class-cond FLAGS`; returns its final checkpoint."""
    from ddpmkit.cli.train_toy import resolve_config
    from ddpmkit.recipes.toy import train_toy

    c = resolve_config([*flags, "--class-cond", "--no-progress", "--animation-format", "none"])
    start = time.perf_counter()
    if train_toy(c, report=lambda line: print(f"# {line}", file=sys.stderr)) != 0:
        raise SystemExit("training stopped")
    print(f"# trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    files = glob.glob(os.path.join(os.path.expanduser(c["chkpt_dir"]),
                                   f"ddpm_{c['dataset']}_[0-9]*.pt"))
    return max(files, key=os.path.getmtime)


def main(argv=None) -> None:
    from ddpmkit.build import build_diffusion
    from ddpmkit.training.toy import DECODER, ToyEvaluation, guidance_curve, load_toy_model

    args, train_flags = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.chkpt_path or train(train_flags)
    model, c = load_toy_model(path, use_ema=not args.raw_weights)
    if not c.get("class_cond"):
        raise SystemExit(f"{path} is not class-conditional (train it with --class-cond)")
    c = {**c, "sampler": args.sampler or c["sampler"], "steps": args.steps or c["steps"]}
    evaluation = ToyEvaluation(c, build_diffusion(c, DECODER), torch.device("cpu"), image_dir="")
    scales = [float(w) for w in args.scales.split(",")]
    start = time.perf_counter()
    rows = guidance_curve(evaluation, model, scales, args.num_points)
    print(f"# {path}: {c['dataset']}, sampler {c['sampler']}, {args.num_points} points per "
          f"scale, {time.perf_counter() - start:.0f} s")
    print("| w | on the requested mode | worst mode | within 3 std of any mode | modes covered "
          "| histogram KL (floor) |")
    print("|---:|---:|---:|---:|---:|---:|")
    floor = evaluation.floor(args.num_points)
    for m in rows:
        print(f"| {m['guidance_scale']:g} | {100 * m['on_requested_mode']:.1f}% | "
              f"{100 * m['worst_requested_mode']:.1f}% | {100 * m['high_quality']:.1f}% | "
              f"{m['modes_covered']}/{m['num_modes']} | {m['kl']:.3f} ({floor:.3f}) |")


if __name__ == "__main__":
    main()
