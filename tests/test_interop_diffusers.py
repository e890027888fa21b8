"""diffusers UNet2DModel / DDPMScheduler folders load as ddpmkit models: the same network
(outputs within 1e-5 relative in float32 on O(1) random weights), the same diffusion (betas,
variances, clipping: DDPM sampling matches DDPMPipeline from the same noise), and clean
one-line errors for what does not map."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rel_error
from interop_helpers import (
    CIFAR10_32,
    LAYOUT_256,
    SCHEDULER_CIFAR10,
    TINY,
    TINY_32,
    TINY_256,
    ddpm_pipeline_gap,
    random_unet,
    save_model_folder,
    unet_kwargs,
)

from ddpmkit import make_sampler, sample
from ddpmkit.build import build_diffusion
from ddpmkit.errors import UserError
from ddpmkit.interop.diffusers_format import (
    model_config_from_unet,
    state_dict_from_diffusers,
    unet_config_from_model,
)
from ddpmkit.interop.diffusers_scheduler import diffusion_config_from_scheduler
from ddpmkit.interop.sources import load_model_from_checkpoint
from ddpmkit.models.unet import build_model, count_parameters

diffusers = pytest.importorskip("diffusers")
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
TIMESTEPS = torch.tensor([0, 1, 500, 999])


def _outputs(diffusers_unet, model, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(TIMESTEPS), *shape), generator=g)
    with torch.no_grad():
        return model(x, TIMESTEPS), diffusers_unet(x, TIMESTEPS).sample


# ---- the network ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", [TINY, TINY_32, TINY_256], ids=["tiny", "32px", "256px"])
def test_folder_gives_the_same_network_output(tmp_path, config, one_thread):
    unet = save_model_folder(tmp_path, config)
    model, cfg = load_model_from_checkpoint(str(tmp_path))
    size = config["sample_size"]
    ours, theirs = _outputs(unet, model, (3, size, size))
    assert theirs.abs().mean() > 0.1  # O(1) weights: the output depends on every layer
    assert rel_error(ours, theirs) < 1e-5
    assert cfg["model"]["group_norm_eps"] == 1e-6 and cfg["dataset"]["resolution"] == size


def test_non_square_one_channel_folder_round_trips(tmp_path, one_thread):
    """sample_size [H, W] and one channel: the same network output as diffusers', the size read
    as ddpmkit's [H, W] resolution, and written back as [H, W] by the exporter's mapping."""
    config = {**TINY, "sample_size": [8, 16], "in_channels": 1, "out_channels": 1}
    unet = save_model_folder(tmp_path, config)
    model, cfg = load_model_from_checkpoint(str(tmp_path))
    ours, theirs = _outputs(unet, model, (1, 8, 16))
    assert ours.shape == (len(TIMESTEPS), 1, 8, 16) and theirs.abs().mean() > 0.1
    assert rel_error(ours, theirs) < 1e-5
    assert cfg["dataset"]["resolution"] == [8, 16] and cfg["dataset"]["channels"] == 1
    assert unet_config_from_model(cfg["model"], [8, 16])["sample_size"] == [8, 16]
    assert unet_config_from_model(cfg["model"], [8, 8])["sample_size"] == 8


@pytest.mark.parametrize("config", [TINY_32, TINY_256], ids=["32px", "256px"])
def test_the_mapping_is_exact_in_float64(tmp_path, config, monkeypatch, one_thread):
    """Both compute the time embedding in float32 with different (equivalent) arithmetic,
    which limits the agreement to ~1e-6; given diffusers' embedding, the rest agrees to float64
    rounding."""
    from diffusers.models.embeddings import get_timestep_embedding

    import ddpmkit.models.unet as unet_module

    unet = save_model_folder(tmp_path, config).double()
    model, _ = load_model_from_checkpoint(str(tmp_path))
    monkeypatch.setattr(unet_module, "timestep_embedding", lambda t, dim: get_timestep_embedding(
        t, dim, flip_sin_to_cos=False, downscale_freq_shift=1))
    size = config["sample_size"]
    x = torch.randn((len(TIMESTEPS), 3, size, size), dtype=torch.float64)
    with torch.no_grad():
        assert rel_error(model.double()(x, TIMESTEPS), unet(x, TIMESTEPS).sample) < 1e-12


@pytest.mark.parametrize("config, reference, tensors, params", [
    (CIFAR10_32, "ddpm-torch-unet-keys-cifar10.tsv", (328, 304), 35_746_307),
    (LAYOUT_256, "ddpm-torch-unet-keys-celebahq.tsv", (450, 426), 113_673_219),
], ids=["cifar10-32", "256px"])
def test_real_layouts_map_tensor_for_tensor(config, reference, tensors, params):
    """Built on the meta device (no memory, no time): every diffusers tensor lands on a
    ddpmkit tensor of the right shape, and the keys are the reference project's."""
    with torch.device("meta"):
        unet = diffusers.UNet2DModel(**unet_kwargs(config))
        model_cfg, resolution = model_config_from_unet(config)
        model = build_model(model_cfg, 3)
    converted = state_dict_from_diffusers(unet.state_dict(), model_cfg)
    shapes = {k: tuple(v.shape) for k, v in converted.items()}
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert (len(unet.state_dict()), len(converted)) == tensors
    assert count_parameters(model) == params == sum(p.numel() for p in unet.parameters())
    assert resolution == config["sample_size"]
    path = REFERENCE / reference
    assert path.exists(), f"{path} is missing from the repository"
    rows = [line.split("\t") for line in path.read_text().splitlines() if line[:1] != "#"]
    assert {k: v for k, v in rows} == {k: str(s) for k, s in shapes.items()}


