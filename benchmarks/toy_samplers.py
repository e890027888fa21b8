"""Sampler quality against speed on 2-D toy data: DDIM and DPM-Solver++ at 10/20/50/100 steps
against DDPM's 1000, for one briefly trained toy network (CPU, a few minutes).

    python benchmarks/toy_samplers.py --dataset gaussian25 --out docs/assets/samplers_gaussian25.png

Prints a Markdown table (sampler, steps, wall time, histogram KL with its estimator floor,
modes covered, share of points within 3 std of a mode, width of the generated modes relative
to the true ones) and writes a figure with one scatter
panel per sampler and step count. Every sampler starts from the same x_T.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import toy_updates  # noqa: E402

from ddpmkit.data.toy import make_toy_data, toy_generator, toy_mixture
from ddpmkit.diffusion import (
    SKIP_SCHEDULES,
    GaussianDiffusion,
    get_beta_schedule,
    make_sampler,
    sample,
)
from ddpmkit.metrics.toy import ToyEvaluator
from ddpmkit.models.toy import ToyMLP
from ddpmkit.utils.images import write_file_atomic

STEP_COUNTS = (10, 20, 50, 100)
FAST_SAMPLERS = ("ddim", "dpm-solver++")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="gaussian25",
                   choices=("gaussian8", "gaussian25", "swissroll"))
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--train-steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-points", type=int, default=10000, help="samples per sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-schedule", default="default",
                   choices=("default",) + SKIP_SCHEDULES,
                   help="step spacing of ddim and dpm-solver++ (default: each sampler's own, "
                   "linear for ddim, time-quadratic for dpm-solver++)")
    p.add_argument("--model-cache", default=None,
                   help="load the trained network from this file if it exists, else save it")
    p.add_argument("--out", default=None, help="figure path (PNG)")
    return p.parse_args(argv)


def train(args, diffusion: GaussianDiffusion) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    net = ToyMLP()
    start = time.perf_counter()
    for step, loss in toy_updates(diffusion, net, args.dataset, args.batch_size, args.lr,
                                  args.train_steps, args.seed):
        if step % 1000 == 0:
            print(f"# step {step}: loss {loss:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return net.eval()


def mode_spread(points: torch.Tensor, modes: torch.Tensor, std: float) -> float:
    """RMS distance to the nearest mode of the points within 3 std of one, over its value for
    the true mixture (1: right width; below 1: modes drawn too narrow)."""
    d = torch.cdist(points.double(), modes.double()).min(dim=1).values
    near = d[d < 3 * std]
    # E[d^2 | d < 3 std] for a 2-D isotropic Gaussian: 2 std^2 (1 - (1 + a) e^-a) / (1 - e^-a),
    # a = 4.5, the truncated Rayleigh second moment.
    a = 4.5
    expected = 2 * std**2 * (1 - (1 + a) * math.exp(-a)) / (1 - math.exp(-a))
    return float((near.pow(2).mean() / expected).sqrt()) if len(near) else float("nan")


def figure_png(true_points, panels, value_range, suptitle: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    cols = 1 + len(STEP_COUNTS)
    fig = Figure(figsize=(2.3 * cols, 2.6 * 2 + 0.2), dpi=100)
    axes = fig.subplots(2, cols, sharex=True, sharey=True)
    for ax, (title, xy) in zip(axes.T.ravel(), [("true data", true_points), *panels]):
        xy = xy.numpy()
        ax.scatter(xy[:, 0], xy[:, 1], s=0.3, alpha=0.4, linewidths=0, rasterized=True,
                   color="tab:gray" if title == "true data" else "tab:blue")
        ax.set_title(title, fontsize=7.5)
        ax.set_xlim(*value_range[0])
        ax.set_ylim(*value_range[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def main(argv=None) -> int:
    args = parse_args(argv)
    betas = get_beta_schedule("linear", args.timesteps, beta_start=1e-4, beta_end=0.02)
    diffusion = GaussianDiffusion(betas, decoder="continuous")
    if args.model_cache and os.path.isfile(args.model_cache):
        net = ToyMLP()
        net.load_state_dict(torch.load(args.model_cache, weights_only=True))
        net.eval()
    else:
        net = train(args, diffusion)
        if args.model_cache:
            torch.save(net.state_dict(), args.model_cache)

    g = toy_generator(args.seed + 1)
    true_points = make_toy_data(args.dataset, 50_000, g)
    evaluator = ToyEvaluator.for_dataset(args.dataset, true_points,
                                         make_toy_data(args.dataset, args.num_points, g))
    x_T = torch.randn(args.num_points, 2, generator=g)
    mixture = toy_mixture(args.dataset)

    runs = [("ddpm", args.timesteps)] + [(s, n) for s in FAST_SAMPLERS for n in STEP_COUNTS]
    rows, results = [], {}
    for name, steps in runs:
        skip = None if args.skip_schedule == "default" else args.skip_schedule
        sampler = make_sampler(diffusion, name, steps=steps, skip_schedule=skip)
        start = time.perf_counter()
        x = sample(diffusion, net, sampler, x_T, generator=torch.Generator().manual_seed(2))
        seconds = time.perf_counter() - start
        metrics = evaluator.evaluate(x)
        results[(name, steps)] = (x, metrics)
        modes = (f"{metrics['modes_covered']}/{metrics['num_modes']}"
                 if "modes_covered" in metrics else "-")
        hq = f"{100 * metrics['high_quality']:.1f}" if "high_quality" in metrics else "-"
        spread = ("-" if mixture is None
                  else f"{mode_spread(x, mixture.modes, mixture.std):.2f}")
        rows.append(f"| {name} | {steps} | {seconds:.2f} | {metrics['kl']:.3f} | {modes} "
                    f"| {hq} | {spread} |")

    print(f"{args.dataset}: {args.num_points:,} points, T = {args.timesteps}, "
          f"{args.skip_schedule} step spacing, histogram-KL floor {evaluator.kl_floor:.3f}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| sampler | steps | wall time (s) | KL | modes covered | within 3 std (%) "
          "| mode width / true |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))

    if args.out:
        def title(name, steps):
            m = results[(name, steps)][1]
            extra = f", {m['modes_covered']}/{m['num_modes']}" if "modes_covered" in m else ""
            return f"{name} {steps} steps\nKL {m['kl']:.2f}{extra}"

        panels = [(title("ddpm", args.timesteps), results[("ddpm", args.timesteps)][0])]
        for steps in STEP_COUNTS:  # columns: step counts; rows: DDIM, DPM-Solver++
            panels += [(title(s, steps), results[(s, steps)][0]) for s in FAST_SAMPLERS]
        # figure_png walks the axes column by column: [true, ddpm], then (ddim, dpm) per count
        png = figure_png(true_points[:args.num_points], panels, evaluator.value_range,
                         f"{args.dataset}: {args.num_points:,} samples from one x_T, T = "
                         f"{args.timesteps}, {args.skip_schedule} step spacing for ddim and "
                         f"dpm-solver++ (KL: histogram KL, floor {evaluator.kl_floor:.2f})")
        write_file_atomic(args.out, png)
        print(f"\nwrote {args.out} ({len(png) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
