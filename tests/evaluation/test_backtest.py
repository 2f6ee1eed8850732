"""Train-then-replay helpers: the time cutoff, fitting and scoring feature rows."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from models import IsolationForestDetector, KeyDayBudget, key_day_groups
from qabuse_dagster.evaluation.backtest import time_cutoff
from qabuse_dagster.evaluation.families import TrainingParams

FEATURES = ("f1", "f2", "f3")


def _rows(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(np.abs(rng.normal(5.0, 1.0, size=(n, len(FEATURES)))), columns=FEATURES)
    frame.insert(0, "api_key_id", [f"{i % 7:016x}" for i in range(n)])
    frame.insert(1, "event_timestamp", pd.date_range("2026-03-02", periods=n, freq="min", tz="UTC"))
    frame["unused"] = 1e9  # a column the detector must not see
    return frame


def test_time_cutoff_splits_first_to_last() -> None:
    ts = pd.Series(pd.date_range("2026-01-01", periods=11, freq="h", tz="UTC"))
    assert time_cutoff(ts, 0.5) == datetime(2026, 1, 1, 5, tzinfo=UTC)
    assert time_cutoff(ts, 0.25) == datetime(2026, 1, 1, 2, 30, tzinfo=UTC)
    # Order does not matter: first and last are min and max.
    assert time_cutoff(ts.iloc[::-1], 0.5) == datetime(2026, 1, 1, 5, tzinfo=UTC)
    cutoff = time_cutoff(ts, 0.7)
    assert isinstance(cutoff, datetime) and cutoff.tzinfo is not None


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_time_cutoff_rejects_fraction_outside_open_unit_interval(fraction: float) -> None:
    ts = pd.Series(pd.date_range("2026-01-01", periods=3, freq="h", tz="UTC"))
    with pytest.raises(ValueError, match="train_fraction"):
        time_cutoff(ts, fraction)


def test_time_cutoff_rejects_no_rows() -> None:
    with pytest.raises(ValueError, match="no feature rows"):
        time_cutoff(pd.Series([], dtype="datetime64[ns, UTC]"), 0.5)


def _key_day_alert_share(rows: pd.DataFrame, scores: np.ndarray, threshold: float) -> float:
    days = rows["event_timestamp"].dt.floor("D")
    alerted = pd.Series(scores > threshold).groupby([rows["api_key_id"], days]).any()
    return float(alerted.mean())


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5])
def test_calibrated_threshold_keeps_training_key_days_within_the_budget(budget: float) -> None:
    rows = _rows(n=7 * 24 * 60, seed=4)  # 7 keys over 7 days: 49 key-days
    scores = np.random.default_rng(5).gamma(2.0, size=len(rows))

    groups = key_day_groups(rows["api_key_id"], rows["event_timestamp"])
    threshold = KeyDayBudget(budget).threshold(scores, groups)

    share = _key_day_alert_share(rows, scores, threshold)
    assert share <= budget
    # The tightest such threshold: one step lower would overrun the budget.
    lower = np.max(scores[scores < threshold])
    assert _key_day_alert_share(rows, scores, lower) > budget or share == 0.0


def test_fit_sets_the_threshold_from_the_key_day_budget_of_its_groups() -> None:
    rows = _rows(n=7 * 24 * 60, seed=6)
    detector = IsolationForestDetector(
        n_estimators=30, random_state=0, threshold_strategy=KeyDayBudget(0.1)
    )

    detector.fit(
        rows[list(FEATURES)].to_numpy(),
        groups=key_day_groups(rows["api_key_id"], rows["event_timestamp"]),
    )

    scores = detector.decision_function(rows[list(FEATURES)].to_numpy())
    assert _key_day_alert_share(rows, scores, detector.threshold_) <= 0.1
    # A row quantile (the forest's own 1% contamination) alerts on nearly every key-day.
    row_quantile = float(np.quantile(scores, 0.99))
    assert detector.threshold_ > row_quantile
    assert _key_day_alert_share(rows, scores, row_quantile) > 0.5


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.1])
def test_alert_budget_outside_the_open_unit_interval_is_refused(budget: float) -> None:
    with pytest.raises(ValueError, match="alert_budget"):
        TrainingParams(alert_budget=budget)
    with pytest.raises(ValueError, match="budget"):
        KeyDayBudget(budget)
