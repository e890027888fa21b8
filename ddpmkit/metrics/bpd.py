"""Negative log-likelihood bound in bits/dim over a dataset (the DDPM paper's NLL column).

For each image, `GaussianDiffusion.bpd` evaluates the full variational bound (DDPM eq. 5):
prior KL + the T - 1 KL terms + the discretized decoder NLL at t = 0, in bits per dimension.
This module averages it over batches of real images.
"""

import math
from typing import Iterable, NamedTuple, Optional

import torch


class BPDSummary(NamedTuple):
    bpd: float          # mean total bound, bits/dim
    bpd_stderr: float   # standard error of that mean
    prior_bpd: float    # mean prior term
    decoder_bpd: float  # mean decoder term L_0
    num_images: int


@torch.no_grad()
def dataset_bpd(diffusion, denoise_fn, batches: Iterable[torch.Tensor], device: torch.device,
                seed: int = 0, progress: bool = False, total: Optional[int] = None
                ) -> BPDSummary:
    """The bound averaged over `batches` of images (B, C, H, W) in [-1, 1].

    The noise of every x_t comes from one generator seeded with `seed`, so a rerun gives the
    same number.
    """
    generator = torch.Generator(device=device).manual_seed(int(seed))
    totals, priors, decoders = [], [], []
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=total, desc="bits/dim", unit="batch")
    for x_0 in batches:
        x_0 = x_0.to(device=device, dtype=torch.float32)
        result = diffusion.bpd(denoise_fn, x_0, generator=generator)
        totals.append(result.total.double().cpu())
        priors.append(result.prior.double().cpu())
        decoders.append(result.terms[:, 0].double().cpu())
    if not totals:
        raise ValueError("no images to evaluate")
    total_bpd = torch.cat(totals)
    n = total_bpd.numel()
    stderr = float(total_bpd.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return BPDSummary(float(total_bpd.mean()), stderr, float(torch.cat(priors).mean()),
                      float(torch.cat(decoders).mean()), n)
