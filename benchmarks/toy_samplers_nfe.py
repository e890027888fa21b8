"""Sample quality against network evaluations (NFE) for every sampler, on 2-D toy data: one
toy network trained once, every sampler from the same x_T at NFE 5 / 10 / 20 / 50 (CPU, a few
minutes).

    python benchmarks/toy_samplers_nfe.py --dataset gaussian25 --model-cache toy25.pt

Prints a Markdown table: per sampler and NFE budget, the NFE actually used (Heun costs two per
step but one on its last, so it gets the most steps that fit: 3, 5, 10, 25 steps for 5, 9, 19,
49), the share of points within 3 std of a mode, the histogram KL (with its estimator floor)
and the wall time. DDPM with all T steps is the reference row. Samplers in fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from toy_samplers import train

from ddpmkit.choices import SAMPLERS, SKIP_SCHEDULES
from ddpmkit.data.toy import make_toy_data, toy_generator, toy_mixture
from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule, make_sampler, sample
from ddpmkit.metrics.toy import ToyEvaluator
from ddpmkit.models.toy import ToyMLP

NFE_BUDGETS = (5, 10, 20, 50)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="gaussian25",
                   choices=("gaussian8", "gaussian25", "swissroll"))
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--train-steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-points", type=int, default=10000, help="samples per sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS[1:]), choices=SAMPLERS[1:])
    p.add_argument("--skip-schedule", default=None, choices=SKIP_SCHEDULES,
                   help="step spacing of every sampler (default: each sampler's own)")
    p.add_argument("--no-ddpm", action="store_true",
                   help="skip the reference row (DDPM, all T steps: most of the run time)")
    p.add_argument("--model-cache", default=None,
                   help="load the trained network from this file if it exists, else save it")
    return p.parse_args(argv)


def steps_for(name: str, nfe: int) -> int:
    """The most steps whose NFE fits the budget (Heun: 2 S - 1)."""
    return (nfe + 1) // 2 if name == "heun" else nfe


def network(args, diffusion) -> torch.nn.Module:
    if args.model_cache and os.path.isfile(args.model_cache):
        net = ToyMLP()
        net.load_state_dict(torch.load(args.model_cache, weights_only=True))
        return net.eval()
    start = time.perf_counter()
    net = train(args, diffusion)
    print(f"# trained {args.train_steps} steps in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    if args.model_cache:
        torch.save(net.state_dict(), args.model_cache)
    return net


def row(name, nfe, steps, evaluator, x, seconds) -> str:
    m = evaluator.evaluate(x)
    modes = f"{m['modes_covered']}/{m['num_modes']}" if "modes_covered" in m else "-"
    hq = f"{100 * m['high_quality']:.1f}" if "high_quality" in m else "-"
    return f"| {name} | {nfe} | {steps} | {hq} | {m['kl']:.3f} | {modes} | {seconds:.2f} |"


def main(argv=None) -> int:
    args = parse_args(argv)
    betas = get_beta_schedule("linear", args.timesteps, beta_start=1e-4, beta_end=0.02)
    diffusion = GaussianDiffusion(betas, decoder="continuous")
    net = network(args, diffusion)  # `sample` runs without autograd

    g = toy_generator(args.seed + 1)
    mixture = toy_mixture(args.dataset)
    evaluator = ToyEvaluator(make_toy_data(args.dataset, 50_000, g),
                             make_toy_data(args.dataset, args.num_points, g),
                             modes=None if mixture is None else mixture.modes,
                             std=None if mixture is None else mixture.std)
    x_T = torch.randn(args.num_points, 2, generator=g)

    rows = []
    runs = [] if args.no_ddpm else [("ddpm", (args.timesteps,))]
    for name, budgets in runs + [(s, NFE_BUDGETS) for s in args.samplers]:
        for budget in budgets:
            steps = None if name == "ddpm" else steps_for(name, budget)
            sampler = make_sampler(diffusion, name, steps=steps, skip_schedule=args.skip_schedule)
            start = time.perf_counter()
            x = sample(diffusion, net, sampler, x_T, generator=torch.Generator().manual_seed(2))
            rows.append(row(name, len(sampler.timesteps), steps or args.timesteps, evaluator, x,
                            time.perf_counter() - start))
        print(rows[-1], file=sys.stderr)

    print(f"{args.dataset}: {args.num_points:,} points from one x_T, T = {args.timesteps}, "
          f"{args.skip_schedule or 'default'} step spacing, histogram-KL floor "
          f"{evaluator.kl_floor:.3f}, torch threads {torch.get_num_threads()}\n")
    print("| sampler | NFE | steps | within 3 std (%) | KL | modes covered | wall time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
