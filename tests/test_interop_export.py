"""`ddpmkit export`: a ddpmkit checkpoint becomes a diffusers pipeline folder that diffusers
loads and runs with the same network output and DDPM samples, or a .safetensors file that
ddpmkit loads back; what has no diffusers equivalent is refused; output is never half-written."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import randomize_, rel_error, tiny_config
from interop_helpers import ddpm_pipeline_gap

from ddpmkit.build import build_diffusion
from ddpmkit.checkpoints.files import save_checkpoint
from ddpmkit.cli.export import main as export_main
from ddpmkit.errors import UserError
from ddpmkit.interop.export import export_checkpoint
from ddpmkit.interop.sources import load_model_from_checkpoint
from ddpmkit.models.loading import build_from_config
from ddpmkit.models.unet import MODEL_DEFAULTS
from ddpmkit.utils.io import OWNED_MARKER

diffusers = pytest.importorskip("diffusers")


def _checkpoint(path, config=None, ema=True):
    """A trainer-style checkpoint with distinct O(1) raw and EMA weights. Returns the models."""
    config = config or tiny_config()
    raw = randomize_(build_from_config(config)[0], seed=1).eval()
    avg = randomize_(build_from_config(config)[0], seed=2).eval()
    state = {"model": raw.state_dict(), "config": config, "step": 1, "epoch": 1}
    if ema:
        state["ema"] = {"decay": 0.999, "num_updates": 1, "shadow": avg.state_dict()}
    save_checkpoint(state, str(path))
    return raw, avg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    raw, avg = _checkpoint(root / "ddpm.pt")
    result = export_checkpoint(str(root / "ddpm.pt"), str(root / "out"), "diffusers")
    return root, raw, avg, result


def _eps(model, x, t):
    with torch.no_grad():
        out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def test_diffusers_export_is_the_same_network(exported, one_thread):
    root, _, avg, result = exported
    assert result.weights == "ema" and result.format == "diffusers"
    assert sorted(os.listdir(root / "out")) == [OWNED_MARKER, "model_index.json", "scheduler", "unet"]
    unet = diffusers.UNet2DModel.from_pretrained(str(root / "out"), subfolder="unet").eval()
    x, t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)), \
        torch.tensor([0, 4, 9])
    theirs, ours = _eps(unet, x, t), _eps(avg, x, t)
    assert ours.abs().mean() > 0.1 and rel_error(theirs, ours) < 1e-5


def test_diffusers_scheduler_is_the_same_diffusion(exported):
    root = exported[0]
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(root / "out"), subfolder="scheduler")
    diffusion = build_diffusion(tiny_config()["diffusion"])
    np.testing.assert_allclose(scheduler.betas.double().numpy(), diffusion.betas, rtol=1e-6)
    assert scheduler.config.variance_type == "fixed_large"
    assert scheduler.config.clip_sample is True
    assert scheduler.config.prediction_type == "epsilon"


def test_ddpmpipeline_samples_the_exported_model_like_ddpmkit(exported, one_thread):
    root, _, avg, _ = exported
    assert ddpm_pipeline_gap(root / "out", avg, build_diffusion(tiny_config()["diffusion"])) < 1e-4


def test_ddimpipeline_loads_and_runs_the_export(exported, one_thread):
    pipe = diffusers.DDIMPipeline.from_pretrained(str(exported[0] / "out"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0),
                  num_inference_steps=5, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all() and images.std() > 0.05


def test_diffusers_export_loads_back_exactly(exported):
    root, _, avg, _ = exported
    model, config = load_model_from_checkpoint(str(root / "out"))
    expected = avg.state_dict()
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    assert config["model"] == {**MODEL_DEFAULTS, **tiny_config()["model"]}
    original = tiny_config()["diffusion"]
    assert {k: config["diffusion"][k] for k in original} == original


def test_no_ema_exports_the_raw_weights(tmp_path):
    raw, _ = _checkpoint(tmp_path / "c.pt")
    result = export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "out"), "diffusers",
                               use_ema=False)
    model, _ = load_model_from_checkpoint(str(tmp_path / "out"))
    assert result.weights == "model"
    assert all(torch.equal(v, raw.state_dict()[k]) for k, v in model.state_dict().items())


def test_safetensors_export_round_trip(tmp_path):
    from safetensors import safe_open

    _, avg = _checkpoint(tmp_path / "c.pt")
    out = tmp_path / "model.safetensors"
    result = export_checkpoint(str(tmp_path / "c.pt"), str(out), "safetensors")
    assert result.weights == "ema"
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ddpmkit.weights"] == "ema"
    assert json.loads(metadata["ddpmkit.config"])["model"] == tiny_config()["model"]
    for use_ema in (False, True):  # one set of weights: used either way
        model, config = load_model_from_checkpoint(str(out), use_ema=use_ema)
        assert all(torch.equal(v, avg.state_dict()[k]) for k, v in model.state_dict().items())
        assert config["diffusion"] == tiny_config()["diffusion"]


def test_x_0_models_export_as_prediction_type_sample(tmp_path, one_thread):
    config = tiny_config()
    config["diffusion"]["model_mean_type"] = "x_0"
    config["diffusion"]["model_var_type"] = "fixed-small"
    _, avg = _checkpoint(tmp_path / "c.pt", config)
    export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "out"), "diffusers")
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["variance_type"]) == ("sample", "fixed_small")
    assert ddpm_pipeline_gap(tmp_path / "out", avg, build_diffusion(config["diffusion"])) < 1e-4


@pytest.mark.parametrize("schedule, expect", [
    ({"beta_schedule": "quad"}, "scaled_linear"),
    ({"beta_schedule": "cosine"}, "squaredcos_cap_v2"),
    ({"beta_schedule": "warmup10"}, "trained_betas"),
    ({"beta_schedule": "jsd"}, "trained_betas"),
    ({"beta_schedule": "custom", "betas": list(np.linspace(0.01, 0.3, 10))}, "trained_betas"),
])
def test_beta_schedules_export_exactly(tmp_path, schedule, expect):
    config = tiny_config()
    config["diffusion"].update(schedule)
    _checkpoint(tmp_path / "c.pt", config)
    export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "out"), "diffusers")
    written = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert expect in (written["beta_schedule"], "trained_betas" if written["trained_betas"]
                      else None)
    theirs = diffusers.DDPMScheduler.from_pretrained(str(tmp_path / "out"),
                                                     subfolder="scheduler")
    np.testing.assert_allclose(theirs.betas.double().numpy(),
                               build_diffusion(config["diffusion"]).betas, rtol=2e-6)


@pytest.mark.parametrize("change, expect", [
    ({"model": {"block_size": 2}}, "block_size 2"),
    ({"diffusion": {"model_var_type": "learned", "loss_type": "kl"}}, "learned"),
    ({"diffusion": {"model_mean_type": "mean"}}, "'mean'"),
])
def test_unexportable_models_are_refused_in_one_line(tmp_path, change, expect):
    config = tiny_config()
    for section, values in change.items():
        config[section].update(values)
    _checkpoint(tmp_path / "c.pt", config)
    with pytest.raises(UserError) as info:
        export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "out"), "diffusers")
    assert expect in str(info.value) and "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # nothing written, no temp folder left


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    _, avg = _checkpoint(tmp_path / "c.pt")
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    export_checkpoint(str(tmp_path / "c.pt"), str(out), "diffusers")
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="--overwrite"):
        export_checkpoint(str(tmp_path / "c.pt"), str(out), "diffusers")
    # An export holding a file it did not write is not replaced, even with --overwrite.
    with pytest.raises(UserError, match="did not write .mine.txt"):
        export_checkpoint(str(tmp_path / "c.pt"), str(out), "diffusers", overwrite=True)
    assert (out / "mine.txt").read_text() == "keep"
    (out / "mine.txt").unlink()
    export_checkpoint(str(tmp_path / "c.pt"), str(out), "diffusers", overwrite=True)
    assert (out / "unet" / "config.json").exists()
    (tmp_path / "w.safetensors").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "w.safetensors"), "safetensors")
    with pytest.raises(UserError, match="not a file ddpmkit wrote"):
        export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "w.safetensors"), "safetensors",
                          overwrite=True)
    assert (tmp_path / "w.safetensors").read_text() == "x"
    with pytest.raises(UserError, match="is a folder"):
        export_checkpoint(str(tmp_path / "c.pt"), str(out), "safetensors", overwrite=True)
    export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "m.safetensors"), "safetensors")
    export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "m.safetensors"), "safetensors",
                      overwrite=True)  # its own earlier export is replaced
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "m.safetensors", "out", "w.safetensors"]


def test_a_failed_export_leaves_the_previous_one(tmp_path, monkeypatch):
    import ddpmkit.interop.diffusers_folder as folder_module

    _checkpoint(tmp_path / "c.pt")
    export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "out"), "diffusers")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def fail(folder, *args):
        os.makedirs(os.path.join(folder, "unet"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder_module, "write_pipeline_folder", fail)
    with pytest.raises(UserError, match="cannot write .*No space left on device"):
        export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "out"), "diffusers",
                          overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ---- the command ---------------------------------------------------------------------------
def test_export_command(tmp_path, capsys):
    raw, _ = _checkpoint(tmp_path / "c.pt")
    assert export_main([str(tmp_path / "c.pt"), "--format", "diffusers", str(tmp_path / "d"),
                        "--no-ema"]) == 0
    assert "model weights" in capsys.readouterr().out
    unet = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "d"), subfolder="unet").eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])
    assert rel_error(_eps(unet, x, t), _eps(raw, x, t)) < 1e-5
    # again: refused in one line, exit status 2
    assert export_main([str(tmp_path / "c.pt"), "--format", "diffusers",
                        str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--overwrite" in err and "\n" not in err
    assert export_main([str(tmp_path / "c.pt"), "--format", "onnx", str(tmp_path / "e")]) == 2
    assert export_main([str(tmp_path / "missing.pt"), "--format", "safetensors",
                        str(tmp_path / "e.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_of_a_bare_state_dict_takes_the_architecture_from_a_config(tmp_path, capsys):
    config = tiny_config()
    model = randomize_(build_from_config(config)[0])
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "bare.pt")
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    out = tmp_path / "m.safetensors"
    assert export_main([str(tmp_path / "bare.pt"), "--format", "safetensors", str(out)]) == 2
    assert "--config-path" in capsys.readouterr().err
    assert export_main([str(tmp_path / "bare.pt"), "--format", "safetensors", str(out),
                        "--config-path", str(tmp_path / "tiny.json")]) == 0
    loaded, _ = load_model_from_checkpoint(str(out))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("schedule", [{"beta_schedule": "linear"}, {"beta_schedule": "jsd"}])
def test_v_models_with_zero_terminal_snr_export_and_import(tmp_path, one_thread, schedule):
    """v as prediction_type v_prediction, zero terminal SNR as rescale_betas_zero_snr (a
    custom schedule's trained_betas written before the rescaling diffusers applies to them);
    DDPMPipeline samples what ddpmkit does, and the folder imports back to the same config."""
    config = tiny_config()
    config["diffusion"].update(schedule, model_mean_type="v", model_var_type="fixed-small",
                               zero_terminal_snr=True)
    _, avg = _checkpoint(tmp_path / "c.pt", config)
    export_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "out"), "diffusers")
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["rescale_betas_zero_snr"]) == \
        ("v_prediction", True)
    diffusion = build_diffusion(config["diffusion"])
    assert diffusion.alphas_bar[-1] == 0
    theirs = diffusers.DDPMScheduler.from_pretrained(str(tmp_path / "out" / "scheduler"))
    np.testing.assert_allclose(theirs.alphas_cumprod.numpy(), diffusion.alphas_bar,
                               rtol=2e-5, atol=1e-7)  # diffusers' tables are float32
    assert ddpm_pipeline_gap(tmp_path / "out", avg, diffusion) < 1e-4
    _, imported = load_model_from_checkpoint(str(tmp_path / "out"))
    again = build_diffusion(imported["diffusion"])
    assert (again.model_mean_type, again.zero_terminal_snr) == ("v", True)
    np.testing.assert_allclose(again.alphas_bar, diffusion.alphas_bar, rtol=1e-12, atol=1e-15)
