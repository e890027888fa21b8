"""The fast paths give the plain path's results: channels_last, compile, rare host syncs."""

import pytest
import torch

from ddpmkit.build import build_diffusion
from ddpmkit.models import build_model
from ddpmkit.training.images import ImageTrainer

TINY_MODEL = {"in_channels": 3, "hid_channels": 32, "ch_multipliers": [1, 2],
              "num_res_blocks": 1, "apply_attn": [False, True], "drop_rate": 0.0}


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return build_model(TINY_MODEL, 3).eval()


def test_channels_last_matches_contiguous():
    model = tiny_unet()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 5, 9])
    with torch.no_grad():
        plain = model(x, t)
        model_cl = model.to(memory_format=torch.channels_last)
        fast = model_cl(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def _trainer(log_every, batches):
    diffusion = build_diffusion({"timesteps": 10})
    model = tiny_unet()
    return ImageTrainer(model, diffusion, batches, epochs=2, lr=1e-3, warmup_steps=0,
                        grad_clip=1.0, ema_decay=0.9, seed=3, progress=False,
                        log_every=log_every, random_flip=True, global_batch=2, micro_batch=2)


def test_rare_host_syncs_change_no_number():
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3)]
    every_step, rarely = _trainer(1, batches), _trainer(10**6, batches)
    every_step.fit()
    rarely.fit()
    assert every_step.last_loss == rarely.last_loss
    for a, b in zip(every_step.model.parameters(), rarely.model.parameters()):
        assert torch.equal(a, b)


def _compile_works() -> bool:
    try:
        fn = torch.compile(lambda x: x * 2 + 1)
        return bool(torch.equal(fn(torch.ones(2)), torch.full((2,), 3.0)))
    except Exception:  # no C++ compiler or an unsupported platform: the test says so
        return False


@pytest.mark.slow
def test_compiled_model_matches_eager():
    if not _compile_works():
        pytest.skip("torch.compile does not work on this machine")
    model = tiny_unet()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 8])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    model, diffusion = tiny_unet(), build_diffusion({"timesteps": 100})
    g = torch.Generator().manual_seed(5)
    x = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    t = torch.randint(100, (8,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        fp32 = diffusion.training_losses(model, x, t, noise).mean()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = diffusion.training_losses(model, x, t, noise).mean()
    assert bf16.dtype == torch.float32  # the loss itself is computed in float32
    assert abs(bf16.item() - fp32.item()) < 2e-2 * fp32.item()
