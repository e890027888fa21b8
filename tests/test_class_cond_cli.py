"""Class conditioning end to end: `train-toy --class-cond`, `train --class-cond`, `generate`
with labels and guidance, `eval --per-class`, and one-line errors for bad labels."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from helpers import one_line_error, randomize_, tiny_config
from PIL import Image

from ddpmkit.checkpoints.files import load_checkpoint, save_checkpoint
from ddpmkit.cli import main as ddpmkit_main
from ddpmkit.models.loading import build_from_config
from ddpmkit.sampling import LABELS_NAME, MANIFEST_NAME


# ---- train-toy ---------------------------------------------------------------------------
def toy_args(tmp_path, *extra, dataset="gaussian8"):
    return ["train-toy", "--dataset", dataset, "--size", "128", "--batch-size", "32",
            "--timesteps", "10", "--mid-features", "16", "--num-temporal-layers", "1",
            "--eval-intv", "1", "--num-eval-samples", "160", "--num-interim-samples", "80",
            "--chkpt-intv", "1", "--log-every", "2", "--no-progress", "--animation-format",
            "none", "--image-dir", str(tmp_path / "img"), "--chkpt-dir", str(tmp_path / "ck"),
            *extra]


def test_train_toy_class_cond_reports_the_requested_mode(tmp_path, capsys):
    rc = ddpmkit_main(toy_args(tmp_path, "--epochs", "2", "--class-cond",
                               "--guidance-scale", "2"))
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("on the requested mode") == 3 and "w 2)" in out  # 2 evals + final
    metrics = json.loads((tmp_path / "img" / "gaussian8" / "metrics.json").read_text())
    assert 0 <= metrics["worst_requested_mode"] <= metrics["on_requested_mode"] <= 1
    assert metrics["guidance_scale"] == 2 and metrics["num_modes"] == 8
    state = load_checkpoint(str(tmp_path / "ck" / "ddpm_gaussian8_2.pt"))
    assert state["model"]["class_embed.weight"].shape == (9, 16)
    assert state["config"]["class_cond"] is True and state["config"]["class_dropout"] == 0.1


def test_train_toy_class_cond_resumes_exactly(tmp_path, capsys):
    extra = ("--class-cond", "--class-dropout", "0.5", "--ema-decay", "0.9", "--eval-intv", "9")
    a, b = tmp_path / "a", tmp_path / "b"
    assert ddpmkit_main(toy_args(a, "--epochs", "4", *extra)) == 0
    assert ddpmkit_main(toy_args(b, "--epochs", "2", *extra)) == 0
    assert ddpmkit_main(toy_args(b, "--epochs", "4", "--resume", *extra)) == 0
    sa = load_checkpoint(str(a / "ck" / "ddpm_gaussian8_4.pt"))
    sb = load_checkpoint(str(b / "ck" / "ddpm_gaussian8_4.pt"))
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key


@pytest.mark.parametrize("flags, needle", [
    (["--class-cond", "--dataset", "swissroll"], "swissroll has none"),
    (["--guidance-scale", "1"], "--guidance-scale needs --class-cond"),
    (["--class-cond", "--guidance-scale", "-1"], "--guidance-scale must be a finite number >= 0"),
    (["--class-cond", "--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--sampler", "heun", "--eta", "0.5"], "--eta applies to ddim only, not to heun"),
    (["--class-cond", "--class-dropout", "1"], "--class-dropout must be in [0, 1)"),
])
def test_train_toy_bad_class_flags(tmp_path, capsys, flags, needle):
    one_line_error(capsys, ddpmkit_main(toy_args(tmp_path, *flags)), needle)


# ---- generate ----------------------------------------------------------------------------
def _checkpoint(folder, num_classes=None, var_type="fixed-large", names=None):
    config = tiny_config()
    config["diffusion"]["model_var_type"] = var_type
    if var_type == "learned":
        config["diffusion"]["loss_type"] = "kl"
    if num_classes:
        config["model"]["num_classes"] = num_classes
        config["dataset"]["class_names"] = names or [f"c{k}" for k in range(num_classes)]
    torch.manual_seed(0)
    model, _ = build_from_config(config)
    randomize_(model, seed=1)
    path = folder / f"ddpm_{num_classes or 0}_{var_type}.pt"
    save_checkpoint({"model": model.state_dict(), "config": config, "step": 1, "epoch": 1},
                    str(path))
    return str(path)


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck"), num_classes=3)


def _generate(capsys, *argv):
    code = ddpmkit_main(["generate", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _pngs(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".png"))


def test_generate_with_labels_and_guidance(tmp_path, conditional_checkpoint, capsys):
    common = ["--chkpt-path", conditional_checkpoint, "--total-size", 7, "--sampler", "ddim",
              "--steps", 3, "--eta", 1.0, "--guidance-scale", 2.5]
    assert _generate(capsys, *common, "--batch-size", 7, "--save-dir", tmp_path / "a",
                     "--grid", "--grid-size", 6)[0] == 0
    assert _generate(capsys, *common, "--batch-size", 3, "--save-dir", tmp_path / "b")[0] == 0
    a, b = tmp_path / "a" / "cifar10", tmp_path / "b" / "cifar10"
    assert sorted(os.listdir(a)) == sorted(_pngs(a) + [MANIFEST_NAME, LABELS_NAME])
    for name in _pngs(a):  # labels, like noise, are a function of the index alone
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    with open(a / LABELS_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], int(r["label"]), r["class"]) for r in rows] == \
        [(f"{i:06d}.png", i % 3, f"c{i % 3}") for i in range(7)]
    manifest = json.loads((a / MANIFEST_NAME).read_text())
    assert manifest["class_labels"] == [0, 1, 2] and manifest["guidance_scale"] == 2.5
    # The grid: one class per row (samples 0, 3 | 1, 4 | 2, 5), 8x8 tiles, 2-pixel padding.
    grid = np.asarray(Image.open(tmp_path / "a" / "cifar10_grid.png"))
    assert grid.shape == (2 + 3 * 10, 2 + 2 * 10, 3)
    for row, indices in enumerate(([0, 3], [1, 4], [2, 5])):
        for col, i in enumerate(indices):
            tile = grid[2 + 10 * row:10 + 10 * row, 2 + 10 * col:10 + 10 * col]
            assert np.array_equal(tile, np.asarray(Image.open(a / f"{i:06d}.png"))), (row, col)
    # Other guidance, other images; a rerun with other labels is refused.
    assert _generate(capsys, *common[:-1], 0, "--save-dir", tmp_path / "c")[0] == 0
    assert (tmp_path / "c" / "cifar10" / "000001.png").read_bytes() != \
        (a / "000001.png").read_bytes()
    code, _, err = _generate(capsys, *common, "--save-dir", tmp_path / "a", "--class-label", 1)
    assert code == 2 and "other settings" in err


def test_generate_one_class_by_name_and_learned_variance(tmp_path, capsys):
    path = _checkpoint(tmp_path, num_classes=3, var_type="learned",
                       names=["cat", "dog", "owl"])
    code, _, err = _generate(capsys, "--chkpt-path", path, "--total-size", 4, "--sampler",
                             "dpm-solver++", "--steps", 3, "--class-label", "owl,0",
                             "--save-dir", tmp_path)
    assert code == 0, err
    with open(tmp_path / "cifar10" / LABELS_NAME, newline="") as f:
        labels = [(int(r["label"]), r["class"]) for r in csv.DictReader(f)]
    assert labels == [(2, "owl"), (0, "cat"), (2, "owl"), (0, "cat")]
    assert json.loads((tmp_path / "cifar10" / MANIFEST_NAME).read_text())["guidance_scale"] == 1


def test_unconditional_checkpoint_samples_as_before(tmp_path, capsys):
    """A checkpoint of the code before class conditioning samples the same images (pixel sums
    measured with that code), with no labels file and the same manifest keys."""
    path = _checkpoint(tmp_path)  # randomize_(seed 1): see _checkpoint
    torch.manual_seed(0)
    model, _ = build_from_config(tiny_config())
    randomize_(model, seed=3)
    save_checkpoint({"model": model.state_dict(), "config": tiny_config(), "step": 1,
                     "epoch": 1}, path)
    assert _generate(capsys, "--chkpt-path", path, "--total-size", 3, "--batch-size", 2,
                     "--sampler", "ddim", "--steps", 4, "--eta", 1, "--save-dir", tmp_path,
                     # the DDIM spacing called `linear` when the sums were measured
                     "--skip-schedule", "linspace")[0] == 0
    folder = tmp_path / "cifar10"
    assert sorted(os.listdir(folder)) == ["000000.png", "000001.png", "000002.png",
                                          MANIFEST_NAME]
    pixels = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(3)])
    assert abs(int(pixels.astype(np.int64).sum()) - 70292) <= 10
    assert "class_labels" not in json.loads((folder / MANIFEST_NAME).read_text())


@pytest.mark.parametrize("flags, needle", [
    (["--class-label", "3"], "class label 3 is out of range: the model knows classes 0..2"),
    (["--class-label", "-1"], "class label -1 is out of range"),
    (["--class-label", "zebra"], "class label 'zebra' is not a number or one of c0, c1, c2"),
    (["--guidance-scale", "-0.5"], "--guidance-scale must be a finite number >= 0"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    (["--class-label", ","], "--class-label needs a class"),
])
def test_generate_bad_labels(tmp_path, conditional_checkpoint, capsys, flags, needle):
    code = ddpmkit_main(["generate", "--chkpt-path", conditional_checkpoint, "--total-size",
                         "2", "--save-dir", str(tmp_path), "--no-progress", *flags])
    one_line_error(capsys, code, needle)
    assert not (tmp_path / "cifar10").exists()


@pytest.mark.parametrize("flags", [["--class-label", "1"], ["--guidance-scale", "2"]])
def test_labels_for_an_unconditional_checkpoint(tmp_path, capsys, flags):
    path = _checkpoint(tmp_path)
    before = sorted(os.listdir(tmp_path))
    code = ddpmkit_main(["generate", "--chkpt-path", path, "--total-size", "2", "--save-dir",
                         str(tmp_path), "--no-progress", *flags])
    one_line_error(capsys, code, "need a class-conditional model, but this checkpoint is "
                                  "unconditional")
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


# ---- train (images) ----------------------------------------------------------------------
TINY = ["--hid-channels", "32", "--ch-multipliers", "1,2", "--num-res-blocks", "1",
        "--apply-attn", "0,0", "--drop-rate", "0", "--timesteps", "10", "--num-workers", "0",
        "--num-save-images", "5", "--warmup", "2", "--log-intv", "1", "--image-size", "32",
        "--batch-size", "4"]


def _image_folder(root, classes=("cats", "dogs"), per_class=3):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png")
    return root


def _train(tmp_path, *extra):
    return ddpmkit_main(["train", "--dataset", "folder", *TINY, "--chkpt-dir",
                         str(tmp_path / "chkpts"), "--image-dir", str(tmp_path / "images"),
                         "--exp-name", "run", *extra])


def test_train_folder_class_cond_then_generate_a_class_by_name(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    assert _train(tmp_path, "--root", str(root), "--class-cond", "--dry-run",
                  "--class-dropout", "0.2") == 0
    (path,) = (tmp_path / "chkpts" / "run").glob("*.pt")
    state = load_checkpoint(str(path))
    assert state["config"]["model"]["num_classes"] == 2
    assert state["config"]["dataset"]["class_names"] == ["cats", "dogs"]
    assert state["config"]["train"]["class_dropout"] == 0.2
    assert state["model"]["class_embed.weight"].shape == (3, 128)
    grid = Image.open(tmp_path / "images" / "run" / "step1.png")
    assert grid.size == (2 + 2 * 34, 2 + 2 * 34)  # 2 classes x 2 images (5 // 2), one per row
    capsys.readouterr()
    code, _, err = _generate(capsys, "--chkpt-path", path, "--total-size", 2, "--sampler",
                             "ddim", "--steps", 2, "--class-label", "dogs",
                             "--save-dir", tmp_path / "gen")
    assert code == 0, err
    labels = (tmp_path / "gen" / "folder" / LABELS_NAME).read_text().splitlines()
    assert labels == ["file,label,class", "000000.png,1,dogs", "000001.png,1,dogs"]


@pytest.mark.parametrize("dataset, setup, needle", [
    ("celeba", None, "dataset 'celeba' has no class labels"),
    ("folder", "one", "needs one subfolder of images per class, at least two"),
])
def test_train_class_cond_needs_labels(tmp_path, capsys, dataset, setup, needle):
    root = tmp_path / "data"
    if setup == "one":
        _image_folder(root, classes=("only",))
    code = ddpmkit_main(["train", "--dataset", dataset, "--root", str(root), *TINY,
                         "--class-cond", "--dry-run", "--chkpt-dir", str(tmp_path / "c")])
    one_line_error(capsys, code, needle)
    assert not (tmp_path / "c").exists()  # a failed start writes nothing


def test_config_num_classes_without_class_cond_is_refused(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"model": {"num_classes": 2}}))
    code = _train(tmp_path, "--root", str(root), "--config-path", str(config), "--dry-run")
    one_line_error(capsys, code, "add --class-cond")


# ---- eval --per-class --------------------------------------------------------------------
def _fake_cifar_test_split(root, labels):
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
    entry = {b"data": data, b"labels": list(labels)}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    return root


def _labeled_samples(folder, labels, names):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(len(labels)):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i:06d}.png")
    rows = ["file,label,class"] + [f"{i:06d}.png,{k},{names[k]}" for i, k in enumerate(labels)]
    (folder / LABELS_NAME).write_text("\n".join(rows) + "\n")


@pytest.fixture
def random_inception(tmp_path, monkeypatch):
    import dataclasses

    from ddpmkit.metrics import inception as inc
    from ddpmkit.metrics import weights as wts

    model = inc.randomize_weights_(inc.FIDInceptionV3(), torch.Generator().manual_seed(3))
    path = str(tmp_path / "random_inception.pth")
    torch.save(model.state_dict(), path)
    spec = dataclasses.replace(wts.INCEPTION_WEIGHTS, sha256=wts.sha256_of_file(path),
                               num_bytes=os.path.getsize(path))
    monkeypatch.setattr(wts, "INCEPTION_WEIGHTS", spec)
    return path


@pytest.mark.slow
def test_eval_per_class(tmp_path, random_inception, capsys):
    from ddpmkit.metrics.evaluate import per_class_fid
    from ddpmkit.metrics.folder import folder_batches
    from ddpmkit.metrics.inception import extract_features, load_fid_inception
    from ddpmkit.metrics.stats import load_reference_stats

    root = _fake_cifar_test_split(tmp_path / "data", [0, 0, 0, 1, 1, 1, 2, 2])
    cifar = ["airplane", "automobile", "bird"]
    _labeled_samples(tmp_path / "eval" / "s", [0, 1, 2, 0, 1, 2], cifar)

    def argv(samples):
        return ["eval", "--dataset", "cifar10", "--root", str(root), "--ref-split", "test",
                "--sample-folder", str(tmp_path / "eval" / samples), "--precomputed-dir",
                str(tmp_path / "pre"), "--inception-weights", random_inception, "--device",
                "cpu", "--num-workers", "0", "--eval-batch-size", "4", "--metrics", "fid",
                "--per-class"]

    assert ddpmkit_main(argv("s")) == 0
    out = capsys.readouterr().out
    assert "FID class 2 (bird):" in out and "FID per class, mean:" in out
    record = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    metrics = record["metrics"]
    assert set(metrics) == {"fid", "fid_class_0", "fid_class_1", "fid_class_2", "fid_class_mean"}
    # The numbers: per-class FID of the samples' features against the cached labelled ones.
    ref = load_reference_stats(str(tmp_path / "pre" / "inception_cifar10_test.npz"))
    assert ref.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    model = load_fid_inception(random_inception, "cpu")
    feats = extract_features(model, folder_batches(str(tmp_path / "eval" / "s"), 4))
    expected = per_class_fid(feats.pool, [0, 1, 2, 0, 1, 2], ref)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6)
    # Samples of other classes than the reference's are refused before any work.
    _labeled_samples(tmp_path / "eval" / "t", [0, 1], ["cat", "dog"])
    code = ddpmkit_main(argv("t"))
    one_line_error(capsys, code, "the samples' classes do not match cifar10's (0 is 'cat' "
                                  "there, 'airplane' in cifar10)")


@pytest.mark.parametrize("extra, needle", [
    (["--ref-folder", "x"], "a --ref-folder has no labels"),
    ([], "has no labels.csv"),
])
def test_eval_per_class_errors(tmp_path, capsys, extra, needle):
    folder = tmp_path / "s"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "000000.png")
    code = ddpmkit_main(["eval", "--dataset", "cifar10", "--sample-folder", str(folder),
                         "--per-class", "--inception-weights", str(tmp_path / "none.pth"),
                         "--device", "cpu", "--num-workers", "0", *extra])
    one_line_error(capsys, code, needle)


@pytest.mark.parametrize("flags", [["--class-dropout", "0.2"], ["--guidance-scale", "2"]])
def test_train_class_flags_without_class_cond(tmp_path, capsys, flags):
    root = _image_folder(tmp_path / "data")
    code = _train(tmp_path, "--root", str(root), "--dry-run", *flags)
    one_line_error(capsys, code, "applies to class-conditional runs: add --class-cond")
    assert not (tmp_path / "chkpts").exists() and not (tmp_path / "images").exists()


def test_diffusers_export_refuses_a_class_conditional_model(tmp_path, capsys,
                                                          conditional_checkpoint):
    code = ddpmkit_main(["export", conditional_checkpoint, "--format", "diffusers",
                         str(tmp_path / "out")])
    one_line_error(capsys, code, "class-conditional model has no DDPMPipeline equivalent")
    assert not (tmp_path / "out").exists()
    assert ddpmkit_main(["export", conditional_checkpoint, "--format", "safetensors",
                         str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    code, _, err = _generate(capsys, "--chkpt-path", tmp_path / "m.safetensors", "--total-size",
                             1, "--sampler", "ddim", "--steps", 1, "--save-dir", tmp_path)
    assert code == 0, err
    assert (tmp_path / "cifar10" / LABELS_NAME).read_text().splitlines()[1] == "000000.png,0,c0"