def test_real_layouts_are_the_shipped_configs():
    """google/ddpm-cifar10-32 is configs/cifar10.json's network, the 256 px ones are
    celebahq.json's (up to GroupNorm eps and dropout, which are not architecture)."""
    from ddpmkit.config import find_config_file, load_json

    for unet, dataset in ((CIFAR10_32, "cifar10"), (LAYOUT_256, "celebahq")):
        ours = load_json(find_config_file(dataset))["model"]
        got, _ = model_config_from_unet(unet)
        for key in ("in_channels", "hid_channels", "ch_multipliers", "num_res_blocks",
                    "apply_attn", "block_size"):
            assert got[key] == ours[key], (dataset, key)


@pytest.mark.slow
@pytest.mark.parametrize("config, size", [(CIFAR10_32, 32), (LAYOUT_256, 64)],
                         ids=["cifar10-32", "256px-layout"])
def test_real_layouts_give_the_same_output(tmp_path, config, size):
    """Full-size networks (the 256 px layout run on 64x64 inputs to keep the CPU time down)."""
    unet = save_model_folder(tmp_path, {**config, "sample_size": size})
    model, _ = load_model_from_checkpoint(str(tmp_path))
    ours, theirs = _outputs(unet, model, (3, size, size))
    assert rel_error(ours, theirs) < 1e-5


def _rename_to_legacy(path):
    from safetensors.torch import load_file, save_file

    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in load_file(path).items():
        for new, old in names.items():
            key = key.replace(f".{new}.", f".{old}.")
        tensors[key] = value
    save_file(tensors, path)
    return tensors


def test_legacy_attention_names_bin_and_shards_load(tmp_path, one_thread):
    """query/key/value/proj_attn (diffusers < 0.15, as old Hub uploads), pickled .bin weights
    (read with weights_only) and sharded weights all give the same network."""
    unet = save_model_folder(tmp_path / "new")
    reference, _ = load_model_from_checkpoint(str(tmp_path / "new"))
    save_model_folder(tmp_path / "legacy")
    legacy = _rename_to_legacy(str(tmp_path / "legacy" / "diffusion_pytorch_model.safetensors"))
    assert any(".query." in k for k in legacy)
    save_model_folder(tmp_path / "bin", safe_serialization=False)
    assert os.path.isfile(tmp_path / "bin" / "diffusion_pytorch_model.bin")
    save_model_folder(tmp_path / "shards", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "shards" / "diffusion_pytorch_model.safetensors.index.json")
    expected = reference.state_dict()
    for name in ("legacy", "bin", "shards"):
        model, _ = load_model_from_checkpoint(str(tmp_path / name))
        got = model.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    ours, theirs = _outputs(unet, reference, (3, 8, 8))
    assert rel_error(ours, theirs) < 1e-5


