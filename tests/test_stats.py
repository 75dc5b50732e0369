"""dlwm_jax/stats.py: IQM and the aggregates over games against hand examples and scipy; the stratified bootstrap's
CIs: coverage of the true IQM, width shrinking with runs, stratification, determinism."""
import numpy as np
import pytest
from scipy import stats as scipy_stats

from dlwm_jax import stats


def test_iqm_hand_examples_and_scipy():
    assert stats.iqm(np.arange(1.0, 9.0)) == 4.5               # drop 1,2 and 7,8: mean(3,4,5,6)
    assert stats.iqm(np.array([10.0, 1.0, 2.0, 3.0, 100.0])) == 5.0  # floor(5/4)=1 per side: mean(2,3,10)
    assert stats.iqm(np.array([7.0])) == 7.0
    x = np.random.default_rng(0).normal(size=(3, 11))
    np.testing.assert_allclose(stats.iqm(x), [scipy_stats.trim_mean(r, 0.25) for r in x])  # batched over leading axes


def test_aggregates_ragged_games():
    per_game = [np.array([1.0, 3.0]), np.array([10.0]), np.array([0.0, 0.0, 6.0])]  # game means 2, 10, 2
    assert stats.mean_of_game_means(per_game) == pytest.approx(14 / 3)
    assert stats.median_of_game_means(per_game) == 2.0
    assert stats.pooled_iqm(per_game) == 2.5  # pooled sorted 0 0 1 3 6 10 -> mean(0, 1, 3, 6)
    np.testing.assert_allclose(stats.human_normalised([14.2, 753.1, 383.65], 14.2, 753.1), [0.0, 1.0, 0.5])


def _synthetic_games(rng, runs):
    """5 games with different location and skewed (exponential) spread: G arrays [runs]."""
    return [g + (1 + g / 2) * rng.exponential(size=runs) for g in range(5)]


def test_bootstrap_ci_covers_true_iqm():
    true_iqm = float(stats.pooled_iqm(_synthetic_games(np.random.default_rng(123), 400_000)))
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(200):
        low, high = stats.stratified_bootstrap_ci(_synthetic_games(rng, 5), stats.pooled_iqm, 1000, rng)
        covered += low <= true_iqm <= high
    assert covered >= 0.85 * 200, covered  # nominal 95%; measured 93% with these seeds


def test_bootstrap_ci_shrinks_with_runs():
    rng = np.random.default_rng(1)
    def width(runs):
        intervals = [stats.stratified_bootstrap_ci(_synthetic_games(rng, runs), stats.pooled_iqm, 500, rng)
                     for _ in range(20)]
        return np.mean([high - low for low, high in intervals])
    w5, w20, w80 = width(5), width(20), width(80)
    assert w5 > w20 > w80 > 0
    assert w80 < 0.4 * w5  # ~1/sqrt(runs): 0.25 expected


def test_bootstrap_is_stratified_and_degenerate_with_one_run():
    rng = np.random.default_rng(0)
    assert stats.stratified_bootstrap_ci([np.array([3.0])], stats.pooled_iqm, 100, rng) == (3.0, 3.0)
    # game 0 keeps its single run in every resample; game 1's mean is 0, 0.5 or 1: mean of means in [2.5, 3]
    low, high = stats.stratified_bootstrap_ci([np.array([5.0]), np.array([0.0, 1.0])], stats.mean_of_game_means,
                                              2000, rng)
    assert (low, high) == (2.5, 3.0)
    # same seed, same interval
    a = stats.normalised_aggregates([np.array([0.1, 0.4, 0.2])], 300, seed=7)
    assert a == stats.normalised_aggregates([np.array([0.1, 0.4, 0.2])], 300, seed=7)
