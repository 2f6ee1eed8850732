"""Detection metrics over scored feature rows: did each incident raise an alert, and when.

A scored row says "at instant ``event_timestamp``, key ``api_key_id`` scored ``score``
and alerted or not". Labels say which keys were abusive over which interval. A row
describes the window *before* its instant, so a row of an incident key counts as part
of the incident from just after its start until ``WINDOW_TAIL`` past its end.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from qabuse_dagster.telemetry.labels import IncidentLabel

#: How long after an incident's end its records still fill a (5-minute) window.
WINDOW_TAIL = timedelta(minutes=5)


@dataclass(frozen=True)
class IncidentOutcome:
    """Whether one labelled incident was detected, and how fast."""

    incident_id: str
    kind: str
    detected: bool
    time_to_detect_s: float | None
    first_alert: datetime | None
    #: The incident keys' first feature row after its start (the earliest moment any
    #: detector could alert: a minute after their first submission in the incident).
    first_row: datetime | None = None

    @property
    def delay_after_first_row_s(self) -> float | None:
        """Time from the first row a detector could alert on to its first alert."""
        if self.first_alert is None or self.first_row is None:
            return None
        return (self.first_alert - self.first_row).total_seconds()


@dataclass(frozen=True)
class DetectionReport:
    """Per-incident outcomes and the overall figures of one evaluation window."""

    incidents: list[IncidentOutcome]
    recall: float | None
    precision_at_k: float | None
    k: int
    benign_row_alert_rate: float
    benign_keys: int
    benign_keys_alerted: int
    rows: int
    alerts: int
    ranked_keys: list[tuple[str, float, bool]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for incident, outcome in zip(out["incidents"], self.incidents, strict=True):
            for name in ("first_alert", "first_row"):
                at = incident[name]
                incident[name] = at.isoformat() if at is not None else None
            incident["delay_after_first_row_s"] = outcome.delay_after_first_row_s
        return out


def precision_at_k(ranked_keys: Sequence[str], positives: set[str], k: int) -> float:
    """Share of the ``k`` highest-ranked keys that are positives.

    >>> precision_at_k(["a", "b", "c"], {"a", "c"}, 2)
    0.5
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    top = list(ranked_keys)[:k]
    return sum(key in positives for key in top) / k


def label_keys(
    label: IncidentLabel, user_keys: Mapping[str, Collection[str]] | None = None
) -> set[str]:
    """The api keys an incident covers: its ``api_key_ids``, plus its users' keys.

    Args:
        label: the incident.
        user_keys: user to the api keys it used (from the telemetry); without it a
            label's ``users`` cover no key.

    >>> label = IncidentLabel.model_validate({"incident_id": "i", "kind": "k",
    ...     "start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z",
    ...     "users": ["00000000000000aa"]})
    >>> sorted(label_keys(label, {"00000000000000aa": ["k1", "k2"]}))
    ['k1', 'k2']
    """
    keys = set(label.api_key_ids or ())
    if user_keys is not None:
        for user in label.users or ():
            keys.update(user_keys.get(user, ()))
    return keys


def evaluate_detections(
    scored: pd.DataFrame,
    labels: Sequence[IncidentLabel],
    *,
    start: datetime,
    end: datetime,
    user_keys: Mapping[str, Collection[str]] | None = None,
) -> DetectionReport:
    """Score the alerts of ``scored`` rows in ``[start, end)`` against ``labels``.

    Args:
        scored: columns ``api_key_id``, ``event_timestamp`` (tz-aware), ``score``, ``alert``.
        labels: incidents; their ``api_key_ids`` are matched (feature rows are per key),
            and their ``users`` too when ``user_keys`` is given.
        start: first instant of the evaluation window.
        end: end of the evaluation window (exclusive).
        user_keys: user to the api keys it used, so that labels naming ``users`` cover
            those users' keys (see `label_keys`).

    Returns:
        Per-incident detection and time to detect; recall over incidents; precision@k
        over keys ranked by their highest score, with k the number of incident keys;
        the alert rate on rows of keys in no incident.
    """
    rows = scored[(scored["event_timestamp"] >= start) & (scored["event_timestamp"] < end)]
    active = [label for label in labels if label.start < end and label.end + WINDOW_TAIL > start]
    keys_of = {label.incident_id: label_keys(label, user_keys) for label in labels}
    incident_keys = set().union(*keys_of.values())
    outcomes = []
    for label in active:
        keys = keys_of[label.incident_id]
        rows_during = rows[
            rows["api_key_id"].isin(keys)
            & (rows["event_timestamp"] > label.start)
            & (rows["event_timestamp"] <= label.end + WINDOW_TAIL)
        ]
        during = rows_during[rows_during["alert"]]
        first = during["event_timestamp"].min() if not during.empty else None
        first_row = rows_during["event_timestamp"].min() if not rows_during.empty else None
        outcomes.append(
            IncidentOutcome(
                incident_id=label.incident_id,
                kind=label.kind,
                detected=first is not None,
                time_to_detect_s=(first - label.start).total_seconds()
                if first is not None
                else None,
                first_alert=first.to_pydatetime() if first is not None else None,
                first_row=first_row.to_pydatetime() if first_row is not None else None,
            )
        )
    benign = rows[~rows["api_key_id"].isin(incident_keys)]
    by_key = rows.groupby("api_key_id")["score"].max().sort_values(ascending=False)
    active_keys = set().union(*(keys_of[label.incident_id] for label in active)) & set(by_key.index)
    k = max(len(active_keys), 1)
    return DetectionReport(
        incidents=outcomes,
        recall=(sum(o.detected for o in outcomes) / len(outcomes)) if outcomes else None,
        precision_at_k=precision_at_k(list(by_key.index), active_keys, k) if active_keys else None,
        k=k,
        benign_row_alert_rate=float(benign["alert"].mean()) if len(benign) else 0.0,
        benign_keys=int(benign["api_key_id"].nunique()),
        benign_keys_alerted=int(benign.loc[benign["alert"], "api_key_id"].nunique()),
        rows=len(rows),
        alerts=int(rows["alert"].sum()),
        ranked_keys=[
            (str(key), float(score), key in incident_keys) for key, score in by_key.head(10).items()
        ],
    )
