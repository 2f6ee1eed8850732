"""The reference tutorial's detector, reproduced as the baseline qabuse is compared with.

The tutorial's pipeline, step by step, and nothing more:

1. per user, count submissions in 1-minute bins (pandas ``resample("1min")``; silent
   minutes between a user's first and last submission count 0);
2. a rolling 5-minute mean of those counts;
3. a per-user z-score of the counts (the user's own mean and standard deviation);
4. an Isolation Forest with 100 trees and contamination 0.01 on
   ``[submissions, rolling_mean_5m, zscore]``;
5. alert above the 99th percentile of the training scores.

It differs from the other detectors' input contract on purpose: the tutorial builds its
own features from raw telemetry with pandas, per *user*, so ``fit_frame`` and
``score_frame`` take telemetry rows, not qabuse's per-key window features. Feeding it
qabuse's features would no longer be the tutorial's pipeline. The array API of
`BaseDetector` (``fit``/``decision_function``/``predict``) still works on the three
feature columns, and the score follows the shared convention: higher is more anomalous.

Two choices the tutorial leaves open are fixed so the replay is honest: the per-user
mean and standard deviation are learned in ``fit_frame`` (training history) and reused
when scoring (a user first seen after training falls back to the training population's
figures); and a bin's row is stamped at the bin's *end*, the first instant its count is
known, so time to detect is never earlier than the data allows.
"""

from __future__ import annotations

from typing import Self

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sklearn.ensemble import IsolationForest

from models.base import BaseDetector, deviation_contributions
from models.thresholds import Contamination, ThresholdStrategy

#: The tutorial's three features, in column order.
BASELINE_FEATURES: tuple[str, ...] = ("submissions", "rolling_mean_5m", "zscore")
#: Statuses that count as a submission (the same convention as qabuse's window features).
SUBMISSION_STATUSES = ("submitted", "rejected")
_BIN = pd.Timedelta(minutes=1)


