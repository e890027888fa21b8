"""Evaluation throughput: Inception images/s, precision/recall and FID time on random features.

    python benchmarks/eval_throughput.py                      # short default run (CPU or GPU)
    python benchmarks/eval_throughput.py --device cuda --num-images 5000 --batch-size 250

Inception runs with random weights unless --inception-weights gives the real file (timings do
not depend on the values). The strict float32 default (NCHW, eager) is compared with
channels_last and, on CUDA, cuDNN autotuning and TF32 (`ddpmkit eval --tf32`); `--compile`
adds `ddpmkit eval --compile`. Each row gives the relative error of its features against the
default's. Precision/recall runs on random 2048-d features of --pr-size real and --pr-size
generated points.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    count_flops,
    device_name,
    peak_flops,
    peak_memory_mb,
    reset_peak_memory,
    synchronize,
)

from ddpmkit.metrics.fid import feature_statistics, frechet_distance  # noqa: E402
from ddpmkit.metrics.inception import (  # noqa: E402
    FIDInceptionV3,
    extract_features,
    load_fid_inception,
    prepare_model,
    randomize_weights_,
)
from ddpmkit.metrics.precision_recall import precision_recall  # noqa: E402
from ddpmkit.runtime.devices import resolve_device  # noqa: E402


def inception_images_per_s(model, device, num_images, batch_size, image_size) -> float:
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=g,
                          dtype=torch.uint8)
    num_batches = max(1, num_images // batch_size)
    extract_features(model, [batch])  # warm-up: allocator, cuDNN algorithms, compilation
    synchronize(device)
    start = time.perf_counter()
    extract_features(model, [batch] * num_batches)
    synchronize(device)
    return num_batches * batch_size / (time.perf_counter() - start)


def random_features(num, dim, seed):
    rng = np.random.default_rng(seed)
    # non-negative and correlated, like Inception pool features
    return np.maximum(rng.normal(size=(num, dim)).astype(np.float32) + 0.5, 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32, help="input size before the resize")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--pr-size", type=int, default=10000, help="points per set; 0 skips")
    p.add_argument("--feature-dim", type=int, default=2048)
    p.add_argument("--row-batch-size", type=int, default=10000)
    p.add_argument("--col-batch-size", type=int, default=10000)
    p.add_argument("--skip-fid", action="store_true", help="skip the 2048-d Frechet distance")
    p.add_argument("--compile", action="store_true",
                   help="also time `ddpmkit eval --compile` (compiling takes a minute or more)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    print(f"device: {device} ({device_name(device)}), torch {torch.__version__}")

    if args.inception_weights:
        model = load_fid_inception(args.inception_weights, device)
    else:
        model = prepare_model(randomize_weights_(FIDInceptionV3(), torch.Generator()
                                                 .manual_seed(0)), device)
    one = torch.zeros(1, 3, args.image_size, args.image_size, dtype=torch.uint8)
    flops = count_flops(lambda: extract_features(model, [one]))  # resize + network, per image
    # (label, memory format, cuDNN autotuning, TF32, compiled). The default, and the reference
    # implementations' arithmetic, is the first: NCHW, strict float32, eager.
    variants = [("fp32", torch.contiguous_format, False, False, False),
                ("fp32 channels_last", torch.channels_last, False, False, False)]
    if device.type == "cuda":
        variants += [("fp32 + cudnn autotune", torch.contiguous_format, True, False, False),
                     ("tf32 (--tf32: autotune + TF32)", torch.contiguous_format, True, True,
                      False)]
    if args.compile:
        variants.append(("fp32 + compile (--compile)", torch.contiguous_format, False, False,
                         True))
    g = torch.Generator().manual_seed(1)
    probe = torch.randint(0, 256, (min(args.batch_size, 64), 3, args.image_size,
                                   args.image_size), generator=g, dtype=torch.uint8)
    strict_pool, width = None, max(len(v[0]) for v in variants)
    for label, memory_format, autotune, tf32, compiled in variants:
        model.set_memory_format(memory_format).set_tf32(tf32)
        net = copy.deepcopy(model).compile_frozen() if compiled else model
        benchmark_before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = autotune
        try:
            reset_peak_memory(device)
            rate = inception_images_per_s(net, device, args.num_images, args.batch_size,
                                          args.image_size)
            pool = extract_features(net, [probe]).pool
        finally:
            torch.backends.cudnn.benchmark = benchmark_before
        if strict_pool is None:
            strict_pool = pool
        error = np.linalg.norm(pool - strict_pool) / np.linalg.norm(strict_pool)
        peak = peak_flops(device, "fp32" if tf32 else "fp32-strict")  # TF32 or plain fp32
        achieved = rate * flops
        share = f", {100 * achieved / peak:.1f}% of peak" if peak else ""
        print(f"inception {label:{width}s}: {rate:9.1f} images/s, {achieved / 1e12:.2f} TFLOP/s"
              f"{share}, peak {peak_memory_mb(device):.0f} MiB, features vs the first row: "
              f"relative error {error:.1e}")
    model.set_memory_format(torch.contiguous_format).set_tf32(False)
    print(f"  ({args.num_images} images of {args.image_size}x{args.image_size}, batch "
          f"{args.batch_size}; {flops / 1e9:.2f} GFLOP per image)")

    if args.pr_size > 0:
        real = random_features(args.pr_size, args.feature_dim, 1)
        fake = random_features(args.pr_size, args.feature_dim, 2)
        synchronize(device)
        start = time.perf_counter()
        pr = precision_recall(real, fake, nhood_size=3, row_batch_size=args.row_batch_size,
                              col_batch_size=args.col_batch_size, device=device)
        synchronize(device)
        print(f"precision/recall: {time.perf_counter() - start:7.2f} s  ({args.pr_size} x "
              f"{args.pr_size}, {args.feature_dim}-d, k=3, blocks {args.row_batch_size} x "
              f"{args.col_batch_size}; precision {pr.precision:.3f} recall {pr.recall:.3f})")

    if not args.skip_fid:
        x = random_features(max(4 * args.feature_dim, 2), args.feature_dim, 3)
        y = random_features(max(4 * args.feature_dim, 2), args.feature_dim, 4)
        (m1, s1), (m2, s2) = feature_statistics(x), feature_statistics(y)
        start = time.perf_counter()
        fid = frechet_distance(m1, s1, m2, s2)
        print(f"frechet distance: {time.perf_counter() - start:7.2f} s  ({args.feature_dim}-d "
              f"float64 on the CPU; value {fid:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
