"""Train-then-replay on feature rows: the split, the fit and the scoring production uses.

The training rows are those before a time cutoff (history), the evaluation rows those
at or after it (the "future" the detector never saw). The same functions fit the
model the Dagster graph registers and score the rows the evaluation reports on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from models import IsolationForestDetector


@dataclass(frozen=True)
class DetectorParams:
    """Knobs of the Isolation Forest detector."""

    n_estimators: int = 200
    contamination: float = 0.01
    random_state: int = 0


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
    return detector.fit(rows[list(feature_names)].to_numpy(dtype=float))


def score_rows(
    detector: IsolationForestDetector, rows: pd.DataFrame, feature_names: Sequence[str]
) -> pd.DataFrame:
    """``rows`` with ``score`` (higher is more anomalous) and ``alert`` columns added."""
    scored = rows.copy()
    scored["score"] = detector.decision_function(rows[list(feature_names)].to_numpy(dtype=float))
    scored["alert"] = scored["score"] > detector.threshold_
    return scored