def test_pipeline_folder_and_its_unet_subfolder(tmp_path):
    """DDPMPipeline.save_pretrained's layout; the unet/ folder alone finds ../scheduler."""
    unet = random_unet(TINY)
    scheduler = diffusers.DDPMScheduler(**unet_kwargs({**SCHEDULER_CIFAR10,
                                                       "variance_type": "fixed_small"}))
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp_path))
    for path in (tmp_path, tmp_path / "unet"):
        _, config = load_model_from_checkpoint(str(path))
        assert config["diffusion"]["model_var_type"] == "fixed-small"


# ---- the diffusion -------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", [
    {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    {"beta_schedule": "scaled_linear", "beta_start": 8.5e-4, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid", "beta_start": 1e-4, "beta_end": 0.02},
    {"trained_betas": list(np.linspace(1e-3, 0.05, 1000))},
], ids=["linear", "scaled_linear", "cosine", "sigmoid", "trained"])
def test_scheduler_betas_are_diffusers_betas(scheduler):
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, **scheduler)
    ours = build_diffusion(diffusion_config_from_scheduler(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, **scheduler}))
    # diffusers keeps float32 tables; ddpmkit float64 ones of the same formula. A float32
    # cumprod of 1000 factors drifts by up to ~1000 roundings (6e-5) relative.
    np.testing.assert_allclose(ours.betas, theirs.betas.double().numpy(), rtol=2e-6)
    np.testing.assert_allclose(ours.alphas_bar, theirs.alphas_cumprod.double().numpy(),
                               rtol=1e-4)


@pytest.mark.parametrize("variance, ours_var", [
    ("fixed_small", "fixed-small"), ("fixed_small_log", "fixed-small"),
    ("fixed_large", "fixed-large"), ("fixed_large_log", "fixed-large")])
def test_scheduler_variance_prediction_and_clipping(variance, ours_var):
    got = diffusion_config_from_scheduler({"variance_type": variance, "clip_sample": False,
                                           "prediction_type": "sample"})
    assert (got["model_var_type"], got["model_mean_type"], got["clip_denoised"]) == \
        (ours_var, "x_0", False)
    diffusion = build_diffusion(got)
    assert diffusion.clip_denoised is False
    # DDPMScheduler's step variance at t > 0 is ddpmkit's table entry (at t = 0 no noise).
    theirs = diffusers.DDPMScheduler(variance_type=variance)
    theirs.set_timesteps(1000)
    table = diffusion.posterior_var if ours_var == "fixed-small" else diffusion.fixed_large_var
    for t in (1, 10, 500, 999):
        if variance.endswith("_log"):
            continue  # their _log variants return log / std; the distribution is the same
        # diffusers forms beta_t = 1 - alphas_bar_t / alphas_bar_{t-1} in float32: the
        # cancellation costs ~1e-7 absolute (fixed-small and fixed-large differ by ~beta_t / 2).
        np.testing.assert_allclose(float(theirs._get_variance(t)), table[t], rtol=1e-5,
                                   atol=3e-7)


def test_defaults_without_scheduler_config_are_ddpmschedulers():
    theirs = diffusers.DDPMScheduler()
    got = diffusion_config_from_scheduler(None)
    assert got["model_var_type"] == theirs.config.variance_type.replace("_", "-")
    assert got["clip_denoised"] is theirs.config.clip_sample is True
    assert got["timesteps"] == theirs.config.num_train_timesteps


def _ddpm_parity(tmp_path, scheduler):
    save_model_folder(tmp_path, TINY, scheduler)
    model, config = load_model_from_checkpoint(str(tmp_path))
    return ddpm_pipeline_gap(tmp_path, model, build_diffusion(config["diffusion"]))


@pytest.mark.parametrize("variance, clip", [("fixed_small", False), ("fixed_large", True)])
def test_ddpm_sampling_matches_ddpmpipeline_short(tmp_path, variance, clip, one_thread):
    scheduler = {**SCHEDULER_CIFAR10, "num_train_timesteps": 50, "beta_end": 0.2,
                 "variance_type": variance, "clip_sample": clip}
    assert _ddpm_parity(tmp_path, scheduler) < 1e-4


@pytest.mark.slow
def test_ddpm_1000_matches_ddpmpipeline(tmp_path, one_thread):
    """The Google models' scheduler: T 1000, linear betas, fixed_large, clip_sample."""
    assert _ddpm_parity(tmp_path, SCHEDULER_CIFAR10) < 1e-4


@pytest.mark.parametrize("spacing, eta", [("leading", 0.0), ("trailing", 0.0),
                                           ("leading", 0.5)])
