"""Statistics of final returns over seeds and games: per-game seed statistics, human-normalised scores, and the
aggregates over games with 95% stratified-bootstrap confidence intervals of Agarwal et al. 2021 ("Deep
Reinforcement Learning at the Edge of the Statistical Precipice", the rliable library): mean and median of the
per-game means and the interquartile mean (IQM) of all runs pooled. Pure numpy.

Scores of G games are a sequence of G arrays [..., N_g]: N_g runs (seeds) of game g, which may differ per game.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def seed_stats(finals: Sequence[float]) -> dict:
    """Mean, sample std (ddof=1; nan for one seed), median, best (max) and count of final returns [S]."""
    x = np.asarray(finals, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
            "median": float(np.median(x)), "best": float(x.max()), "n": len(x)}


def human_normalised(scores: np.ndarray, random: float, human: float) -> np.ndarray:
    """(score - random) / (human - random), elementwise: 0 is the random agent's score, 1 the human's."""
    return (np.asarray(scores, np.float64) - random) / (human - random)


def iqm(x: np.ndarray) -> np.ndarray:
    """Interquartile mean over the last axis [..., N] -> [...]: drop floor(N/4) from each end, average the rest
    (scipy.stats.trim_mean(x, 0.25), rliable's IQM)."""
    x = np.sort(np.asarray(x, np.float64), axis=-1)
    cut = int(0.25 * x.shape[-1])
    return x[..., cut:x.shape[-1] - cut].mean(axis=-1)


def mean_of_game_means(scores_per_game: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over games of each game's mean over runs: G arrays [..., N_g] -> [...] (rliable's aggregate_mean)."""
    return np.stack([s.mean(axis=-1) for s in scores_per_game], axis=-1).mean(axis=-1)


def median_of_game_means(scores_per_game: Sequence[np.ndarray]) -> np.ndarray:
    """Median over games of each game's mean over runs: G arrays [..., N_g] -> [...] (rliable's aggregate_median)."""
    return np.median(np.stack([s.mean(axis=-1) for s in scores_per_game], axis=-1), axis=-1)


def pooled_iqm(scores_per_game: Sequence[np.ndarray]) -> np.ndarray:
    """IQM of all runs of all games pooled: G arrays [..., N_g] -> [...] (rliable's aggregate_iqm)."""
    return iqm(np.concatenate(scores_per_game, axis=-1))


AGGREGATES: dict[str, Callable[[Sequence[np.ndarray]], np.ndarray]] = {
    "mean": mean_of_game_means, "median": median_of_game_means, "iqm": pooled_iqm}


def stratified_bootstrap_ci(scores_per_game: Sequence[np.ndarray], statistic: Callable, num_resamples: int,
                            rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of `statistic` under rliable's StratifiedBootstrap (Agarwal et al. 2021, section 4).

    scores_per_game: G arrays [N_g] (N_g may differ). Each resample draws, independently per game, N_g of that
    game's runs with replacement; `statistic` maps G arrays [R, N_g] to [R] estimates, whose (1-level)/2 and
    (1+level)/2 percentiles are returned. A game with one run contributes the same score to every resample.
    """
    resampled = [s[rng.integers(0, len(s), size=(num_resamples, len(s)))] for s in map(np.asarray, scores_per_game)]
    estimates = statistic(resampled)
    low, high = np.percentile(estimates, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def normalised_aggregates(scores_per_game: Sequence[np.ndarray], num_resamples: int, seed: int) -> dict:
    """Mean, median and IQM (AGGREGATES) of human-normalised scores, G arrays [N_g], each {"value", "ci95": [low,
    high]}: the 95% stratified-bootstrap CI of num_resamples resamples, one numpy RNG seeded `seed` for all three."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, statistic in AGGREGATES.items():
        out[name] = {"value": float(statistic(scores_per_game)),
                     "ci95": list(stratified_bootstrap_ci(scores_per_game, statistic, num_resamples, rng))}
    return out
