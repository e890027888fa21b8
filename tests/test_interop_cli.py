"""`generate` and `eval --metrics bpd` on diffusers folders, exported .safetensors files and Hub
ids (through a fake huggingface_hub cache built here; nothing is downloaded)."""

import json
import os
import pickle
import shutil
import sys
from fnmatch import fnmatch

import numpy as np
import pytest
import torch
from interop_helpers import CIFAR10_32, SCHEDULER_CIFAR10, TINY, save_model_folder
from PIL import Image

from ddpmkit.cli.eval import main as eval_main
from ddpmkit.cli.generate import main as generate_main
from ddpmkit.errors import UserError
from ddpmkit.interop.sources import checkpoint_digest, load_model_from_checkpoint, resolve_checkpoint
from ddpmkit.sampling import MANIFEST_NAME

pytest.importorskip("diffusers")
HUB_ID = "google/ddpm-cifar10-32"
REVISION = "0123456789abcdef0123456789abcdef01234567"
SHORT_SCHEDULER = {**SCHEDULER_CIFAR10, "num_train_timesteps": 10, "beta_end": 0.2}


def _generate(capsys, *argv):
    code = generate_main([*map(str, argv), "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def _pngs(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".png"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "ddpm-tiny"
    save_model_folder(folder, TINY, SHORT_SCHEDULER)
    return folder


def test_generate_from_a_diffusers_folder(tmp_path, tiny_folder, capsys):
    code, out, err = _generate(capsys, "--chkpt-path", tiny_folder, "--total-size", 3,
                               "--batch-size", 2, "--save-dir", tmp_path)
    assert code == 0, err
    folder = tmp_path / "cifar10"
    assert _pngs(folder) == ["000000.png", "000001.png", "000002.png"]
    for name in _pngs(folder):
        with Image.open(folder / name) as im:
            assert im.size == (8, 8) and np.asarray(im).std() > 0
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["checkpoint_sha256"] == checkpoint_digest(str(tiny_folder))
    assert manifest["steps"] == 10  # the scheduler's num_train_timesteps


def test_folder_digest_follows_the_files(tmp_path, tiny_folder):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_folder, copy)
    assert checkpoint_digest(str(copy)) == checkpoint_digest(str(tiny_folder))
    config = json.loads((copy / "scheduler_config.json").read_text())
    (copy / "scheduler_config.json").write_text(json.dumps({**config, "clip_sample": False}))
    assert checkpoint_digest(str(copy)) != checkpoint_digest(str(tiny_folder))


def test_generate_from_an_exported_safetensors_file(tmp_path, tiny_folder, capsys):
    from ddpmkit.cli.export import main as export_main

    out = tmp_path / "tiny.safetensors"
    assert export_main([str(tiny_folder), "--format", "safetensors", str(out)]) == 0
    code, _, err = _generate(capsys, "--chkpt-path", out, "--total-size", 2, "--save-dir",
                             tmp_path / "s", "--sampler", "ddim", "--steps", 3)
    assert code == 0, err
    code, _, err = _generate(capsys, "--chkpt-path", tiny_folder, "--total-size", 2,
                             "--save-dir", tmp_path / "d", "--sampler", "ddim", "--steps", 3)
    assert code == 0, err
    for name in ("000000.png", "000001.png"):  # the same network, the same images
        assert (tmp_path / "s" / "cifar10" / name).read_bytes() == \
            (tmp_path / "d" / "cifar10" / name).read_bytes()


def test_generate_refuses_a_bad_folder_in_one_line(tmp_path, capsys):
    save_model_folder(tmp_path / "m", {**TINY, "attention_head_dim": 8})
    code, _, err = _generate(capsys, "--chkpt-path", tmp_path / "m", "--total-size", 1,
                             "--save-dir", tmp_path)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert "attention_head_dim 8" in err


@pytest.mark.slow
def test_the_ddpm_paper_cifar10_layout_samples_through_generate(tmp_path, capsys):
    """The bar: a UNet2DModel with google/ddpm-cifar10-32's configuration and random weights
    samples into the requested number of PNGs (DDIM, 2 steps, to keep the CPU time down)."""
    save_model_folder(tmp_path / "m", CIFAR10_32, SCHEDULER_CIFAR10)
    code, out, err = _generate(capsys, "--chkpt-path", tmp_path / "m", "--total-size", 3,
                               "--batch-size", 2, "--save-dir", tmp_path, "--sampler", "ddim",
                               "--steps", 2)
    assert code == 0, err
    assert _pngs(tmp_path / "cifar10") == ["000000.png", "000001.png", "000002.png"]
    with Image.open(tmp_path / "cifar10" / "000000.png") as im:
        assert im.size == (32, 32)


# ---- eval --metrics bpd --------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpd-data")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0] * 4}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    return root


def test_bpd_of_a_diffusers_folder(tmp_path, cifar_root, capsys):
    from ddpmkit.build import build_diffusion
    from ddpmkit.data.images import build_dataset
    from ddpmkit.metrics.bpd import dataset_bpd

    folder = tmp_path / "m"
    save_model_folder(folder, {**TINY, "sample_size": 32}, SHORT_SCHEDULER)
    argv = ["--metrics", "bpd", "--chkpt-path", str(folder), "--dataset", "cifar10",
            "--root", str(cifar_root), "--eval-batch-size", "2", "--num-workers", "0",
            "--device", "cpu", "--seed", "7"]
    assert eval_main(argv) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["checkpoint"] == str(folder)
    model, config = load_model_from_checkpoint(str(folder))
    data = build_dataset("cifar10", str(cifar_root), split="test", random_flip=False)
    images = torch.stack([data[i][0] for i in range(4)])
    expected = dataset_bpd(build_diffusion(config["diffusion"]), model,
                           [images[:2], images[2:]], torch.device("cpu"), seed=7)
    assert record["metrics"]["bpd"] == pytest.approx(expected.bpd, rel=1e-9)
    assert 1.0 < record["metrics"]["bpd"] < 30.0


# ---- Hub ids -------------------------------------------------------------------------------
def _fake_cache(cache, source):
    """huggingface_hub's cache layout: models--OWNER--NAME/{refs/main, snapshots/REV/...}."""
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return repo / "snapshots" / REVISION


@pytest.fixture
def hub_cache(tmp_path, tiny_folder, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    snapshot = _fake_cache(cache, tiny_folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never reach the network
    return snapshot


def test_a_hub_id_resolves_through_the_cache(hub_cache, tmp_path, capsys):
    assert os.path.samefile(resolve_checkpoint(HUB_ID), hub_cache)
    code, _, err = _generate(capsys, "--chkpt-path", HUB_ID, "--total-size", 2,
                             "--save-dir", tmp_path / "out", "--sampler", "ddim", "--steps", 2)
    assert code == 0, err
    assert _pngs(tmp_path / "out" / "cifar10") == ["000000.png", "000001.png"]


def test_a_local_path_wins_over_a_hub_id(hub_cache, tmp_path, monkeypatch):
    local = tmp_path / "google" / "ddpm-cifar10-32"
    save_model_folder(local, TINY, SHORT_SCHEDULER)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(HUB_ID) == HUB_ID  # the relative path, as given


def test_bpd_of_a_hub_id_writes_its_metrics_in_the_working_folder(hub_cache, tmp_path,
                                                                  cifar_root, monkeypatch):
    save_model_folder(hub_cache, {**TINY, "sample_size": 32}, SHORT_SCHEDULER)
    monkeypatch.chdir(tmp_path)
    assert eval_main(["--metrics", "bpd", "--chkpt-path", HUB_ID, "--root", str(cifar_root),
                      "--eval-batch-size", "4", "--num-workers", "0", "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["checkpoint"] == HUB_ID


def test_a_hub_id_not_in_the_cache_offline_is_one_line(hub_cache, tmp_path, capsys):
    code, _, err = _generate(capsys, "--chkpt-path", "google/ddpm-church-256",
                             "--total-size", 1, "--save-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert "google/ddpm-church-256" in err and "--local-dir" in err


def test_without_huggingface_hub_a_hub_id_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    code, _, err = _generate(capsys, "--chkpt-path", HUB_ID, "--total-size", 1,
                             "--save-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert "pip install huggingface_hub" in err
    code, _, err = _generate(capsys, "--chkpt-path", "no/such.pt", "--total-size", 1,
                             "--save-dir", tmp_path)
    assert code == 2 and "does not exist" in err  # a file name is never taken for a Hub id


class FakeHub:
    """snapshot_download against a folder standing in for the Hub: copies what the patterns
    allow into a snapshot folder and records every call."""

    def __init__(self, remote, cache):
        self.remote, self.snapshot, self.calls = remote, cache / "snap", []

    def __call__(self, repo_id, cache_dir=None, local_files_only=False, allow_patterns=None,
                 ignore_patterns=None):
        self.calls.append((local_files_only, allow_patterns))
        if local_files_only:
            raise FileNotFoundError("not cached")
        for path in self.remote.rglob("*"):
            name = path.relative_to(self.remote).as_posix()
            if path.is_file() and any(fnmatch(name, p) for p in allow_patterns or ["*"]) \
                    and not any(fnmatch(name, p) for p in ignore_patterns or []):
                (self.snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, self.snapshot / name)
        return str(self.snapshot)


def test_downloads_fetch_configs_first_then_only_the_unet_weights(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    import diffusers

    remote = tmp_path / "remote"
    unet = save_model_folder(tmp_path / "m", TINY, SHORT_SCHEDULER)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(
        num_train_timesteps=10)).save_pretrained(str(remote))
    unet.save_pretrained(str(remote / "unet"), safe_serialization=False)  # a .bin beside
    fake = FakeHub(remote, tmp_path)
    monkeypatch.setattr(hub, "snapshot_download", fake)
    folder = resolve_checkpoint(HUB_ID)
    assert [patterns for _, patterns in fake.calls] == [
        None, ["*.json"], ["unet/diffusion_pytorch_model*.safetensors*"]]
    assert not (tmp_path / "snap" / "unet" / "diffusion_pytorch_model.bin").exists()
    model, _ = load_model_from_checkpoint(folder)
    assert all(torch.equal(model.state_dict()[k], v)
               for k, v in load_model_from_checkpoint(str(tmp_path / "m"))[0]
               .state_dict().items())


def test_a_hub_model_with_only_fp16_weights_downloads_those(tmp_path, monkeypatch):
    """Without plain weights, the fp16 variant is fetched (as a local folder is read)."""
    hub = pytest.importorskip("huggingface_hub")

    remote = tmp_path / "remote"
    save_model_folder(remote, TINY, SHORT_SCHEDULER, variant="fp16")
    assert (remote / "diffusion_pytorch_model.fp16.safetensors").is_file()
    fake = FakeHub(remote, tmp_path)
    monkeypatch.setattr(hub, "snapshot_download", fake)
    folder = resolve_checkpoint(HUB_ID)
    assert [patterns for _, patterns in fake.calls] == [
        None, ["*.json"], ["diffusion_pytorch_model*.safetensors*"],
        ["diffusion_pytorch_model*.bin*"], ["diffusion_pytorch_model*.safetensors*"]]
    model, _ = load_model_from_checkpoint(folder)
    reference, _ = load_model_from_checkpoint(str(remote))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_an_unmappable_hub_model_is_refused_before_its_weights_download(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    save_model_folder(tmp_path / "remote", TINY,
                      {**SCHEDULER_CIFAR10, "thresholding": True})
    fake = FakeHub(tmp_path / "remote", tmp_path)
    monkeypatch.setattr(hub, "snapshot_download", fake)
    with pytest.raises(UserError, match="thresholding"):
        resolve_checkpoint(HUB_ID)
    assert [patterns for _, patterns in fake.calls] == [None, ["*.json"]]
