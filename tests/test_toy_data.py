"""Toy datasets: reproducible from the seed, with the reference's mode locations and stds."""

import math

import pytest
import torch

from ddpmkit.data.toy import (
    TOY_DATASETS,
    TensorBatches,
    make_toy_data,
    toy_generator,
    toy_mixture,
)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_same_seed_same_points_other_seed_other_points(name):
    a = make_toy_data(name, 1000, toy_generator(7))
    b = make_toy_data(name, 1000, toy_generator(7))
    c = make_toy_data(name, 1000, toy_generator(8))
    assert a.shape == (1000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_unit_variance_per_axis(name):
    x = make_toy_data(name, 200_000, toy_generator(0))
    assert torch.allclose(x.std(dim=0), torch.ones(2), atol=0.01)


def test_gaussian8_modes_and_std():
    mix = toy_mixture("gaussian8")
    scale = math.sqrt(0.02**2 + 2)
    k = torch.arange(8, dtype=torch.float64)
    expected = 2 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1) / scale
    assert torch.allclose(mix.modes.double(), expected, atol=1e-6)
    assert mix.std == pytest.approx(0.02 / scale)


def test_gaussian25_modes_and_std():
    mix = toy_mixture("gaussian25")
    scale = math.sqrt(0.05**2 + 8)
    grid = {(round(float(a) * scale), round(float(b) * scale)) for a, b in mix.modes}
    assert grid == {(i, j) for i in (-4, -2, 0, 2, 4) for j in (-4, -2, 0, 2, 4)}
    assert mix.std == pytest.approx(0.05 / scale)
    assert toy_mixture("swissroll") is None


@pytest.mark.parametrize("name", ["gaussian8", "gaussian25"])
def test_mixture_points_scatter_around_modes_with_the_right_std(name):
    mix = toy_mixture(name)
    x = make_toy_data(name, 50_000, toy_generator(3))
    d = torch.cdist(x.double(), mix.modes.double())
    nearest = d.argmin(dim=1)
    residual = x.double() - mix.modes.double()[nearest]
    assert residual.std(dim=0) == pytest.approx([mix.std, mix.std], rel=0.03)
    share = torch.bincount(nearest, minlength=len(mix.modes)).double() / len(x)
    assert torch.allclose(share, torch.full_like(share, 1 / len(mix.modes)), atol=0.01)


def test_swissroll_follows_the_spiral():
    from ddpmkit.data.toy import SWISSROLL_NOISE, _swissroll_axis_std

    sx, sy = _swissroll_axis_std()
    x = make_toy_data("swissroll", 20_000, toy_generator(5)).double()
    raw = x * torch.tensor([sx, sy], dtype=torch.float64)
    r = raw.norm(dim=1)
    # radius = t (up to the noise) with t in [1.5 pi, 4.5 pi]
    assert r.min() > 1.5 * math.pi - 5 * SWISSROLL_NOISE
    assert r.max() < 4.5 * math.pi + 5 * SWISSROLL_NOISE
    # the angle matches the radius: (t cos t, t sin t) has angle t (mod 2 pi)
    t = r
    err = torch.remainder(torch.atan2(raw[:, 1], raw[:, 0]) - t + math.pi, 2 * math.pi) - math.pi
    assert err.abs().median() < 0.3  # radius noise 0.25 -> angle error ~0.2 (uniform: pi/2)


def test_unknown_dataset_and_bad_size():
    with pytest.raises(ValueError, match="gaussian8"):
        make_toy_data("moons", 10, toy_generator(0))
    with pytest.raises(ValueError):
        make_toy_data("gaussian8", 0, toy_generator(0))


def test_tensor_batches_order_depends_only_on_seed_and_epoch():
    data = torch.arange(40, dtype=torch.float32)[:, None]
    a, b = TensorBatches(data, 8, seed=1), TensorBatches(data, 8, seed=1)
    assert len(a) == 5
    a.set_epoch(3)
    b.set_epoch(3)
    first = [x.flatten().tolist() for x in a]
    assert first == [x.flatten().tolist() for x in b]
    assert sorted(sum(first, [])) == list(range(40))  # every point once per epoch
    assert [x.flatten().tolist() for x in a.iter_from(2)] == first[2:]
    b.set_epoch(4)
    assert [x.flatten().tolist() for x in b] != first


def test_tensor_batches_drops_the_last_partial_batch():
    batches = TensorBatches(torch.zeros(45, 2), 10, seed=0)
    assert len(batches) == 4
    assert all(len(x) == 10 for x in batches)
