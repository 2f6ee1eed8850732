"""Train-then-replay on feature rows: the split, the fit and the scoring production uses.

The training rows are those before a time cutoff (history), the evaluation rows those
at or after it (the "future" the detector never saw). The same functions fit the
model the Dagster graph registers and score the rows the evaluation reports on.

The alert threshold is set by an alert budget over key-days, not over rows: an
operator pays for every key that alerts on a day, and a key scored every minute has
1,440 chances a day to cross a row quantile (a 1% row threshold alerted on nearly
every busy benign key every day). `calibrate_threshold` picks the score that the
highest-scoring minute of at most ``alert_budget`` of the training key-days exceeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from models import IsolationForestDetector


@dataclass(frozen=True)
class DetectorParams:
    """Knobs of the Isolation Forest detector and of its alert threshold.

    Attributes:
        n_estimators: Trees in the forest.
        contamination: The forest's expected anomalous share of rows; only the
            threshold's fallback when the rows carry no key and timestamp.
        random_state: Seed of the forest.
        alert_budget: Share of training key-days (one api key, one UTC day) allowed an
            alert; sets the threshold (see `calibrate_threshold`).
    """

    n_estimators: int = 200
    contamination: float = 0.01
    random_state: int = 0
    alert_budget: float = 0.02

    def __post_init__(self) -> None:
        if not 0.0 < self.alert_budget < 1.0:
            raise ValueError(f"alert_budget must lie in (0, 1), got {self.alert_budget}")


def time_cutoff(timestamps: pd.Series, train_fraction: float) -> datetime:
    """The instant splitting ``[first, last]`` into a training and an evaluation part.

    >>> ts = pd.Series(pd.date_range("2026-01-01", periods=11, freq="h", tz="UTC"))
    >>> time_cutoff(ts, 0.6).isoformat()
    '2026-01-01T06:00:00+00:00'
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if timestamps.empty:
        raise ValueError("no feature rows to split")
    first, last = timestamps.min(), timestamps.max()
    return (first + (last - first) * train_fraction).to_pydatetime()


def fit_detector(
    rows: pd.DataFrame, feature_names: Sequence[str], params: DetectorParams
) -> IsolationForestDetector:
    """Fit an Isolation Forest on ``rows[feature_names]``."""
    if rows.empty:
        raise ValueError("no training rows before the cutoff: simulate or ingest more history")
    detector = IsolationForestDetector(
        n_estimators=params.n_estimators,
        contamination=params.contamination,
        random_state=params.random_state,
    )
    features = rows[list(feature_names)].to_numpy(dtype=float)
    detector.fit(features)
    if {"api_key_id", "event_timestamp"}.issubset(rows.columns):
        detector.threshold_ = calibrate_threshold(
            detector.decision_function(features),
            rows["api_key_id"],
            rows["event_timestamp"],
            params.alert_budget,
        )
    return detector


def calibrate_threshold(
    scores: np.ndarray, keys: pd.Series, timestamps: pd.Series, alert_budget: float
) -> float:
    """The score above which at most ``alert_budget`` of the key-days would alert.

    Each (key, UTC day) of the rows keeps its highest score. Of ``n`` key-days,
    ``floor(n * alert_budget)`` may alert, so the threshold is the highest maximum
    below those: on the training rows at most that share of key-days has a row above it.

    >>> ts = pd.Series(pd.to_datetime(["2026-01-01T10:00Z"] * 4 + ["2026-01-02T10:00Z"] * 4))
    >>> keys = pd.Series(["a", "a", "b", "b"] * 2)
    >>> calibrate_threshold(np.array([1.0, 5, 2, 2, 3, 3, 9, 4]), keys, ts, 0.25)
    5.0
    """
    if not 0.0 < alert_budget < 1.0:
        raise ValueError(f"alert_budget must lie in (0, 1), got {alert_budget}")
    days = pd.to_datetime(timestamps, utc=True).dt.floor("D")
    per_key_day = (
        pd.Series(np.asarray(scores, dtype=np.float64), index=keys.index)
        .groupby([keys.to_numpy(), days.to_numpy()])
        .max()
    )
    if per_key_day.empty:
        raise ValueError("no scored rows to calibrate the alert threshold on")
    maxima = np.sort(per_key_day.to_numpy())
    allowed = math.floor(len(maxima) * alert_budget)
    return float(maxima[len(maxima) - 1 - allowed])


def score_rows(
    detector: IsolationForestDetector, rows: pd.DataFrame, feature_names: Sequence[str]
) -> pd.DataFrame:
    """``rows`` with ``score`` (higher is more anomalous) and ``alert`` columns added."""
    scored = rows.copy()
    scored["score"] = detector.decision_function(rows[list(feature_names)].to_numpy(dtype=float))
    scored["alert"] = scored["score"] > detector.threshold_
    return scored
