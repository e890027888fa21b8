"""CUDA-only checks (marked `gpu`, skipped without CUDA): bf16 and compile tolerances against
fp32 eager, NCCL DDP with one process, deterministic generation on the GPU.

Run on a GPU machine with `pytest -m gpu` (benchmarks/gpu_check.sh does).
"""

import os

import pytest
import torch
from helpers import randomize_, rel_error

from ddpmkit.build import build_diffusion
from ddpmkit.metrics.inception import tf32_disabled
from ddpmkit.models import build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = {"in_channels": 3, "hid_channels": 64, "ch_multipliers": [1, 2, 2],
         "num_res_blocks": 1, "apply_attn": [False, True, False], "drop_rate": 0.0}


def unet(seed=0):
    """O(1) outputs (see `randomize_`): a fresh UNet's output is ~1e-5 and would pass anything."""
    return randomize_(build_model(MODEL, 3), seed).cuda()


@pytest.fixture
def strict_fp32():
    """Plain float32 convolutions and matmuls (PyTorch's default lets cuDNN use TF32, whose
    errors, ~1e-3 relative, would hide in any tolerance loose enough for them)."""
    with tf32_disabled():
        yield


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 32, 32, generator=g) * 2 - 1).cuda()


def test_cuda_forward_matches_cpu(strict_fp32):
    model = unet()
    x, t = batch(), torch.arange(16).cuda() * 60
    with torch.no_grad():
        gpu = model(x, t).cpu()
        cpu = model.cpu()(x.cpu(), t.cpu())
    assert cpu.std() > 0.1  # a real output, not the near-zero one of a fresh UNet
    assert rel_error(gpu, cpu) < 1e-4


def test_bf16_loss_and_output_close_to_fp32():
    model, diffusion = unet(), build_diffusion({})
    x = batch()
    t = torch.randint(1000, (16,), generator=torch.Generator().manual_seed(2)).cuda()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        fp32 = diffusion.training_losses(model, x, t, noise).mean()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = diffusion.training_losses(model, x, t, noise).mean()
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 2e-2


def test_compile_and_channels_last_match_eager(strict_fp32):
    model = unet()
    x, t = batch(), torch.arange(16).cuda() * 60
    with torch.no_grad():
        eager = model(x, t)
        fast = torch.compile(model.to(memory_format=torch.channels_last))
        out = fast(x.contiguous(memory_format=torch.channels_last), t)
        # (a wrong kernel or layout gives errors of order 1; float32 reordering ~1e-6)
        assert rel_error(out, eager) < 5e-3
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast_bf16, eager_bf16 = fast(x.contiguous(memory_format=torch.channels_last), t), \
                model(x, t)
    assert rel_error(fast_bf16, eager) < 3e-2 and rel_error(eager_bf16, eager) < 3e-2


def test_frozen_compiled_denoiser_matches_eager(strict_fp32):
    from ddpmkit.sampling import make_denoise_fn

    model = unet().eval()
    x, t = batch(), torch.arange(16).cuda() * 60
    with torch.no_grad():
        for precision, tol in (("fp32", 5e-3), ("bf16", 3e-2)):
            torch._dynamo.reset()
            eager = make_denoise_fn(model, "fp32", "cuda")(x, t)
            frozen = make_denoise_fn(model, precision, "cuda", compile_model=True, freeze=True)
            assert rel_error(frozen(x, t), eager) < tol
            assert rel_error(frozen(x * 0.5, t.flip(0)), eager) > 0.1  # new inputs, new output


def test_nccl_ddp_one_process_matches_plain_step():
    import torch.distributed as dist

    from ddpmkit.runtime.distributed import free_port

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        plain, wrapped = unet(), unet()
        ddp = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=[0])
        diffusion = build_diffusion({})
        x = batch()
        t = torch.randint(1000, (16,), generator=torch.Generator().manual_seed(2)).cuda()
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).cuda()
        for net, params in ((plain, plain.parameters()), (ddp, wrapped.parameters())):
            opt = torch.optim.Adam(params, lr=1e-3)
            diffusion.training_losses(net, x, t, noise).mean().backward()
            opt.step()
        for a, b in zip(plain.parameters(), wrapped.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_generation_is_deterministic_on_gpu(strict_fp32):
    from ddpmkit.diffusion import make_sampler
    from ddpmkit.sampling import IndexedNoise, sample_indexed

    model, diffusion = unet().eval(), build_diffusion({"timesteps": 100})
    sampler = make_sampler(diffusion, "ddpm")
    a = sample_indexed(diffusion, model, sampler, [0, 5, 9], (3, 32, 32), 42, "cuda")
    b = sample_indexed(diffusion, model, sampler, [9, 0], (3, 32, 32), 42, "cuda")
    # The same sample in batches of 3 and 2. cuDNN picks its kernels by batch size, so on a
    # GPU the values agree up to float rounding (bit-identical on the CPU, tested elsewhere).
    torch.testing.assert_close(a[0], b[1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(a[2], b[0], rtol=1e-3, atol=1e-3)
    again = sample_indexed(diffusion, model, sampler, [0, 5, 9], (3, 32, 32), 42, "cuda")
    torch.testing.assert_close(again, a, rtol=1e-5, atol=1e-5)  # same batch: a rerun agrees
    noise = IndexedNoise(42)
    idx = torch.tensor([3, 7])
    torch.testing.assert_close(noise.normal(idx.cuda(), 0, (3, 8, 8)).cpu(),
                               noise.normal(idx, 0, (3, 8, 8)), rtol=1e-6, atol=1e-6)


def test_cuda_graph_denoiser_matches_eager_and_recaptures_per_shape():
    from ddpmkit.sampling import make_denoise_fn

    model = unet().eval()
    eager = make_denoise_fn(model, "bf16", "cuda", channels_last=True)
    graphed = make_denoise_fn(model, "bf16", "cuda", channels_last=True, cuda_graph=True)
    with torch.no_grad():
        for n in (16, 16, 5):
            x, t = batch(n=n), torch.arange(n).cuda() * 60
            first = graphed(x, t)
            again = graphed(x * 0.5, t.flip(0))  # the static buffers take the new inputs
            torch.testing.assert_close(first, eager(x, t), rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(again, eager(x * 0.5, t.flip(0)), rtol=2e-2, atol=2e-2)
            assert not torch.equal(first, again)  # the first output was copied out of the graph
    assert graphed.num_graphs == 2


def test_cuda_graph_sampling_matches_eager_fp32(strict_fp32):
    from ddpmkit.diffusion import make_sampler
    from ddpmkit.sampling import make_denoise_fn, sample_indexed

    model, diffusion = unet().eval(), build_diffusion({"timesteps": 100})
    for name in ("ddim", "dpm-solver++", "ddpm"):
        sampler = make_sampler(diffusion, name, steps=10)
        fns = [make_denoise_fn(model, "fp32", "cuda", cuda_graph=g) for g in (False, True)]
        a, b = (sample_indexed(diffusion, fn, sampler, range(4), (3, 32, 32), 7, "cuda")
                for fn in fns)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_group_norm_bf16_path_on_cuda_matches_fp32():
    from ddpmkit.models.layers import group_norm

    norm = group_norm(128, eps=1e-5).cuda()
    x = (torch.randn(8, 128, 16, 16, generator=torch.Generator().manual_seed(0)) * 2).cuda()
    with torch.no_grad():
        reference = norm(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=2e-2)
