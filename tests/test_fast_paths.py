"""The fast paths give the plain path's results: channels_last, compile, rare host syncs."""

import pytest
import torch
from helpers import randomize_, rel_error

from ddpmkit.build import build_diffusion
from ddpmkit.models import build_model
from ddpmkit.training.images import ImageTrainer

TINY_MODEL = {"in_channels": 3, "hid_channels": 32, "ch_multipliers": [1, 2],
              "num_res_blocks": 1, "apply_attn": [False, True], "drop_rate": 0.0}


def tiny_unet(seed=0):
    """A small UNet whose output is O(1) (see `randomize_`), so comparisons can fail."""
    return randomize_(build_model(TINY_MODEL, 3), seed).eval()


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
        # bf16 autocast, through the GroupNorm that keeps bf16 (traced by dynamo)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, eager = compiled(x, t), model(x, t)
        assert fast.dtype == eager.dtype
        assert rel_error(fast, eager) < 2e-2  # bf16 rounding differs between the two paths


@pytest.mark.slow
def test_generation_compile_freezes_weights_on_cpu_and_matches_eager():
    """`generate --compile` on a CPU freezes the weights into the compiled network (faster:
    weight casts folded, convolution weights prepacked). Under bf16 the folded casts are copies
    made at compile time, so a frozen network ignores later changes to the weights: that is how
    this test sees that freezing is really on."""
    if not _compile_works():
        pytest.skip("torch.compile does not work on this machine")
    from ddpmkit.sampling import make_denoise_fn

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([2, 7])
    outputs = {}
    for precision, freeze, tol in (("fp32", None, 1e-4), ("bf16", None, 2e-2),
                                   ("bf16", False, 2e-2)):
        torch._dynamo.reset()
        model = tiny_unet()
        eager = make_denoise_fn(model, "fp32", "cpu")
        compiled = make_denoise_fn(model, precision, "cpu", compile_model=True, freeze=freeze)
        with torch.no_grad():
            before = eager(x, t)
            assert rel_error(compiled(x, t), before) < tol
            for p in model.parameters():
                p.mul_(0.5)
            assert rel_error(eager(x, t), before) > 0.1
            outputs[precision, freeze] = rel_error(compiled(x, t), before)
    assert outputs["bf16", None] < 2e-2  # frozen: still the weights it was compiled with
    assert outputs["bf16", False] > 0.1  # not frozen: follows the weights


def test_compile_flag_values():
    from ddpmkit.errors import UserError
    from ddpmkit.runtime.devices import COMPILE_MODES, compile_mode, compile_module

    assert [compile_mode(v) for v in (None, False, "", True)] == [None, None, None, "default"]
    assert all(compile_mode(m) == m for m in COMPILE_MODES)
    with pytest.raises(UserError, match="reduce-overhead"):
        compile_mode("fast")
    model = tiny_unet()
    assert compile_module(model, None) is model


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


def _group_norm_f64(x, norm):
    """GroupNorm written out in float64 (Wu & He 2018, eq. 1-3)."""
    B, C = x.shape[:2]
    g = x.double().reshape(B, norm.num_groups, -1)
    y = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True)
                                                    + norm.eps)
    shape = (1, C) + (1,) * (x.dim() - 2)
    return y.reshape(x.shape) * norm.weight.double().view(shape) + norm.bias.double().view(shape)


def test_group_norm_keeps_bf16_under_autocast_and_matches_float64():
    from ddpmkit.models.layers import group_norm

    g = torch.Generator().manual_seed(0)
    norm = group_norm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(64, generator=g))
    x = (torch.randn(4, 64, 8, 8, generator=g) * 3 + 1).bfloat16()
    reference = _group_norm_f64(x, norm)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    # within bf16 rounding of the output (8 significant bits) and of gamma and beta
    torch.testing.assert_close(y.double(), reference, rtol=2e-2, atol=2e-2)
    # outside autocast: exactly nn.GroupNorm
    x32 = x.float()
    torch.testing.assert_close(norm(x32), torch.nn.functional.group_norm(
        x32, 32, norm.weight, norm.bias, 1e-5), rtol=0, atol=0)
    torch.testing.assert_close(norm(x32).double(), reference, rtol=1e-5, atol=1e-5)


def test_group_norm_bf16_path_has_gradients():
    from ddpmkit.models.layers import group_norm

    norm = group_norm(32, eps=1e-5)
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(1)).bfloat16()
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm(x).float().square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None and norm.bias.grad is not None
    assert norm.weight.grad.dtype == torch.float32  # master weights stay float32


@pytest.mark.parametrize("argv, expected", [([], None), (["--compile"], "default"),
                                            (["--compile", "reduce-overhead"], "reduce-overhead")])
def test_train_compile_flag_reaches_the_config(argv, expected):
    from ddpmkit.cli.train import build_parser, resolve_config
    from ddpmkit.config import parse_with_explicit
    from ddpmkit.runtime.devices import compile_mode

    parser = build_parser()
    args, typed = parse_with_explicit(parser, ["--dataset", "cifar10", *argv])
    config = resolve_config(args, typed, parser)
    assert compile_mode(config["train"].get("compile")) == expected
