"""Toy metrics on cases with known answers."""

import math

import numpy as np
import pytest
import torch

from ddpmkit.data.toy import TOY_DATASETS, make_toy_data, toy_generator, toy_mixture
from ddpmkit.metrics.toy import ToyEvaluator, histogram_kl, mode_stats
from ddpmkit.training.toy import NUM_TRUE_EVAL_POINTS


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_floor_of_the_cli_evaluator_is_below_002(name):
    true = make_toy_data(name, NUM_TRUE_EVAL_POINTS, toy_generator(1))
    ref = make_toy_data(name, 50_000, toy_generator(2))
    ev = ToyEvaluator(true, ref)
    assert 0 < ev.kl_floor < 0.02
    # true against itself is (almost exactly) zero
    assert ev.kl(true) < 1e-3


def test_all_samples_at_one_mode():
    mix = toy_mixture("gaussian25")
    gen = mix.modes[7].repeat(1000, 1)
    stats = mode_stats(gen, mix.modes, mix.std)
    assert stats["modes_covered"] == 1
    assert stats["high_quality"] == 1.0
    assert stats["mode_counts"][7] == 1000
    true = make_toy_data("gaussian25", 100_000, toy_generator(0))
    assert histogram_kl(true, gen) > math.log(25) - 0.5  # mass of 24 modes missing


def test_distance_threshold_is_three_stds():
    mix = toy_mixture("gaussian8")
    near = mix.modes + 2.9 * mix.std * torch.tensor([1.0, 0.0])
    far = mix.modes + 3.1 * mix.std * torch.tensor([0.0, 1.0])
    assert mode_stats(near, mix.modes, mix.std)["high_quality"] == 1.0
    assert mode_stats(far, mix.modes, mix.std)["high_quality"] == 0.0
    # true data: 1 - exp(-4.5) = 98.9% within 3 std, every mode covered
    x = make_toy_data("gaussian8", 40_000, toy_generator(0))
    stats = mode_stats(x, mix.modes, mix.std)
    assert stats["modes_covered"] == 8
    assert stats["high_quality"] == pytest.approx(1 - math.exp(-4.5), abs=0.003)


def test_blurred_samples_score_worse_than_true_ones():
    true = make_toy_data("gaussian25", 100_000, toy_generator(0))
    good = make_toy_data("gaussian25", 20_000, toy_generator(1))
    blurred = good + 0.03 * torch.randn(good.shape, generator=toy_generator(2))
    ev = ToyEvaluator(true)
    assert ev.kl(blurred) > 3 * ev.kl(good)


def test_non_finite_samples_count_as_misplaced():
    mix = toy_mixture("gaussian8")
    true = make_toy_data("gaussian8", 50_000, toy_generator(0))
    gen = make_toy_data("gaussian8", 1000, toy_generator(1)).numpy().copy()
    gen[:500] = np.nan
    out = ToyEvaluator(true, modes=mix.modes, std=mix.std).evaluate(gen)
    assert out["non_finite"] == 500
    assert math.isfinite(out["kl"]) and out["kl"] > 0.5
    assert out["high_quality"] == pytest.approx(0.5 * 0.989, abs=0.02)


def test_the_evaluator_for_a_dataset_scores_its_modes():
    true = make_toy_data("gaussian8", 20_000, toy_generator(0))
    ref = make_toy_data("gaussian8", 1000, toy_generator(1))
    ev = ToyEvaluator.for_dataset("gaussian8", true, ref)
    mix = toy_mixture("gaussian8")
    by_hand = ToyEvaluator(true, ref, modes=mix.modes, std=mix.std)
    assert ev.evaluate(ref) == by_hand.evaluate(ref)
    assert ev.evaluate(ref)["modes_covered"] == 8
    roll = make_toy_data("swissroll", 20_000, toy_generator(0))
    out = ToyEvaluator.for_dataset("swissroll", roll).evaluate(roll[:1000])
    assert "modes_covered" not in out and out["kl"] > 0
