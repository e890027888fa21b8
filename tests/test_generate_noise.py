"""The per-sample noise (Philox4x32-10 + Box-Muller), sharding, and the image helpers."""

import functools
import math
import operator

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule, make_sampler
from ddpmkit.errors import UserError
from ddpmkit.sampling import (
    DistEnv,
    IndexedNoise,
    dist_env_from_environ,
    philox4x32,
    sample_indexed,
    shard,
)
from ddpmkit.utils.images import (
    FrameRecorder,
    frame_steps,
    grid_array,
    save_animation,
    to_uint8,
)

# Random123's published known-answer vectors for Philox4x32-10 (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(torch.tensor([counter], dtype=torch.long), key)
    assert out[0].tolist() == list(expected)


def test_noise_depends_only_on_seed_index_and_stream():
    noise = IndexedNoise(1234)
    shape = (3, 5, 7)  # 105 values: not a multiple of 4
    batch = noise.normal(torch.tensor([10, 3, 2**40 + 5]), 0, shape)
    assert batch.shape == (3, *shape) and batch.dtype == torch.float32
    for row, index in enumerate([10, 3, 2**40 + 5]):
        alone = noise.normal(torch.tensor([index]), 0, shape)[0]
        assert torch.equal(batch[row], alone)
    assert not torch.equal(noise.normal(torch.tensor([3]), 1, shape)[0], batch[1])  # stream
    assert not torch.equal(IndexedNoise(1235).normal(torch.tensor([3]), 0, shape)[0], batch[1])
    assert not torch.equal(noise.normal(torch.tensor([4]), 0, shape)[0], batch[1])  # index


def test_noise_is_standard_normal():
    z = IndexedNoise(0).normal(torch.arange(400), 0, (250,), dtype=torch.float64).flatten()
    n = z.numel()  # 100,000 values
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    # Kolmogorov-Smirnov distance to N(0, 1), well inside the 1% critical value 1.63 / sqrt(n).
    x = torch.sort(z).values
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float(torch.maximum(grid - cdf, cdf - (grid - 1 / n)).max()) < 1.63 / math.sqrt(n)
    # Neighbouring values (the two outputs of one Box-Muller pair) are uncorrelated.
    pairs = z.view(-1, 2)
    assert abs(float((pairs[:, 0] * pairs[:, 1]).mean())) < 4 / math.sqrt(n / 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_is_the_same_on_cuda():
    noise = IndexedNoise(7)
    cpu = noise.normal(torch.arange(16), 3, (3, 8, 8), dtype=torch.float64)
    gpu = noise.normal(torch.arange(16), 3, (3, 8, 8), device="cuda", dtype=torch.float64)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)


def test_sample_indexed_ignores_batch_composition():
    betas = get_beta_schedule("linear", 10, beta_start=1e-3, beta_end=0.2)
    diffusion = GaussianDiffusion(betas, decoder="continuous")
    sampler = make_sampler(diffusion, "ddpm")  # stochastic at every step

    def denoise_fn(x_t, t):  # a per-sample function of (x_t, t)
        return torch.tanh(x_t) * (t[:, None].float() + 1) / 10

    whole = sample_indexed(diffusion, denoise_fn, sampler, [0, 1, 2, 3, 4], (6,), 9, "cpu")
    parts = torch.cat([sample_indexed(diffusion, denoise_fn, sampler, idx, (6,), 9, "cpu")
                       for idx in ([3, 0], [4], [1, 2])])
    torch.testing.assert_close(parts, whole[[3, 0, 4, 1, 2]], rtol=0, atol=1e-6)


def test_shards_partition_the_indices():
    for world in (1, 2, 3, 8):
        shards = [list(shard(10, DistEnv(r, world, r))) for r in range(world)]
        assert sorted(functools.reduce(operator.iadd, shards, [])) == list(range(10))


def test_dist_env_from_environ():
    assert dist_env_from_environ({}) == DistEnv(0, 1, 0)
    assert dist_env_from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == \
        DistEnv(3, 4, 1)
    with pytest.raises(UserError):
        dist_env_from_environ({"RANK": "4", "WORLD_SIZE": "4"})


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.5, -1.0, -1 + 0.4 / 127.5, -1 + 0.6 / 127.5, 0.0, 1.0, 2.0, math.nan])
    out = to_uint8(x.view(1, 1, 1, -1))
    assert out.dtype == np.uint8 and out.shape == (1, 1, 8, 1)
    assert out.ravel().tolist() == [0, 0, 0, 1, 128, 255, 255, 128]


def test_grid_and_animation_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    grid = grid_array(images, nrow=3)
    assert grid.shape == (2 + 2 * 6, 2 + 3 * 8, 3)
    assert np.array_equal(grid[8:12, 10:16], images[4])  # row 1, column 1
    assert frame_steps(1000, 5) == [0, 250, 500, 749, 999]
    assert frame_steps(3, 10) == [0, 1, 2]

    recorder = FrameRecorder(num_steps=4, count=2, max_frames=3)
    for i in range(4):
        x = torch.full((3, 3, 4, 4), -1.0 + 0.5 * i)
        recorder(type("Info", (), {"i": i, "x": x, "pred_x_0": x})())
    assert len(recorder.frames) == 3 and recorder.frames[-1].shape == (8, 14, 3)
    for suffix in ("gif", "webp"):
        path = tmp_path / f"anim.{suffix}"
        save_animation(str(path), recorder.frames)
        with Image.open(path) as im:
            assert im.n_frames == 3
    with pytest.raises(ValueError, match=".gif or .webp"):
        save_animation(str(tmp_path / "anim.mp4"), recorder.frames)
