"""Sample quality against network evaluations (NFE) for every sampler, on a class-conditional
MNIST model: the same samples from every sampler at NFE 10 and 20, scored by the digit
classifier of mnist_guidance.py (CPU, minutes).

    python benchmarks/mnist_samplers.py --chkpt-path chkpts/mnist/ddpm_mnist_8.pt \
        --root ~/datasets --num-samples 200

Sample i starts from the noise of (seed, i) (its step noise too) and asks for digit i mod 10,
at guidance w = 1 unless --guidance-scale says otherwise; every sampler makes the same indices.
The network runs in generate's precision (--precision auto: bf16 on CPUs with native bf16).
Prints a Markdown table: sampler, steps, NFE (guided denoiser calls per sample; each is one
batched pass of the conditional and the unconditional input), the share of samples the
classifier reads as the digit asked for, and the wall time. Heun costs 2 S - 1 calls for S
steps, so it gets the most steps that fit (5 and 10 steps for NFE 9 and 19). Each sampler
uses its default step spacing; `ddpm` here is DDIM with eta = 1 on DDIM's (DDPM's fixed-small
steps, respaced); `generate --sampler ddpm` itself always runs all T steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from mnist_guidance import load_digit_model, pixel_classifier, sample_and_read
from toy_samplers_nfe import steps_for

from ddpmkit.choices import PRECISIONS, SAMPLERS
from ddpmkit.diffusion import make_sampler
from ddpmkit.runtime.devices import resolve_precision
from ddpmkit.sampling.denoiser import make_denoise_fn

NFE_BUDGETS = (10, 20)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chkpt-path", required=True, help="a class-conditional MNIST checkpoint")
    p.add_argument("--root", default="~/datasets", help="folder holding MNIST")
    p.add_argument("--split", default="test", help="MNIST split for the classifier")
    p.add_argument("--num-samples", type=int, default=200, help="samples per sampler and NFE")
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFE_BUDGETS),
                   help="NFE budgets (default: 10 20)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--guidance-scale", type=float, default=1.0, help="w (default: 1)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="network precision, as generate's (auto: bf16 on CPUs with native bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw-weights", action="store_true", help="not the EMA weights")
    return p.parse_args(argv)


def sampler_for(diffusion, name: str, steps: int):
    """The sampler `name` with `steps` steps (ddpm: DDIM with eta = 1)."""
    if name == "ddpm":
        return make_sampler(diffusion, "ddim", steps=steps, eta=1.0)
    return make_sampler(diffusion, name, steps=steps)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_samples < 1 or min(args.nfe) < 1:
        raise SystemExit("--num-samples and --nfe must be at least 1")
    model, config, diffusion = load_digit_model(args.chkpt_path, args.raw_weights)
    precision = resolve_precision(args.precision, torch.device("cpu")).name
    net = make_denoise_fn(model, precision, "cpu")
    classifier, accuracy = pixel_classifier(os.path.expanduser(args.root), args.split)
    rows = []
    for name in args.samplers:
        for budget in args.nfe:
            steps = steps_for(name, budget)
            sampler = sampler_for(diffusion, name, steps)
            start = time.perf_counter()
            _, share = sample_and_read(diffusion, net, config, sampler, classifier,
                                       args.num_samples, args.guidance_scale, args.seed)
            rows.append(f"| {name} | {steps} | {len(sampler.timesteps)} | {100 * share:.1f}% "
                        f"| {time.perf_counter() - start:.1f} |")
            print(rows[-1], file=sys.stderr, flush=True)

    print(f"{args.num_samples} samples per row (digit i mod 10, noise of seed {args.seed}), "
          f"w = {args.guidance_scale:g}, T = {diffusion.T}, classifier on held-out real digits "
          f"{100 * accuracy:.1f}%, {precision}, torch threads {torch.get_num_threads()}\n")
    print("| sampler | steps | NFE | read as the digit asked for | seconds |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
