"""Threshold strategies: how a detector turns its training scores into ``threshold_``.

A detector calls its strategy once, at the end of ``fit``, with the scores of its
training rows and, where the rows have them, their group ids. Nothing outside the
detector sets ``threshold_``.

* `Contamination`: the ``1 - contamination`` quantile of the row scores (pyod's rule).
* `KeyDayBudget`: an alert budget over groups, by default (api key, UTC day). An
  operator pays for every key that alerts on a day, and a key scored every minute has
  1,440 chances a day to cross a row quantile, so qabuse sets thresholds on key-days:
  the highest-scoring row of at most ``budget`` of the training groups exceeds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

__all__ = ["Contamination", "KeyDayBudget", "ThresholdStrategy", "key_day_groups"]


@runtime_checkable
class ThresholdStrategy(Protocol):
    """Sets a detector's threshold from its training scores."""

    def threshold(self, scores: NDArray[np.float64], groups: ArrayLike | None = None) -> float:
        """The score above which a row alerts."""
        ...


@dataclass(frozen=True)
class Contamination:
    """The ``1 - contamination`` quantile of the training rows' scores.

    >>> Contamination(0.25).threshold(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    4.0
    """

    contamination: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 < self.contamination <= 0.5:
            raise ValueError(f"contamination must be in (0, 0.5], got {self.contamination}")

    def threshold(self, scores: NDArray[np.float64], groups: ArrayLike | None = None) -> float:
        if len(scores) == 0:
            raise ValueError("no training scores to set a threshold on")
        return float(np.quantile(scores, 1.0 - self.contamination))


@dataclass(frozen=True)
class KeyDayBudget:
    """At most ``budget`` of the training groups (key-days) may have a row above the threshold.

    Each group keeps its highest score. Of ``n`` groups ``floor(n * budget)`` may alert;
    with at least ``min_exceedances`` of them the threshold is the highest group maximum
    below those (the empirical quantile). With fewer, the empirical quantile is the
    sample's maximum or near it, a noisy estimate that new data exceeds far more often
    than ``budget``; the threshold is then extrapolated from the tail of the maxima by
    peaks over threshold with exponential excesses (a generalised Pareto tail of shape
    0): over ``u``, the maxima's ``1 - tail_share`` quantile, a share ``p_u`` of groups
    exceeds it by ``m`` on average, and ``P(max > u + x) = p_u * exp(-x / m)``, so the
    ``budget`` quantile is ``u + m * ln(p_u / budget)``. Never below the empirical one.
    Without group ids every row is its own group.

    >>> groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    >>> KeyDayBudget(0.25, min_exceedances=1).threshold(
    ...     np.array([1.0, 5, 2, 2, 3, 3, 9, 4]), groups)
    5.0
    """

    budget: float = 0.01
    min_exceedances: int = 10
    tail_share: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.budget < 1.0:
            raise ValueError(f"the key-day alert budget must lie in (0, 1), got {self.budget}")

    def threshold(self, scores: NDArray[np.float64], groups: ArrayLike | None = None) -> float:
        scores = np.asarray(scores, dtype=np.float64)
        if len(scores) == 0:
            raise ValueError("no training scores to set a threshold on")
        if groups is None:
            maxima = np.sort(scores)
        else:
            ids = np.asarray(groups)
            if len(ids) != len(scores):
                raise ValueError(f"{len(ids)} group ids for {len(scores)} scores")
            maxima = np.sort(pd.Series(scores).groupby(ids).max().to_numpy())
        n = len(maxima)
        allowed = math.floor(n * self.budget)
        empirical = float(maxima[n - 1 - allowed])
        if allowed >= self.min_exceedances:
            return empirical
        return max(empirical, _exponential_tail(maxima, self.budget, self.tail_share))


def _exponential_tail(sorted_maxima: NDArray[np.float64], budget: float, share: float) -> float:
    n = len(sorted_maxima)
    k = max(math.ceil(n * share), 3)
    if n < 2 * k:
        return float(sorted_maxima[-1])
    u = float(sorted_maxima[n - k - 1])
    mean_excess = float(np.mean(sorted_maxima[n - k :] - u))
    return u + mean_excess * math.log((k / n) / budget)


def key_day_groups(keys: ArrayLike, timestamps: ArrayLike) -> NDArray[np.int64]:
    """One integer id per distinct (key, UTC day) of the rows.

    >>> ts = pd.to_datetime(["2026-01-01T10:00Z", "2026-01-01T23:00Z", "2026-01-02T00:00Z"])
    >>> key_day_groups(["a", "a", "a"], ts).tolist()
    [0, 0, 1]
    """
    days = pd.DatetimeIndex(pd.to_datetime(np.asarray(timestamps), utc=True)).floor("D")
    frame = pd.DataFrame({"key": np.asarray(keys), "day": days})
    return frame.groupby(["key", "day"], sort=False).ngroup().to_numpy(dtype=np.int64)
