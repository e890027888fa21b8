"""Training objectives compared at equal updates on 2-D toy data: eps, v and v + min-SNR (CPU,
a few minutes).

    python benchmarks/toy_objectives.py --dataset gaussian25

Each objective trains the same toy network (the `sharp` recipe's: quad betas 1e-4..0.2 over
T = 100, 64 Fourier features, Adam with cosine LR decay, no EMA) from the same initial weights
on the same batches, timesteps and noise. Every `--eval-every` updates it prints a Markdown row:
the training loss (each objective's own, so not comparable across rows), the held-out eps-MSE
(the unweighted MSE of the eps each network implies, on fixed (x_0, t, noise) triples: one
yardstick for all), and DDPM samples scored as `train-toy` scores them (histogram KL against
its floor, modes covered, share of points within 3 std of a mode).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ddpmkit.data.toy import make_toy_data, toy_generator, toy_mixture
from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule, make_sampler, sample
from ddpmkit.metrics.toy import ToyEvaluator
from ddpmkit.models.toy import ToyMLP

# name -> (model mean type, loss weight)
OBJECTIVES = {"eps": ("eps", "uniform"), "v": ("v", "uniform"), "v + min-SNR": ("v", "min-snr"),
              "x_0": ("x_0", "uniform"), "eps + min-SNR": ("eps", "min-snr")}
DEFAULT_OBJECTIVES = ("eps", "v", "v + min-SNR")
HELD_OUT = 20_000  # (x_0, t, noise) triples of the held-out eps-MSE


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="gaussian25",
                   choices=("gaussian8", "gaussian25", "swissroll"))
    p.add_argument("--objectives", nargs="+", default=list(DEFAULT_OBJECTIVES),
                   choices=tuple(OBJECTIVES))
    p.add_argument("--updates", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--num-points", type=int, default=5_000, help="samples per evaluation")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def held_out_eps_mse(diffusion, net, triples) -> float:
    """Unweighted MSE between the noise and the eps the network's output implies."""
    x_0, t, noise = triples
    with torch.no_grad():
        x_t = diffusion.q_sample(x_0, t, noise)
        eps = diffusion.predict(net(x_t, t), x_t, t, clip_denoised=False).eps
    return float(((eps - noise) ** 2).mean())


def train_and_score(args, name, evaluator, triples, x_T):
    """Rows (updates, loss, held-out eps-MSE, KL, modes, within 3 std, seconds) for one
    objective."""
    mean_type, weight = OBJECTIVES[name]
    betas = get_beta_schedule("quad", 100, beta_start=1e-4, beta_end=0.2)
    diffusion = GaussianDiffusion(betas, mean_type, decoder="continuous", loss_weight=weight,
                                  min_snr_gamma=args.min_snr_gamma)
    torch.manual_seed(args.seed)
    net = ToyMLP(fourier_features=64, fourier_scale=2.0, fourier_seed=args.seed)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.updates)
    g = toy_generator(args.seed)  # the same draws for every objective
    rows, start, losses = [], time.perf_counter(), []
    for step in range(1, args.updates + 1):
        x_0 = make_toy_data(args.dataset, args.batch_size, g)
        t = torch.randint(diffusion.T, (args.batch_size,), generator=g)
        noise = torch.randn(x_0.shape, generator=g)
        loss = diffusion.training_losses(net, x_0, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.updates:
            net.eval()
            mse = held_out_eps_mse(diffusion, net, triples)
            with torch.no_grad():
                x = sample(diffusion, net, make_sampler(diffusion, "ddpm"), x_T,
                           generator=torch.Generator().manual_seed(2))
            m = evaluator.evaluate(x)
            net.train()
            recent = sum(losses[-100:]) / len(losses[-100:])
            rows.append(f"| {name} | {step} | {recent:.4f} | {mse:.4f} | {m['kl']:.3f} | "
                        f"{m.get('modes_covered', '-')}/{m.get('num_modes', '-')} | "
                        f"{100 * m.get('high_quality', float('nan')):.1f} | "
                        f"{time.perf_counter() - start:.0f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    g = toy_generator(args.seed + 1)
    true_points = make_toy_data(args.dataset, 50_000, g)
    mixture = toy_mixture(args.dataset)
    evaluator = ToyEvaluator(true_points, make_toy_data(args.dataset, args.num_points, g),
                             modes=None if mixture is None else mixture.modes,
                             std=None if mixture is None else mixture.std)
    triples = (make_toy_data(args.dataset, HELD_OUT, g), torch.randint(100, (HELD_OUT,), generator=g),
               torch.randn(HELD_OUT, 2, generator=g))
    x_T = torch.randn(args.num_points, 2, generator=g)
    rows = []
    for name in args.objectives:
        rows += train_and_score(args, name, evaluator, triples, x_T)
    print(f"{args.dataset}: batch {args.batch_size}, lr {args.lr:g} (cosine), min-SNR gamma "
          f"{args.min_snr_gamma:g}, {args.num_points:,} DDPM samples (T = 100) per evaluation, "
          f"histogram-KL floor {evaluator.kl_floor:.3f}, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| objective | updates | loss (own, last 100) | held-out eps-MSE | KL | modes "
          "| within 3 std (%) | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
