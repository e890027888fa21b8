"""Seeded per-sample noise: every sample is a pure function of (seed, global index).

Its starting noise x_T and the fresh noise of each stochastic step (DDPM, DDIM with eta > 0,
the SDE solvers) come from a counter-based generator keyed by the seed and addressed by (index, stream,
position). So the set of images does not depend on the batch size, the number of processes, or
which images a resumed run still had to make, and process r of W simply takes indices r, r + W,
r + 2W, ... (`shard`; no communication).

References:
- Salmon, Moraes, Dror, Shaw (2011), "Parallel random numbers: as easy as 1, 2, 3" (SC'11):
  the Philox4x32-10 counter-based generator (the one cuRAND and PyTorch's CUDA RNG use).
- Box and Muller (1958): two uniforms -> two independent standard normals.

Symbols: `B` batch, `*S` the sample shape (C, H, W) for images; a stream is 0 for x_T and
1 + i for the noise of sampler step i (i = 0 .. S-1).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import torch

from ddpmkit.diffusion.gaussian import DenoiseFn
from ddpmkit.diffusion.samplers import NoiseFn, StepInfo, sample
from ddpmkit.runtime.distributed import DistInfo, env_dist_info
from ddpmkit.sampling.labels import Guidance

# ---- Philox4x32-10 (Salmon et al. 2011, section 4.2) -------------------------------------
# Round multipliers and the Weyl-sequence key increments ("golden ratio" and sqrt(3) - 1).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_TWO_POW_32 = 4294967296.0

# Counter streams: x_T uses stream 0, the noise drawn at sampler step i uses stream 1 + i.
X_T_STREAM = 0
# Bumped if the mapping (seed, index, stream) -> noise ever changes; recorded in the manifest.
NOISE_VERSION = "philox4x32-10/box-muller/v1"


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for a constant a < 2^32 and int64
    b in [0, 2^32). The full product overflows int64, so a is split into 16-bit halves and every
    partial product stays below 2^49."""
    p_lo = b * (a & 0xFFFF)                  # < 2^48
    p_hi = b * (a >> 16)                     # < 2^48; a * b = p_hi 2^16 + p_lo
    low = p_lo + ((p_hi & 0xFFFF) << 16)     # bits 0..47 of the product, plus carries
    return (p_hi >> 16) + (low >> 32), low & _MASK32


def philox4x32(counter: torch.Tensor, key: Sequence[int], rounds: int = PHILOX_ROUNDS
               ) -> torch.Tensor:
    """Philox4x32 of int64 counters (..., 4) holding uint32 words, with a 2-word key.

    Returns (..., 4) int64 in [0, 2^32): four independent uniformly random 32-bit words per
    counter. Bit-identical on every device (integer arithmetic only).
    """
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for r in range(rounds):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < rounds:
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


class IndexedNoise:
    """Standard normal noise as a pure function of (seed, sample index, stream, position).

    `normal(indices, stream, shape)` -> (B, *shape): row b depends only on (seed, indices[b],
    stream), never on the other rows or on the device.
    """

    def __init__(self, seed: int):
        seed = int(seed) % 2**64
        self.seed = seed
        self.key = (seed & _MASK32, seed >> 32)

    def normal(self, indices: torch.Tensor, stream: int, shape: Sequence[int],
               device: torch.device | None = None, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
        device = torch.device(device) if device is not None else indices.device
        # Indices must be >= 0 (checked by callers on the host: no device sync per step).
        indices = torch.as_tensor(indices, dtype=torch.long).to(device).reshape(-1)
        numel = math.prod(shape)
        blocks = (numel + 3) // 4  # each counter yields 4 words -> 4 normals
        B = indices.numel()
        # (1) counters (B, blocks, 4): (position block, stream, index low word, index high word)
        counter = torch.empty(B, blocks, 4, dtype=torch.long, device=device)
        counter[..., 0] = torch.arange(blocks, dtype=torch.long, device=device)
        counter[..., 1] = int(stream) & _MASK32
        counter[..., 2] = (indices & _MASK32)[:, None]
        counter[..., 3] = (indices >> 32)[:, None]
        words = philox4x32(counter, self.key)  # (B, blocks, 4)
        # (2) uniforms in (0, 1), never 0 (log) : u = (w + 1/2) / 2^32
        fdtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        u = (words.to(fdtype) + 0.5) / _TWO_POW_32
        # (3) Box-Muller on the pairs (u0, u1) and (u2, u3)
        radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))  # (B, blocks, 2)
        angle = (2.0 * math.pi) * u[..., 1::2]
        z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
        z = z.reshape(B, blocks * 4)[:, :numel]
        return z.reshape(B, *shape).to(dtype)

    def step_noise_fn(self, indices: torch.Tensor) -> NoiseFn:
        """noise_fn(i, x) for `sample`: the noise of sampler step i for these samples."""
        return lambda i, x: self.normal(indices, 1 + i, x.shape[1:], x.device, x.dtype)


def _denoiser_for(denoise_fn: DenoiseFn | Guidance, indices: Sequence[int], device) -> DenoiseFn:
    return denoise_fn.bind(indices, device) if isinstance(denoise_fn, Guidance) else denoise_fn


def sample_indexed(diffusion, denoise_fn: DenoiseFn | Guidance, sampler,
                   indices: Sequence[int], shape: Sequence[int],
                   seed: int, device, dtype: torch.dtype = torch.float32,
                   callback: Callable[[StepInfo], None] | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Samples number `indices` (B,) of the seed's sequence: x_0 (B, *shape) on `device`.
    `denoise_fn` is the network, or a `Guidance` for a class-conditional one."""
    indices = [int(i) for i in indices]
    if min(indices, default=0) < 0:
        raise ValueError("sample indices must be non-negative")
    noise = IndexedNoise(seed)
    idx = torch.as_tensor(indices, dtype=torch.long, device=device)
    x_T = noise.normal(idx, X_T_STREAM, shape, device, dtype)
    return sample(diffusion, _denoiser_for(denoise_fn, indices, device), sampler, x_T,
                  noise_fn=noise.step_noise_fn(idx), callback=callback, progress=progress)


# ---- processes ---------------------------------------------------------------------------
# One description of "which process am I" for training and generation alike.
DistEnv = DistInfo
dist_env_from_environ = env_dist_info


def shard(total_size: int, env: DistEnv) -> range:
    """The global sample indices process `env.rank` of `env.world_size` makes."""
    return range(env.rank, total_size, env.world_size)
