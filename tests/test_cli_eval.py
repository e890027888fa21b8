"""`ddpmkit eval` end to end on tiny PNG folders, with random Inception weights.

The CLI accepts only the real weights file (its sha256 is a module constant); the tests compute
the hash of their random file and substitute it for that constant.
"""

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_inception_weights
from PIL import Image

from ddpmkit.cli import eval as cli_eval
from ddpmkit.errors import UserError
from ddpmkit.metrics import inception as inc
from ddpmkit.metrics import weights as wts
from ddpmkit.metrics.stats import save_reference_stats, stats_from_features

ROOT = Path(__file__).resolve().parents[1]
README_FLAGS = ["--root", "--dataset", "--model-device", "--eval-device", "--eval-batch-size",
                "--eval-total-size", "--num-workers", "--nhood-size", "--row-batch-size",
                "--col-batch-size", "--device", "--eval-dir", "--precomputed-dir", "--metrics",
                "--seed", "--folder-name"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(path, spec) of random Inception weights and the spec that accepts them."""
    return random_inception_weights(tmp_path_factory.mktemp("weights"), seed=3)


@pytest.fixture
def accept_random_weights(weights, monkeypatch):
    monkeypatch.setattr(wts, "INCEPTION_WEIGHTS", weights[1])
    return weights[0]


def _write_pngs(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i:03d}.png")


def _arrays(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _common(weights_path):
    return ["--inception-weights", weights_path, "--device", "cpu", "--num-workers", "0",
            "--eval-batch-size", "4"]


def test_parser_has_the_reference_flags():
    parser = cli_eval.build_parser()
    options = {s for action in parser._actions for s in action.option_strings}
    assert set(README_FLAGS) | {"--sample-folder", "--ref-folder", "--inception-weights"} <= options
    args = parser.parse_args([])
    assert (args.eval_dir, args.precomputed_dir, args.metrics, args.nhood_size) == \
        ("./images/eval", "./precomputed", ["fid", "pr"], 3)
    assert (args.row_batch_size, args.col_batch_size, args.seed) == (10000, 10000, 1234)
    assert parser.parse_args(["--metrics", "bpd"]).metrics == ["bpd"]
    with pytest.raises(UserError, match="invalid choice"):
        parser.parse_args(["--metrics", "nll"])


def test_devices_and_sample_folder_spellings():
    parser = cli_eval.build_parser()
    args = parser.parse_args(["--device", "cpu"])
    assert cli_eval.devices_of(args) == (torch.device("cpu"), torch.device("cpu"))
    args = parser.parse_args(["--device", "cuda:7", "--model-device", "cpu", "--eval-device",
                              "cpu"])
    assert cli_eval.devices_of(args) == (torch.device("cpu"), torch.device("cpu"))
    args = parser.parse_args(["--eval-dir", "runs/eval", "--dataset", "celeba"])
    assert cli_eval.sample_folder_of(args) == os.path.join("runs/eval", "celeba")
    args = parser.parse_args(["--eval-dir", "runs/eval", "--folder-name", "celeba_600"])
    assert cli_eval.sample_folder_of(args) == os.path.join("runs/eval", "celeba_600")
    args = parser.parse_args(["--sample-folder", "elsewhere/x"])
    assert cli_eval.sample_folder_of(args) == "elsewhere/x"


def test_eval_against_a_reference_folder(tmp_path, accept_random_weights, capsys):
    images = _arrays(3, 16, 0)
    _write_pngs(tmp_path / "eval" / "samples", images)
    _write_pngs(tmp_path / "real", images)  # the same images: FID 0, precision = recall = 1
    metrics_file = tmp_path / "eval" / "metrics.jsonl"
    metrics_file.write_text('{"earlier": "run"}\n')
    argv = ["--eval-dir", str(tmp_path / "eval"), "--folder-name", "samples",
            "--ref-folder", str(tmp_path / "real"), "--metrics", "fid", "pr", "kid", "is",
            "--nhood-size", "1", "--kid-subsets", "2", "--kid-subset-size", "3",
            "--is-splits", "3", *_common(accept_random_weights)]
    assert cli_eval.main(argv) == 0
    out = capsys.readouterr().out
    assert "FID:" in out and "Precision: 1" in out and "Recall: 1" in out and "IS:" in out
    lines = metrics_file.read_text().splitlines()
    assert len(lines) == 2  # appended
    record = json.loads(lines[1])
    assert record["folder_name"] == "samples" and record["num_samples"] == 3
    assert record["reference"] == f"folder:{tmp_path / 'real'}"
    assert record["extractor"].endswith(wts.INCEPTION_WEIGHTS.sha256)
    results = record["metrics"]
    assert abs(results["fid"]) < 1e-6
    assert results["precision"] == results["recall"] == 1.0
    # unbiased MMD^2 of a set with itself is negative: k(x, x) counts in K_XY, not in K_XX
    assert results["kid_mean"] < 0 and np.isfinite(results["kid_std"])
    assert results["is_mean"] >= 1.0 - 1e-9


@pytest.fixture
def fake_dataset_module(monkeypatch):
    """Stands in for ddpmkit.data.images: build_dataset returns a small dataset in [-1, 1]."""
    state = {"size": 3, "items_read": 0, "missing": False}
    base = torch.from_numpy(_arrays(4, 12, 1)).permute(0, 3, 1, 2).float() / 127.5 - 1

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return state["size"]

        def __getitem__(self, i):
            state["items_read"] += 1
            return base[i], 0

    def build_dataset(name, root, split="train", image_size=None, download=False,
                      random_flip=None):
        assert (name, split, image_size, random_flip, download) == \
            ("cifar10", "train", None, False, False)
        if state["missing"]:
            raise UserError("cifar10 not found under ROOT")
        return Tiny()

    module = types.ModuleType("ddpmkit.data.images")
    module.build_dataset = build_dataset
    monkeypatch.setitem(sys.modules, "ddpmkit.data.images", module)
    return state


def _dataset_argv(tmp_path, weights_path):
    _write_pngs(tmp_path / "eval" / "cifar10", _arrays(2, 16, 2))
    # KID and precision/recall: cheap on a handful of images (a 2048-d FID takes seconds)
    return ["--dataset", "cifar10", "--root", str(tmp_path), "--eval-dir", str(tmp_path / "eval"),
            "--precomputed-dir", str(tmp_path / "pre"), "--metrics", "kid", "pr",
            "--nhood-size", "1", "--kid-subsets", "3", "--kid-subset-size", "2",
            *_common(weights_path)]


def _last_record(tmp_path):
    return json.loads((tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
def test_compile_flag_compiles_inception(tmp_path, accept_random_weights, capsys,
                                         monkeypatch):
    from ddpmkit.metrics.inception import FIDInceptionV3

    compiled = []
    # the real compile is exercised in test_metrics_inception (slow); here only the wiring
    monkeypatch.setattr(FIDInceptionV3, "compile_frozen",
                        lambda self: compiled.append(self) or self)
    _write_pngs(tmp_path / "eval" / "s", _arrays(3, 8, 4))
    argv = ["--eval-dir", str(tmp_path / "eval"), "--folder-name", "s", "--metrics", "fid",
            "--ref-folder", str(tmp_path / "eval" / "s"), *_common(accept_random_weights)]
    assert cli_eval.main(argv) == 0 and not compiled
    assert cli_eval.main([*argv, "--compile"]) == 0 and len(compiled) == 1
    assert "FID:" in capsys.readouterr().out


def test_eval_against_a_dataset_caches_its_statistics(tmp_path, accept_random_weights,
                                                      fake_dataset_module):
    argv = _dataset_argv(tmp_path, accept_random_weights)
    state = fake_dataset_module
    assert cli_eval.main(argv) == 0
    assert (tmp_path / "pre" / "inception_cifar10_train.npz").is_file()
    assert state["items_read"] == 3
    first = _last_record(tmp_path)
    assert first["reference"] == "cifar10/train" and first["num_reference"] == 3
    assert cli_eval.main(argv) == 0
    assert state["items_read"] == 3  # statistics came from the cache
    assert _last_record(tmp_path)["metrics"] == first["metrics"]
    state["size"] = 4  # the dataset changed: the cache is stale and is recomputed
    assert cli_eval.main(argv) == 0
    assert state["items_read"] == 3 + 4
    third = _last_record(tmp_path)
    assert third["num_reference"] == 4
    assert third["metrics"]["kid_mean"] != first["metrics"]["kid_mean"]


def test_eval_without_the_dataset(tmp_path, accept_random_weights, fake_dataset_module,
                                  capsys):
    argv = _dataset_argv(tmp_path, accept_random_weights)
    fake_dataset_module["missing"] = True
    assert cli_eval.main(argv) == 2  # no dataset, no cache: a clear error, before any work
    err = capsys.readouterr().err
    assert "cifar10 not found" in err and "--ref-folder" in err
    # a cache made by this extractor still serves when the dataset cannot be opened
    features = np.random.default_rng(0).normal(size=(5, 2048)).astype(np.float32)
    extractor = inc.extractor_identity(wts.INCEPTION_WEIGHTS.sha256)
    save_reference_stats(stats_from_features(features, extractor, "cifar10/train", (32, 32)),
                         str(tmp_path / "pre" / "inception_cifar10_train.npz"))
    assert cli_eval.main(argv) == 0
    assert _last_record(tmp_path)["num_reference"] == 5
    assert fake_dataset_module["items_read"] == 0


def test_cli_refuses_weights_with_the_wrong_hash(tmp_path, weights, capsys):
    _write_pngs(tmp_path / "eval" / "cifar10", _arrays(2, 8, 3))
    argv = ["--eval-dir", str(tmp_path / "eval"), "--ref-folder", str(tmp_path / "eval"),
            *_common(weights[0])]
    assert cli_eval.main(argv) == 2  # no test substitution of the hash here
    err = capsys.readouterr().err
    assert err.startswith("error: Inception weights") and "expected" in err


def test_cli_offline_without_weights_says_where_to_put_them(tmp_path, monkeypatch, capsys):
    _write_pngs(tmp_path / "eval" / "cifar10", _arrays(2, 8, 4))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(wts, "INCEPTION_WEIGHTS", dataclasses.replace(
        wts.INCEPTION_WEIGHTS, url="http://127.0.0.1:9/pt_inception.pth"))
    argv = ["--eval-dir", str(tmp_path / "eval"), "--device", "cpu", "--num-workers", "0"]
    assert cli_eval.main(argv) == 2
    err = capsys.readouterr().err
    expected = tmp_path / "torch" / "hub" / "checkpoints" / wts.INCEPTION_WEIGHTS.filename
    assert str(expected) in err and "--inception-weights" in err


@pytest.mark.parametrize("extra, message", [
    (["--metrics", "kid"], "--kid-subset-size"),
    (["--metrics", "is"], "--is-splits"),
    (["--metrics", "pr", "--nhood-size", "3"], "--nhood-size 3"),
])
def test_cli_too_few_images(tmp_path, accept_random_weights, capsys, extra, message):
    _write_pngs(tmp_path / "eval" / "s", _arrays(3, 8, 5))
    argv = ["--eval-dir", str(tmp_path / "eval"), "--folder-name", "s",
            "--ref-folder", str(tmp_path / "eval" / "s"), *_common(accept_random_weights), *extra]
    assert cli_eval.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--folder-name", "nope"], "does not exist"),
    (["--folder-name", "a", "--sample-folder", "b"], "not both"),
    (["--nhood-size", "0"], "--nhood-size"),
    (["--tf32"], "--tf32 needs Inception on a CUDA GPU"),
])
def test_cli_user_errors(tmp_path, capsys, argv, message):
    assert cli_eval.main(["--eval-dir", str(tmp_path), "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_eval_py_shim_help():
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--help"], cwd=ROOT,
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert all(flag in result.stdout for flag in README_FLAGS + ["--sample-folder"])
