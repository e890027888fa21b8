"""KID and IS equal torch-fidelity's defaults: the same subsets and splits from the same seed.

torch-fidelity (a test-only dependency) draws each KID subset of input1 (the samples) before
input2's, from `RandomState(2020)`, and shuffles the IS logits with the same seed before
splitting. Unit tests compare on the same features; the end-to-end test runs `ddpmkit eval`
and `torch_fidelity.calculate_metrics` on the same two PNG folders with the same random-weight
Inception (the CLI accepts only the real weights' hash: the test substitutes its file's, as
test_cli_eval.py does).
"""

import json

import numpy as np
import pytest
import torch
from helpers import random_inception_weights
from PIL import Image

from ddpmkit.cli import eval as cli_eval
from ddpmkit.metrics import weights as wts
from ddpmkit.metrics.evaluate import compute_metrics
from ddpmkit.metrics.inception import InceptionFeatures
from ddpmkit.metrics.kid_is import inception_score, kernel_inception_distance
from ddpmkit.metrics.stats import stats_from_features

metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
metric_isc = pytest.importorskip("torch_fidelity.metric_isc")

KID_MEAN, KID_STD = "kernel_inception_distance_mean", "kernel_inception_distance_std"
IS_MEAN, IS_STD = "inception_score_mean", "inception_score_std"


def _features(n, d, seed, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


# ---- on the same features -------------------------------------------------------------------
def test_kid_default_seed_and_order_are_torch_fidelitys():
    samples, real = _features(90, 16, 0), _features(70, 16, 1, shift=0.3)
    theirs = metric_kid.kid_features_to_metric(  # rng_seed: torch-fidelity's default
        torch.from_numpy(samples), torch.from_numpy(real), kid_subsets=30, kid_subset_size=40,
        verbose=False)
    ours = kernel_inception_distance(samples, real, num_subsets=30, subset_size=40)
    assert ours.mean == pytest.approx(theirs[KID_MEAN], rel=1e-12)
    assert ours.std == pytest.approx(theirs[KID_STD], rel=1e-10)
    # the draw order matters: the reference first gives other subsets and another number
    swapped = kernel_inception_distance(real, samples, num_subsets=30, subset_size=40)
    assert abs(swapped.mean - ours.mean) > 1e-3 * abs(ours.mean)
    other_seed = kernel_inception_distance(samples, real, num_subsets=30, subset_size=40,
                                           seed=1234)
    assert abs(other_seed.mean - ours.mean) > 1e-3 * abs(ours.mean)


def test_is_default_shuffle_is_torch_fidelitys():
    logits = torch.from_numpy(_features(103, 50, 2) * 3).float()
    theirs = metric_isc.isc_features_to_metric(logits)  # splits 10, shuffle, seed 2020
    ours = inception_score(logits.numpy())
    assert ours.mean == pytest.approx(theirs[IS_MEAN], rel=1e-12)
    assert ours.std == pytest.approx(theirs[IS_STD], rel=1e-9)
    unshuffled = inception_score(logits.numpy(), shuffle=False)
    assert abs(unshuffled.std - ours.std) > 1e-3 * ours.std


def test_is_stays_finite_where_torch_fidelity_gives_nan():
    """A class no image predicts: p(y) underflows to 0 in torch-fidelity's linear domain and
    0 * log 0 is NaN; the log-domain p(y) keeps it a 0 term."""
    logits = torch.full((8, 4), -1e4)
    logits[:, 0] = 1e4  # every image certain of class 0
    logits[:4, 1] = 0.0
    theirs = metric_isc.isc_features_to_metric(logits, splits=2)
    ours = inception_score(logits.numpy(), splits=2)
    assert np.isnan(theirs[IS_MEAN])
    assert ours.mean == pytest.approx(1.0, abs=1e-12)


def test_compute_metrics_passes_samples_first_and_the_rng_seed():
    samples = InceptionFeatures(_features(60, 8, 3).astype(np.float32),
                                _features(60, 5, 4).astype(np.float32))
    real = stats_from_features(_features(50, 8, 5, shift=0.2).astype(np.float32), "test",
                               "test", (8, 8))
    got = compute_metrics(samples, real, ["kid", "is"], kid_subsets=10, kid_subset_size=20,
                          is_splits=4)
    kid = metric_kid.kid_features_to_metric(
        torch.from_numpy(samples.pool).double(), torch.from_numpy(real.features).double(),
        kid_subsets=10, kid_subset_size=20, verbose=False)
    isc = metric_isc.isc_features_to_metric(torch.from_numpy(samples.logits_unbiased), splits=4)
    assert got["kid_mean"] == pytest.approx(kid[KID_MEAN], rel=1e-12)
    assert got["kid_std"] == pytest.approx(kid[KID_STD], rel=1e-10)
    assert got["is_mean"] == pytest.approx(isc[IS_MEAN], rel=1e-12)
    assert got["is_std"] == pytest.approx(isc[IS_STD], rel=1e-9)
    seeded = compute_metrics(samples, real, ["kid"], kid_subsets=10, kid_subset_size=20,
                             rng_seed=7)
    assert seeded["kid_mean"] != got["kid_mean"]


# ---- end to end: two folders, the CLI against torch_fidelity.calculate_metrics ---------------
@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("weights"), seed=11)


def _write_pngs(folder, n, seed, shift):
    """Smooth random images (a coarse grid, upsampled), brighter by `shift`."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 200, (4, 4, 3)) + shift
        image = np.kron(coarse, np.ones((4, 4, 1))).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:03d}.png")


@pytest.mark.slow
def test_eval_cli_kid_and_is_equal_torch_fidelity_on_two_folders(tmp_path, random_weights,
                                                                  monkeypatch, capsys):
    torch_fidelity = pytest.importorskip("torch_fidelity")
    path, spec = random_weights
    monkeypatch.setattr(wts, "INCEPTION_WEIGHTS", spec)
    samples, real = tmp_path / "eval" / "samples", tmp_path / "real"
    _write_pngs(samples, 14, 0, 0)
    _write_pngs(real, 12, 1, 40)
    argv = ["--sample-folder", str(samples), "--ref-folder", str(real), "--metrics", "kid", "is",
            "--kid-subsets", "6", "--kid-subset-size", "8", "--is-splits", "3",
            "--inception-weights", path, "--device", "cpu", "--num-workers", "0",
            "--eval-batch-size", "7"]
    assert cli_eval.main(argv) == 0
    capsys.readouterr()
    ours = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    ours = ours["metrics"]
    theirs = torch_fidelity.calculate_metrics(
        input1=str(samples), input2=str(real), cuda=False, isc=True, kid=True, verbose=False,
        kid_subsets=6, kid_subset_size=8, isc_splits=3, feature_extractor_weights_path=path,
        cache=False, batch_size=7, save_cpu_ram=True)  # save_cpu_ram: no loader workers
    # IS: the same float32 logits, both reduced in float64
    assert ours["is_mean"] == pytest.approx(theirs[IS_MEAN], rel=1e-12)
    assert ours["is_std"] == pytest.approx(theirs[IS_STD], rel=1e-9)
    # KID: the same subsets; torch-fidelity's kernels run in float32, ours in float64
    assert ours["kid_mean"] == pytest.approx(theirs[KID_MEAN], rel=1e-4)
    assert ours["kid_std"] == pytest.approx(theirs[KID_STD], rel=1e-3)
    assert ours["kid_mean"] > 0
