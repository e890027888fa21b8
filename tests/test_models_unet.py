"""The DDPM UNet: reference compatibility (parameter counts, state_dict keys and shapes), shapes,
pixel shuffle, attention, initialization and config validation. Full-size models are built on
the meta device (no memory, no init cost) and never run."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddpmkit.errors import UserError
from ddpmkit.models import UNet, build_model, count_parameters
from ddpmkit.models.layers import AttnBlock, Downsample, ResBlock, timestep_embedding

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "ddpmkit" / "configs"
REFERENCE_DIR = ROOT / "tests" / "data" / "reference"

# Parameter counts of the reference implementation's models for these configs.
REFERENCE_PARAMS = {"cifar10": 35_746_307, "celeba": 35_746_307, "celebahq": 113_673_219}

TINY = {"in_channels": 3, "hid_channels": 32, "ch_multipliers": [1, 2], "num_res_blocks": 1,
        "apply_attn": [False, True], "drop_rate": 0.0}


def load_config(name):
    with open(CONFIG_DIR / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def meta_model(name):
    cfg = load_config(name)
    with torch.device("meta"):
        return build_model(cfg["model"], cfg["dataset"]["channels"])


def read_reference_tsv(name):
    path = REFERENCE_DIR / f"ddpm-torch-unet-keys-{name}.tsv"
    assert path.is_file(), f"reference key list {path} is missing from the repository"
    header, rows = None, []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            header = dict(field.split("=") for field in line[1:].split())
        elif line.strip():
            key, shape = line.split("\t")
            rows.append((key, shape.strip()))
    return header, rows


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_shipped_configs_have_reference_parameter_counts(name):
    assert count_parameters(meta_model(name)) == REFERENCE_PARAMS[name]


def test_mnist_config_builds_a_small_one_channel_model():
    model = meta_model("mnist")
    assert model.in_conv.weight.shape[1] == 1 and model.out_conv[2].weight.shape[0] == 1
    assert model.size_divisor == 4  # 32x32 inputs pass through 3 levels
    assert count_parameters(model) < 10_000_000


@pytest.mark.parametrize("name", ["cifar10", "celebahq"])
def test_state_dict_keys_and_shapes_equal_the_reference(name):
    header, rows = read_reference_tsv(name)
    state = meta_model(name).state_dict()
    ours = [(key, str(tuple(t.shape))) for key, t in state.items()]
    assert ours == rows  # same names, same shapes, same order
    assert len(ours) == int(header["tensors"])
    assert sum(math.prod(t.shape) for t in state.values()) == int(header["params"])


def test_celeba_is_cifar10_with_attention_moved_to_level_2():
    _, cifar_rows = read_reference_tsv("cifar10")
    res = r"(norm1|conv1|fc|norm2|conv2|skip)"
    attn = r"(norm|project_in|project_out)"
    moves = [  # a block with attention is `<j>.0` (res) + `<j>.1` (attn), without it `<j>`
        (rf"^(\w+)\.level_1\.(\d)\.0\.{res}\.", r"\1.level_1.\2.\3."),
        (rf"^(\w+)\.level_1\.(\d)\.1\.{attn}\.", r"\1.level_2.\2.1.\3."),
        (rf"^(\w+)\.level_2\.(\d)\.{res}\.", r"\1.level_2.\2.0.\3."),
    ]

    def move(key):
        for pattern, repl in moves:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        return key

    expected = {move(key): shape for key, shape in cifar_rows}
    celeba = {k: str(tuple(t.shape)) for k, t in meta_model("celeba").state_dict().items()}
    assert len(expected) == len(cifar_rows)
    assert celeba == expected


@pytest.mark.parametrize("out_channels", [3, 6])
def test_output_shape_for_fixed_and_learned_variance(out_channels):
    model = UNet(out_channels=out_channels, **TINY).eval()
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([0, 9]))
    assert out.shape == (2, out_channels, 8, 8)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("var_type", ["fixed-large", "learned"])
def test_out_channels_come_from_the_diffusion(var_type):
    from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule

    diffusion = GaussianDiffusion(get_beta_schedule("linear", 10, beta_start=1e-4, beta_end=0.02),
                                  model_mean_type="eps", model_var_type=var_type,
                                  loss_type="kl" if var_type == "learned" else "mse")
    out_channels = diffusion.model_out_channels(3)
    assert out_channels == (6 if var_type == "learned" else 3)
    model = build_model(TINY, out_channels)
    x_0 = torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 9])
    losses = diffusion.training_losses(model, x_0, t, torch.randn_like(x_0))
    assert losses.shape == (2,) and torch.isfinite(losses).all()


def test_float_and_scalar_timesteps_match_int64():
    torch.manual_seed(0)
    model = UNet(out_channels=3, **TINY).eval()
    torch.nn.init.normal_(model.out_conv[2].weight)  # make the output depend on t visibly
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([5, 5])
    with torch.no_grad():
        ref = model(x, t)
        assert torch.equal(model(x, t.float()), ref)
        assert torch.equal(model(x, torch.tensor(5)), ref)
        assert not torch.allclose(model(x, torch.tensor([6, 6])), ref)


def test_pixel_shuffle_runs_the_inner_network_at_reduced_resolution():
    torch.manual_seed(0)
    b = 2
    shuffled = UNet(out_channels=3, block_size=b, **TINY).eval()
    # Same layers at H/b with C b^2 channels in and out, no pixel shuffle.
    inner = UNet(**{**TINY, "in_channels": 3 * b * b}, out_channels=3 * b * b).eval()
    # No wrapper module: plain keys, only the first and last convs change shape.
    assert set(shuffled.state_dict()) == set(inner.state_dict())
    assert not any(k.startswith("_model.") for k in shuffled.state_dict())
    assert shuffled.in_conv.weight.shape == (32, 12, 3, 3)
    assert shuffled.out_conv[2].weight.shape == (12, 32, 3, 3)
    torch.nn.init.normal_(shuffled.out_conv[2].weight)
    inner.load_state_dict(shuffled.state_dict())

    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([1, 7])
    assert torch.equal(F.pixel_shuffle(F.pixel_unshuffle(x, b), b), x)  # the round trip
    with torch.no_grad():
        out = shuffled(x, t)
        expected = F.pixel_shuffle(inner(F.pixel_unshuffle(x, b), t), b)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_input_size_must_divide_by_block_size_and_levels():
    model = UNet(out_channels=3, block_size=2, **TINY)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 6, 6), torch.tensor([0]))


def explicit_attention(block, x):
    """softmax(q^T k / sqrt(C)) v over all positions, written out, in float64."""
    B, C, H, W = x.shape
    qkv = F.conv2d(F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias,
                                block.norm.eps),
                   block.project_in.weight, block.project_in.bias)
    q, k, v = (a.reshape(B, C, H * W) for a in qkv.chunk(3, dim=1))  # each (B, C, N)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)
    h = torch.einsum("bij,bcj->bci", weights, v).reshape(B, C, H, W)
    return x + F.conv2d(h, block.project_out.weight, block.project_out.bias)


def test_sdpa_attention_equals_the_explicit_formula():
    torch.manual_seed(0)
    block = AttnBlock(32).double()
    for p in block.parameters():  # project_out starts at ~1e-10: give everything real values
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 32, 4, 5, dtype=torch.float64)
    out = block(x)
    expected = explicit_attention(block, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (out - x).abs().max() > 0.1  # the attention branch contributes


def test_sdpa_attention_is_channels_last_safe():
    torch.manual_seed(0)
    block = AttnBlock(32)
    torch.nn.init.normal_(block.project_out.weight, std=0.3)
    x = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), block(x))


def test_timestep_embedding_formula():
    t = torch.tensor([0, 3])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-k * math.log(1e4) / 3) for k in range(4)]
    expected = [[math.sin(3 * f) for f in freqs] + [math.cos(3 * f) for f in freqs]]
    torch.testing.assert_close(emb[1:], torch.tensor(expected))
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert timestep_embedding(t, 9).shape == (2, 9)


def test_initialization_is_variance_scaling_with_near_zero_output_layers():
    torch.manual_seed(0)
    model = UNet(out_channels=3, **TINY)
    # variance scaling, fan_avg, uniform: |w| <= sqrt(6 / (fan_in + fan_out)), std = limit/sqrt(3)
    conv = model.downsamples["level_0"][0].conv1  # 32 -> 32, 3x3
    limit = math.sqrt(6.0 / (32 * 9 + 32 * 9))
    assert conv.weight.abs().max() <= limit
    assert conv.weight.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.05)
    fc = model.embed[0]  # Linear(32, 128)
    assert fc.weight.abs().max() <= math.sqrt(6.0 / (32 + 128))
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    # Last conv of every ResBlock, attention output and final conv: scaled by 1e-10.
    small = [model.out_conv[2].weight]
    small += [m.conv2.weight for m in model.modules() if isinstance(m, ResBlock)]
    small += [m.project_out.weight for m in model.modules() if isinstance(m, AttnBlock)]
    # out_conv; ResBlocks: 2 down + 2 middle + 4 up; attention: 1 down + 1 middle + 2 up
    assert len(small) == 1 + 8 + 4
    assert all(0 < w.abs().max() < 1e-4 for w in small)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = UNet(out_channels=3, drop_rate=0.1, **{k: v for k, v in TINY.items()
                                                   if k != "drop_rate"})
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_downsample_pads_right_and_bottom_only():
    torch.manual_seed(0)
    down = Downsample(4)
    x = torch.randn(1, 4, 6, 6)
    conv = down[1]
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
    assert torch.equal(down(x), expected)
    assert down(x).shape == (1, 4, 3, 3)


def test_reference_prefixed_state_dict_loads_after_stripping():
    source = UNet(out_channels=3, **TINY)
    prefixed = {"module._model." + k: v for k, v in source.state_dict().items()}
    stripped = {k.removeprefix("module.").removeprefix("_model."): v for k, v in prefixed.items()}
    target = UNet(out_channels=3, **TINY)
    assert target.load_state_dict(stripped, strict=True).missing_keys == []
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(),
                                                 target.state_dict().values()))


@pytest.mark.parametrize("bad, match", [
    ({"attention": True}, "unknown key"),
    ({"apply_attn": [True]}, "apply_attn"),
    ({"ch_multipliers": []}, "ch_multipliers"),
    ({"drop_rate": 1.5}, "drop_rate"),
    ({"hid_channels": 24}, "divisible"),
])
def test_bad_model_config_is_a_user_error(bad, match):
    with pytest.raises(UserError, match=match):
        build_model({**TINY, **bad}, 3)


def test_missing_model_key_is_a_user_error():
    cfg = {k: v for k, v in TINY.items() if k != "num_res_blocks"}
    with pytest.raises(UserError, match="num_res_blocks"):
        build_model(cfg, 3)


def test_group_norm_eps_and_groups_come_from_the_config():
    model = build_model({**TINY, "group_norm_eps": 1e-6, "num_groups": 8}, 3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == 1e-6 and m.num_groups == 8 for m in norms)