def test_ddim_50_matches_ddimpipeline_with_the_parity_switches(tmp_path, monkeypatch,
                                                               one_thread, spacing, eta):
    """DDIMPipeline on the Google models' scheduler (T 1000, clip_sample) against ddpmkit's
    DDIM with diffusers' spacing, the network's own eps after clipping, and strides of T // S;
    one generator gives x_T and (eta > 0) each step's noise. In float64, with diffusers' time
    embedding and ddpmkit's float64 alphas_bar in both: a network with O(1) random weights
    makes the 50-step ODE chaotic (float32's 1e-6 differences grow to O(1)), which a trained
    denoiser's is not."""
    from diffusers.models.embeddings import get_timestep_embedding

    import ddpmkit.models.unet as unet_module

    monkeypatch.setattr(unet_module, "timestep_embedding", lambda t, dim: get_timestep_embedding(
        t, dim, flip_sin_to_cos=False, downscale_freq_shift=1))
    save_model_folder(tmp_path, TINY, SCHEDULER_CIFAR10)
    model, config = load_model_from_checkpoint(str(tmp_path))
    diffusion = build_diffusion(config["diffusion"])
    scheduler = diffusers.DDIMScheduler.from_config(
        {**SCHEDULER_CIFAR10, "timestep_spacing": spacing})
    pipe = diffusers.DDIMPipeline(unet=diffusers.UNet2DModel.from_pretrained(str(tmp_path))
                                  .double(), scheduler=scheduler)
    # diffusers keeps float32 tables (1e-5 relative from float64 ones after 1000 products);
    # the pipeline rebuilds its scheduler, so set them on the pipeline's
    pipe.scheduler.alphas_cumprod = torch.from_numpy(diffusion.alphas_bar.copy())
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), eta=eta,
                  num_inference_steps=50, output_type="np").images
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn((2, 3, 8, 8), generator=g, dtype=torch.float64)
    sampler = make_sampler(diffusion, "ddim", steps=50, eta=eta, skip_schedule=spacing,
                           eps_from="model", step_to="stride")
    x_0 = sample(diffusion, model.double(), sampler, x_T, generator=g)
    ours = (x_0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert 0.05 < theirs.std()  # a real image, not a constant
    assert np.abs(ours - theirs).max() < 1e-4
    # ddpmkit's own defaults give other images: the switches are what makes them equal
    default = sample(diffusion, model.double(), make_sampler(diffusion, "ddim", steps=50,
                                                             eta=eta), x_T.clone(),
                     generator=torch.Generator().manual_seed(0))
    assert np.abs((default / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() - theirs).max() \
        > 1e-2


# ---- what does not map ---------------------------------------------------------------------
@pytest.mark.parametrize("change, key", [
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"num_class_embeds": 10}, "num_class_embeds"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"add_attention": False}, "add_attention"),
    ({"attention_head_dim": 8}, "attention_head_dim"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"freq_shift": 0}, "freq_shift"),
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"downsample_padding": 1}, "downsample_padding"),
    ({"downsample_type": "resnet"}, "downsample_type"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"mid_block_type": None}, "mid_block_type"),
    ({"mid_block_scale_factor": 2}, "mid_block_scale_factor"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "CrossAttnDownBlock2D"),
    ({"up_block_types": ["AttnSkipUpBlock2D", "UpBlock2D"]}, "AttnSkipUpBlock2D"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, "attention sits"),
    ({"block_out_channels": [16, 24]}, "block_out_channels"),
    ({"out_channels": 6}, "out_channels"),
    ({"attn_norm_num_groups": 4}, "attn_norm_num_groups"),
    ({"_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel"),
    ({"sample_size": [8, 16, 4]}, "sample_size"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unmappable_unet_configs_are_refused_in_one_line(change, key):
    with pytest.raises(UserError) as info:
        model_config_from_unet({**TINY, **change}, "config.json")
    message = str(info.value)
    assert key in message and "\n" not in message


def test_omitted_keys_take_diffusers_defaults():
    """A config.json without freq_shift gets diffusers' default 0, which does not map."""
    config = {k: v for k, v in TINY.items() if k != "freq_shift"}
    with pytest.raises(UserError, match="freq_shift 0"):
        model_config_from_unet(config)
    assert model_config_from_unet({**TINY, "attention_head_dim": 32})[0]["apply_attn"] == \
        [False, True]  # a head dim equal to the channels is one head


@pytest.mark.parametrize("change, key", [
    ({"variance_type": "learned_range"}, "learned_range"),
    ({"variance_type": "learned"}, "learned"),
    ({"thresholding": True}, "thresholding"),
    ({"clip_sample_range": 2.0}, "clip_sample_range"),
    ({"beta_schedule": "laplace"}, "laplace"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
])
def test_unmappable_schedulers_are_refused_in_one_line(change, key):
    with pytest.raises(UserError) as info:
        diffusion_config_from_scheduler({**SCHEDULER_CIFAR10, **change})
    assert key in str(info.value) and "\n" not in str(info.value)


def _break(folder, how):
    unet_dir = folder
    if how == "empty":
        for name in os.listdir(folder):
            os.unlink(folder / name)
        (folder / "model_index.json").write_text("{}")
    elif how == "config not json":
        (unet_dir / "config.json").write_text("{ not json")
    elif how == "autoencoder":
        (unet_dir / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    elif how == "no weights":
        os.unlink(unet_dir / "diffusion_pytorch_model.safetensors")
    elif how == "corrupt weights":
        (unet_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10" + b"\0" * 40)
    elif how == "missing tensor":
        from safetensors.torch import load_file, save_file

        path = str(unet_dir / "diffusion_pytorch_model.safetensors")
        tensors = load_file(path)
        del tensors["mid_block.attentions.0.to_k.weight"]
        save_file(tensors, path)
    elif how == "latent pipeline":
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
            "vqvae": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    elif how == "thresholding scheduler":
        (folder / "scheduler_config.json").write_text(json.dumps(
            {**SCHEDULER_CIFAR10, "thresholding": True}))


@pytest.mark.parametrize("how, expect", [
    ("empty", "no config.json"),
    ("config not json", "as JSON"),
    ("autoencoder", "AutoencoderKL"),
    ("no weights", "no weights"),
    ("corrupt weights", "safetensors"),
    ("missing tensor", "to_k.weight"),
    ("latent pipeline", "vqvae"),
    ("thresholding scheduler", "thresholding"),
])
def test_bad_folders_are_one_line_errors(tmp_path, how, expect):
    save_model_folder(tmp_path)
    _break(tmp_path, how)
    with pytest.raises(UserError) as info:
        load_model_from_checkpoint(str(tmp_path))
    assert expect in str(info.value) and "\n" not in str(info.value)


def test_a_plain_folder_and_a_lone_diffusers_weights_file_are_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a diffusers model folder"):
        load_model_from_checkpoint(str(tmp_path / "plain"))
    save_model_folder(tmp_path / "m")
    with pytest.raises(UserError, match="pass the folder"):
        load_model_from_checkpoint(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("shards", [False, True], ids=["one-file", "sharded"])
def test_fp16_variant_weights_load_into_a_float32_network(tmp_path, shards, one_thread, caplog):
    """`save_pretrained(variant="fp16")` folders (diffusion_pytorch_model.fp16.safetensors, or
    shards named by diffusion_pytorch_model.safetensors.index.fp16.json) load exactly."""
    import logging

    unet = save_model_folder(tmp_path / "f32")
    half = unet.half()
    (tmp_path / "f16").mkdir()
    kwargs = {"max_shard_size": "20KB"} if shards else {}
    half.save_pretrained(str(tmp_path / "f16"), variant="fp16", **kwargs)
    for name in ("scheduler_config.json", "model_index.json"):
        (tmp_path / "f16" / name).write_bytes((tmp_path / "f32" / name).read_bytes())
    index = tmp_path / "f16" / "diffusion_pytorch_model.safetensors.index.fp16.json"
    assert index.is_file() == shards
    with caplog.at_level(logging.INFO):
        model, _ = load_model_from_checkpoint(str(tmp_path / "f16"))
    assert "fp16 weights" in caplog.text
    got = model.state_dict()
    assert all(v.dtype == torch.float32 for v in got.values())
    # every tensor is the fp16 value, exactly: the float32 network computes what diffusers'
    # network computes from the same fp16 weights in float32
    ours, theirs = _outputs(half.float(), model, (3, 8, 8))
    assert rel_error(ours, theirs) < 1e-5
    assert all(torch.equal(v, v.half().float()) for v in got.values())
