"""Continuous evaluation: how the champion's alerts of a recent window match the labels.

Once the champion serves, the backtest's figures are history: new abuse, new benign
tenants and analysts' verdicts arrive every hour. `window_figures` scores one window (an
hour by default) by keys, the unit an analyst triages:

* precision: of the keys the champion alerted on, the share an incident active in the
  window names (None when it alerted on none);
* benign alert rate: of the active keys no incident names, the share it alerted on;
* recall: of the keys an active incident names and that were active, the share it
  alerted on (None when no labelled incident touched the window).

Labels that say a key's use was legitimate (an upheld appeal, an analyst's false
positive) are no incident: their keys count as benign, so an alert on them lowers
precision and raises the benign alert rate.

Example:
    >>> import pandas as pd
    >>> from datetime import UTC, datetime
    >>> rows = pd.DataFrame({"api_key_id": ["a", "b", "c"], "alert": [True, True, False],
    ...     "event_timestamp": pd.Timestamp("2026-11-02 10:30", tz="UTC")})
    >>> start, end = datetime(2026, 11, 2, 10, tzinfo=UTC), datetime(2026, 11, 2, 11, tzinfo=UTC)
    >>> figures = window_figures(rows, [], start, end)
    >>> figures.precision, figures.benign_alert_rate, figures.recall
    (0.0, 0.6666666666666666, None)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

import pandas as pd

from qabuse_dagster.evaluation.detection import label_keys
from qabuse_dagster.telemetry.labels import BENIGN_LABEL_KINDS, IncidentLabel

__all__ = ["WindowFigures", "window_figures"]


@dataclass(frozen=True)
class WindowFigures:
    """The champion's alerts of one window against the labels active in it."""

    start: datetime
    end: datetime
    active_keys: int
    alerted_keys: int
    incident_keys: int
    alerted_incident_keys: int
    precision: float | None
    benign_alert_rate: float
    recall: float | None

    def metrics(self) -> dict[str, float]:
        """The defined figures, as MLflow metrics."""
        return {
            name: float(value)
            for name, value in asdict(self).items()
            if name not in ("start", "end") and value is not None
        }


def window_figures(
    scored: pd.DataFrame,
    labels: Sequence[IncidentLabel],
    start: datetime,
    end: datetime,
    user_keys: Mapping[str, Sequence[str]] | None = None,
) -> WindowFigures:
    """Key-level precision, benign alert rate and recall of ``scored`` rows in ``[start, end)``.

    Args:
        scored: ``api_key_id, event_timestamp, alert`` rows (the champion's verdicts).
        labels: Every stored label; those overlapping the window count.
        start: Start of the window.
        end: End of the window (excluded).
        user_keys: Each user's keys, for labels that name users.
    """
    stamps = pd.to_datetime(scored["event_timestamp"], utc=True)
    inside = scored[(stamps >= pd.Timestamp(start)) & (stamps < pd.Timestamp(end))]
    active = set(inside["api_key_id"])
    alerted = set(inside.loc[inside["alert"].astype(bool), "api_key_id"])
    incident: set[str] = set()
    for label in labels:
        if label.kind in BENIGN_LABEL_KINDS or label.end <= start or label.start >= end:
            continue
        incident |= label_keys(label, user_keys)
    incident &= active
    benign = active - incident
    hits = alerted & incident
    return WindowFigures(
        start=start,
        end=end,
        active_keys=len(active),
        alerted_keys=len(alerted),
        incident_keys=len(incident),
        alerted_incident_keys=len(hits),
        precision=len(hits) / len(alerted) if alerted else None,
        benign_alert_rate=len(alerted & benign) / len(benign) if benign else 0.0,
        recall=len(hits) / len(incident) if incident else None,
    )
