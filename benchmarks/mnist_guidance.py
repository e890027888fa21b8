"""The effect of the guidance scale w on a class-conditional MNIST model: a 10 x 10 grid per w
(row k: ten samples asked for digit k) and the share of samples a simple classifier reads as
the digit they asked for (CPU, minutes).

    python benchmarks/mnist_guidance.py --chkpt-path chkpts/mnist/ddpm_mnist_12.pt \
        --root ~/datasets --scales 0,1,3 --out-dir docs/assets/mnist_cond

The classifier is multinomial logistic regression on the pixels, trained on 8,000 of the
10,000 MNIST test images (`--split test`: the files these CPU demos have) and checked on the
other 2,000; it is a coarse judge (about 90% on real digits), the same for every w. Samples
use DDIM from the same noise for every w (sample i: noise of (seed, i), digit i mod 10).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

CLASSIFIER_STEPS = 300
TRAIN_IMAGES = 8000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chkpt-path", required=True, help="a class-conditional MNIST checkpoint")
    p.add_argument("--root", default="~/datasets", help="folder holding MNIST")
    p.add_argument("--split", default="test", help="MNIST split for the classifier")
    p.add_argument("--scales", default="0,1,3", help="guidance scales, comma-separated")
    p.add_argument("--per-class", type=int, default=10, help="samples per digit and scale")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw-weights", action="store_true", help="not the EMA weights")
    p.add_argument("--out-dir", default=None, help="write grid_w<w>.png here")
    return p.parse_args(argv)


def pixel_classifier(root: str, split: str) -> tuple[torch.nn.Module, float]:
    """(logistic regression on 32x32 pixels, its accuracy on the held-out real images)."""
    from ddpmkit.data.images import build_dataset

    data = build_dataset("mnist", root, split=split, random_flip=False)
    x = data.images.float().flatten(1) / 127.5 - 1  # (N, 1024), as the model's samples
    y = data.labels
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, held = order[:TRAIN_IMAGES], order[TRAIN_IMAGES:]
    model = torch.nn.Linear(x.shape[1], 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(CLASSIFIER_STEPS):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[train]), y[train]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model(x[held]).argmax(1) == y[held]).double().mean())
    return model.eval(), accuracy


def load_digit_model(chkpt_path: str, raw_weights: bool):
    """(10-class conditional network, its config, its diffusion) from a checkpoint."""
    from ddpmkit.build import build_diffusion
    from ddpmkit.interop.sources import load_model_from_checkpoint

    model, config = load_model_from_checkpoint(chkpt_path, use_ema=not raw_weights)
    if model.num_classes != 10:
        raise SystemExit(f"{chkpt_path} is not a 10-class conditional model")
    return model, config, build_diffusion(config["diffusion"])


def sample_and_read(diffusion, net, config, sampler, classifier, count: int, w: float,
                    seed: int) -> tuple[torch.Tensor, float]:
    """(samples 0..count-1 asking for digit i mod 10, as x_0 (count, 1, H, W); the share the
    classifier reads as the digit asked for). `net(x_t, t, y)`: the network, or a
    `make_denoise_fn` of it."""
    from ddpmkit.models.loading import image_shape
    from ddpmkit.sampling import Guidance, class_labels, sample_indexed
    from ddpmkit.utils.images import to_uint8

    asked = torch.tensor(class_labels(10).of(range(count)))
    guidance = Guidance(net, class_labels(10), w, diffusion.model_var_type == "learned")
    with torch.no_grad():
        x = sample_indexed(diffusion, guidance, sampler, range(count), image_shape(config),
                           seed, "cpu")
        # Through uint8, as the PNGs are: what the classifier sees is what a file holds.
        pixels = torch.from_numpy(to_uint8(x)).float().flatten(1) / 127.5 - 1
        read = classifier(pixels).argmax(1)
    return x, float((read == asked).double().mean())


def main(argv=None) -> None:
    from ddpmkit.diffusion import make_sampler
    from ddpmkit.sampling import class_grid_indices
    from ddpmkit.utils.images import save_grid, to_uint8

    args = parse_args(argv)
    model, config, diffusion = load_digit_model(args.chkpt_path, args.raw_weights)
    sampler = make_sampler(diffusion, "ddim", steps=args.steps)
    classifier, accuracy = pixel_classifier(os.path.expanduser(args.root), args.split)
    count = 10 * args.per_class
    indices, cols = class_grid_indices(10, count, count)
    print(f"| w | read as the digit asked for | seconds |  (classifier on real digits: "
          f"{100 * accuracy:.1f}%)")
    print("|---:|---:|---:|")
    for w in (float(v) for v in args.scales.split(",")):
        start = time.perf_counter()
        x, share = sample_and_read(diffusion, model, config, sampler, classifier, count, w,
                                   args.seed)
        seconds = time.perf_counter() - start
        print(f"| {w:g} | {100 * share:.0f}% | {seconds:.0f} |", flush=True)
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            images = to_uint8(x)[np.asarray(indices)]
            save_grid(os.path.join(args.out_dir, f"grid_w{w:g}.png"), images, nrow=cols)


if __name__ == "__main__":
    main()
