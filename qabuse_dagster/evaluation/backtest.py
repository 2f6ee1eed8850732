"""The time split of train-then-replay: the training rows lie before a cutoff.

The training rows are those before a time cutoff (history), the evaluation rows those
at or after it (the "future" the detector never saw). Fitting and scoring every family
on either side of it is `qabuse_dagster.evaluation.families`; the key-day alert budget
that sets each threshold is `models.thresholds.KeyDayBudget`.
"""

from __future__ import annotations

from datetime import datetime

import pandas as pd


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
