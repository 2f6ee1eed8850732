"""Threshold strategies: row contamination, key-day budgets and their tail extrapolation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from models.thresholds import Contamination, KeyDayBudget, ThresholdStrategy, key_day_groups

ROWS_PER_KEY_DAY = 60


def _key_days(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of ``n`` key-days of ``ROWS_PER_KEY_DAY`` standard normal rows, and their ids."""
    scores = rng.standard_normal(n * ROWS_PER_KEY_DAY)
    return scores, np.repeat(np.arange(n), ROWS_PER_KEY_DAY)


def _key_day_exceedance(threshold: float) -> float:
    """P(a fresh key-day's highest row > threshold), exactly: 1 - Phi(t)^rows."""
    return float(1.0 - norm.cdf(threshold) ** ROWS_PER_KEY_DAY)


def test_both_strategies_satisfy_the_protocol() -> None:
    assert isinstance(Contamination(), ThresholdStrategy)
    assert isinstance(KeyDayBudget(), ThresholdStrategy)


def test_contamination_is_the_row_quantile() -> None:
    scores = np.random.default_rng(0).standard_normal(10_000)
    threshold = Contamination(0.05).threshold(scores)
    assert np.mean(scores > threshold) == pytest.approx(0.05, abs=0.002)
    # Group ids do not matter to a row quantile.
    groups = np.arange(len(scores)) // 100
    assert Contamination(0.05).threshold(scores, groups) == threshold


@pytest.mark.parametrize("share", [0.0, -0.1, 0.6])
def test_contamination_outside_its_range_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="contamination"):
        Contamination(share)


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.01])
def test_key_day_budget_outside_its_range_is_refused(budget: float) -> None:
    with pytest.raises(ValueError, match="budget"):
        KeyDayBudget(budget)


@pytest.mark.parametrize("strategy", [Contamination(), KeyDayBudget()])
def test_no_scores_is_an_error(strategy: ThresholdStrategy) -> None:
    with pytest.raises(ValueError, match="no training scores"):
        strategy.threshold(np.array([]))


def test_group_ids_must_match_the_scores() -> None:
    with pytest.raises(ValueError, match="3 group ids for 2 scores"):
        KeyDayBudget().threshold(np.array([1.0, 2.0]), np.array([0, 0, 1]))


def test_with_enough_key_days_exactly_the_budget_alerts() -> None:
    """Empirical regime: floor(n * budget) >= min_exceedances; each key-day counts once."""
    scores, groups = _key_days(np.random.default_rng(1), 3_000)
    budget = KeyDayBudget(0.01)
    threshold = budget.threshold(scores, groups)
    maxima = pd.Series(scores).groupby(groups).max()
    assert int((maxima > threshold).sum()) == 30
    # Many rows above the threshold, but only 30 key-days: rows are not what is budgeted.
    assert int((scores > threshold).sum()) >= 30


def test_a_busy_key_day_counts_once() -> None:
    """One key-day with thousands of high rows does not push the threshold up by itself."""
    rng = np.random.default_rng(2)
    scores, groups = _key_days(rng, 2_000)
    flood = np.full(3_000, 50.0)
    with_flood = np.concatenate([scores, flood])
    flood_groups = np.concatenate([groups, np.full(3_000, groups.max() + 1)])
    strategy = KeyDayBudget(0.01)
    assert strategy.threshold(with_flood, flood_groups) < 50.0
    # Without group ids every row is its own group: the flood (2.5% of rows) owns the top 1%.
    assert strategy.threshold(with_flood) == 50.0


def test_without_groups_each_row_is_a_key_day() -> None:
    scores = np.random.default_rng(3).standard_normal(5_000)
    grouped = KeyDayBudget(0.01).threshold(scores, np.arange(len(scores)))
    assert KeyDayBudget(0.01).threshold(scores) == grouped


def test_few_key_days_extrapolate_beyond_the_training_maximum() -> None:
    """A budget below 1/n: the empirical quantile is the sample maximum, the tail goes past it."""
    rng = np.random.default_rng(4)
    strategy = KeyDayBudget(0.002)
    beyond = 0
    for _ in range(100):
        scores, groups = _key_days(rng, 200)
        threshold = strategy.threshold(scores, groups)
        assert threshold >= scores.max()  # never below the empirical quantile (the maximum)
        beyond += threshold > scores.max()
    assert beyond >= 60


@pytest.mark.parametrize(("n_key_days", "budget"), [(60, 0.01), (200, 0.002), (300, 0.01)])
def test_few_key_days_exceed_about_the_budget_on_fresh_data(n_key_days: int, budget: float) -> None:
    """Over many training samples, fresh key-days cross the threshold about ``budget`` often.

    The sample maximum alone (what the empirical quantile gives below ``1/n``) is crossed
    by ``1/(n+1)`` of fresh key-days, several times the budget; the extrapolated tail keeps
    the mean exceedance within a loose band around it.
    """
    rng = np.random.default_rng(5)
    strategy = KeyDayBudget(budget)
    rates = []
    for _ in range(300):
        scores, groups = _key_days(rng, n_key_days)
        rates.append(_key_day_exceedance(strategy.threshold(scores, groups)))
    mean_rate = float(np.mean(rates))
    assert budget / 3 <= mean_rate <= 3 * budget
    # A threshold no new key-day can reach would also meet the upper bound: not this one.
    assert np.median(rates) > budget / 10


def test_a_handful_of_key_days_gives_their_maximum() -> None:
    """Too few key-days for a tail fit (fewer than twice the tail): the maximum."""
    scores = np.array([1.0, 4.0, 2.0, 3.0, 0.5])
    assert KeyDayBudget(0.01).threshold(scores) == 4.0


def test_the_empirical_regime_ignores_the_tail() -> None:
    """With ``min_exceedances`` met the threshold is the empirical quantile, as documented."""
    scores, groups = _key_days(np.random.default_rng(6), 400)
    maxima = np.sort(pd.Series(scores).groupby(groups).max().to_numpy())
    empirical = KeyDayBudget(0.01, min_exceedances=4).threshold(scores, groups)
    assert empirical == maxima[400 - 1 - 4]


def test_key_day_groups_split_by_key_and_utc_day() -> None:
    stamps = pd.to_datetime(
        [
            "2026-01-01T10:00Z",
            "2026-01-02T01:00+02:00",  # 23:00 UTC on the 1st: the same UTC day
            "2026-01-02T00:00Z",
            "2026-01-01T10:00Z",
            "2026-01-02T00:00Z",
        ],
        utc=True,
    )
    groups = key_day_groups(["a", "a", "a", "b", "b"], stamps)
    assert groups.dtype == np.int64
    assert groups[0] == groups[1]
    assert len({groups[0], groups[2], groups[3], groups[4]}) == 4


def test_key_day_groups_feed_the_budget() -> None:
    """A key alerting all day long costs one key-day, as the operator sees it."""
    minutes = pd.date_range("2026-01-01", periods=3 * 1440, freq="min", tz="UTC")
    keys = np.repeat(["k1"], len(minutes))
    groups = key_day_groups(keys, minutes)
    assert sorted(set(groups.tolist())) == [0, 1, 2]
    assert np.bincount(groups).tolist() == [1440, 1440, 1440]