class TutorialBaselineDetector(BaseDetector):
    """Per-user 1-minute counts, 5-minute rolling mean, z-score, Isolation Forest.

    Args:
        n_estimators: trees of the Isolation Forest (the tutorial's 100).
        contamination: the forest's contamination (the tutorial's 0.01); ``threshold_`` is
            the ``1 - contamination`` quantile of training scores, i.e. the 99th percentile.
        random_state: seed for the forest.

    Example:
        >>> import numpy as np
        >>> import pandas as pd
        >>> rng = np.random.default_rng(0)
        >>> t0 = pd.Timestamp("2026-01-01", tz="UTC")
        >>> seconds = np.sort(rng.uniform(0, 36_000, size=1_200))  # ~2 a minute, 10 hours
        >>> history = pd.DataFrame({"user": "u1", "status": "submitted",
        ...                         "timestamp": t0 + pd.to_timedelta(seconds, unit="s")})
        >>> det = TutorialBaselineDetector(random_state=0).fit_frame(history)
        >>> later = t0 + pd.Timedelta(hours=11) + pd.to_timedelta(np.arange(120) / 2, unit="s")
        >>> burst = pd.DataFrame({"user": "u1", "status": "submitted", "timestamp": later})
        >>> bool(det.score_frame(burst)["alert"].any())
        True
    """

    def __init__(
        self,
        n_estimators: int = 100,
        contamination: float = 0.01,
        random_state: int | None = 0,
    ) -> None:
        super().__init__()
        self.contamination = contamination
        self.n_estimators = n_estimators
        self.random_state = random_state

    def fit_frame(self, telemetry: pd.DataFrame) -> Self:
        """Learn per-user statistics and the forest from raw telemetry rows.

        Args:
            telemetry: columns ``user``, ``timestamp`` (tz-aware) and ``status``.
        """
        counts = self._minute_counts(telemetry)
        if counts.empty:
            raise ValueError("no submissions to train the baseline on")
        per_user = counts.groupby("user")["submissions"]
        self.user_mean_ = per_user.mean().to_dict()
        # ddof=0 so a user seen for one minute gets std 0, floored below like a flat user.
        self.user_std_ = per_user.std(ddof=0).to_dict()
        self.global_mean_ = float(counts["submissions"].mean())
        self.global_std_ = float(counts["submissions"].std(ddof=0))
        return self.fit(self._features(counts)[list(BASELINE_FEATURES)].to_numpy(dtype=float))

    def score_frame(self, telemetry: pd.DataFrame) -> pd.DataFrame:
        """Score every user-minute of ``telemetry``.

        Returns:
            Columns ``user``, ``event_timestamp`` (end of the 1-minute bin, UTC),
            ``score`` (higher is more anomalous) and ``alert`` (score above ``threshold_``).
        """
        self._check_fitted()
        counts = self._minute_counts(telemetry)
        if counts.empty:
            return pd.DataFrame(
                {
                    "user": pd.Series(dtype=str),
                    "event_timestamp": pd.Series(dtype="datetime64[ns, UTC]"),
                    "score": pd.Series(dtype=float),
                    "alert": pd.Series(dtype=bool),
                }
            )
        features = self._features(counts)
        scores = self.decision_function(features[list(BASELINE_FEATURES)].to_numpy(dtype=float))
        return pd.DataFrame(
            {
                "user": features["user"].to_numpy(),
                "event_timestamp": features["minute"] + _BIN,
                "score": scores,
                "alert": scores > self.threshold_,
            }
        ).reset_index(drop=True)

    def _fit(self, X: NDArray[np.float64]) -> None:
        self.center_, self.spread_ = np.median(X, axis=0), np.std(X, axis=0)
        self.estimator_ = IsolationForest(
            n_estimators=self.n_estimators,
            contamination=self.contamination,
            random_state=self.random_state,
        ).fit(X)

    def _strategy(self) -> ThresholdStrategy:
        # The tutorial's rule: the 99th percentile of the training scores.
        return Contamination(self.contamination)

    def _explain(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        return deviation_contributions(X, self.center_, self.spread_)

    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        # score_samples is higher for normal rows; negate for "higher = more anomalous".
        return np.asarray(-self.estimator_.score_samples(X), dtype=np.float64)

    @staticmethod
    def _minute_counts(telemetry: pd.DataFrame) -> pd.DataFrame:
        """Submissions per user per minute, zero-filled between each user's first and last.

        With a ``job_id`` column a job counts once, at its earliest record, whatever its
        status, so a job log (one terminal record per job) counts as the event stream
        does; without one, submission records are counted, as the tutorial does.
        """
        if "job_id" in telemetry.columns:
            first = telemetry.sort_values("timestamp", kind="stable").drop_duplicates("job_id")
            subs = first[["user", "timestamp"]]
        else:
            subs = telemetry.loc[
                telemetry["status"].isin(SUBMISSION_STATUSES), ["user", "timestamp"]
            ]
        if subs.empty:
            return pd.DataFrame(columns=["user", "minute", "submissions"])
        counts = (
            subs.assign(submissions=1)
            .set_index("timestamp")
            .groupby("user")["submissions"]
            .resample("1min")
            .sum()
            .rename_axis(["user", "minute"])
            .reset_index()
        )
        counts["minute"] = pd.to_datetime(counts["minute"], utc=True)
        return counts

    def _features(self, counts: pd.DataFrame) -> pd.DataFrame:
        counts = counts.sort_values(["user", "minute"]).reset_index(drop=True)
        subs = counts["submissions"].astype(float)
        rolling = subs.groupby(counts["user"]).rolling(5, min_periods=1).mean()
        counts["rolling_mean_5m"] = rolling.reset_index(level=0, drop=True)
        mean = counts["user"].map(self.user_mean_).fillna(self.global_mean_).astype(float)
        std = counts["user"].map(self.user_std_).fillna(self.global_std_).astype(float)
        # A user with a flat history has std 0: floor it at 1 submission/minute.
        counts["zscore"] = (subs - mean) / std.clip(lower=1.0)
        counts["submissions"] = subs
        return counts
