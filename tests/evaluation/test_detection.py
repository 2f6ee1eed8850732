"""Detection metrics: per-incident detection and delay, recall, precision@k, benign alerts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from qabuse_dagster.evaluation.detection import (
    WINDOW_TAIL,
    DetectionReport,
    evaluate_detections,
    precision_at_k,
)
from qabuse_dagster.telemetry.labels import IncidentLabel

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
ABUSER = "a" * 16
ACCOMPLICE = "b" * 16
BENIGN_1 = "c" * 16
BENIGN_2 = "d" * 16
INC_START = T0 + 10 * MINUTE
INC_END = T0 + 20 * MINUTE


def _label(
    incident_id: str = "inc-1",
    keys: tuple[str, ...] = (ABUSER,),
    start: datetime = INC_START,
    end: datetime = INC_END,
) -> IncidentLabel:
    return IncidentLabel(
        incident_id=incident_id, kind="credential_stuffing", start=start, end=end, api_key_ids=keys
    )


def _scored(rows: list[tuple[str, int, float, bool]]) -> pd.DataFrame:
    """Rows as (api_key_id, minutes after T0, score, alert)."""
    return pd.DataFrame(
        {
            "api_key_id": [r[0] for r in rows],
            "event_timestamp": pd.to_datetime([T0 + r[1] * MINUTE for r in rows], utc=True),
            "score": [r[2] for r in rows],
            "alert": [r[3] for r in rows],
        }
    )


def _evaluate(
    scored: pd.DataFrame,
    labels: list[IncidentLabel],
    start: datetime = T0,
    end: datetime = T0 + timedelta(hours=1),
) -> DetectionReport:
    return evaluate_detections(scored, labels, start=start, end=end)


def test_precision_at_k() -> None:
    assert precision_at_k(["a", "b", "c", "d"], {"a", "c"}, 2) == 0.5
    assert precision_at_k(["a", "b", "c", "d"], {"a", "b"}, 2) == 1.0
    assert precision_at_k(["a", "b", "c", "d"], {"c", "d"}, 2) == 0.0
    assert precision_at_k(["a", "b", "c", "d"], {"a"}, 4) == 0.25
    # Fewer ranked keys than k: the missing ones count as misses.
    assert precision_at_k(["a"], {"a"}, 2) == 0.5


@pytest.mark.parametrize("k", [0, -1])
def test_precision_at_k_rejects_non_positive_k(k: int) -> None:
    with pytest.raises(ValueError, match="k must be positive"):
        precision_at_k(["a"], {"a"}, k)


def test_detected_incident_with_exact_time_to_detect() -> None:
    scored = _scored(
        [
            (ABUSER, 5, 0.9, True),  # before the incident: does not count
            (ABUSER, 10, 0.9, True),  # at start: the row's window is before the start
            (ABUSER, 12, 0.4, False),
            (ABUSER, 13, 0.8, True),  # first alert of the incident
            (ABUSER, 15, 0.95, True),
            (BENIGN_1, 13, 0.1, False),
            (BENIGN_2, 13, 0.2, False),
        ]
    )
    report = _evaluate(scored, [_label()])

    (outcome,) = report.incidents
    assert outcome.incident_id == "inc-1"
    assert outcome.kind == "credential_stuffing"
    assert outcome.detected is True
    assert outcome.time_to_detect_s == 180.0
    assert outcome.first_alert == T0 + 13 * MINUTE
    # The first row it could have alerted on came at minute 12: one row late.
    assert outcome.first_row == T0 + 12 * MINUTE
    assert outcome.delay_after_first_row_s == 60.0
    assert report.recall == 1.0
    assert report.rows == 7
    assert report.alerts == 4
    assert report.to_dict()["incidents"][0]["first_alert"] == (T0 + 13 * MINUTE).isoformat()
    assert report.to_dict()["incidents"][0]["delay_after_first_row_s"] == 60.0


def test_alert_only_before_the_incident_is_a_miss() -> None:
    scored = _scored(
        [
            (ABUSER, 9, 0.9, True),
            (ABUSER, 10, 0.9, True),
            (ABUSER, 11, 0.3, False),
            (BENIGN_1, 11, 0.1, False),
        ]
    )
    report = _evaluate(scored, [_label()])

    (outcome,) = report.incidents
    assert outcome.detected is False
    assert outcome.time_to_detect_s is None
    assert outcome.first_alert is None
    assert report.recall == 0.0


def test_alert_in_the_window_tail_counts_but_not_after_it() -> None:
    tail_minutes = int(WINDOW_TAIL / MINUTE)
    at_tail = _scored([(ABUSER, 20 + tail_minutes, 0.9, True)])
    after_tail = _scored([(ABUSER, 20 + tail_minutes + 1, 0.9, True)])

    assert _evaluate(at_tail, [_label()]).incidents[0].detected is True
    assert _evaluate(after_tail, [_label()]).incidents[0].detected is False


def test_alert_on_another_key_does_not_detect_the_incident() -> None:
    scored = _scored([(ABUSER, 12, 0.2, False), (BENIGN_1, 12, 0.9, True)])
    report = _evaluate(scored, [_label()])
    assert report.incidents[0].detected is False
    assert report.recall == 0.0


def test_recall_over_several_incidents() -> None:
    labels = [
        _label("inc-1", (ABUSER,)),
        _label("inc-2", (ACCOMPLICE,), start=T0 + 30 * MINUTE, end=T0 + 40 * MINUTE),
    ]
    scored = _scored([(ABUSER, 11, 0.9, True), (ACCOMPLICE, 31, 0.2, False)])
    report = _evaluate(scored, labels)
    assert [o.detected for o in report.incidents] == [True, False]
    assert report.recall == 0.5


def test_benign_row_alert_rate_counts_only_keys_in_no_incident() -> None:
    scored = _scored(
        [
            (ABUSER, 12, 0.9, True),
            (ABUSER, 50, 0.9, True),  # an incident key outside its incident: not benign
            (BENIGN_1, 12, 0.7, True),
            (BENIGN_1, 13, 0.1, False),
            (BENIGN_2, 12, 0.1, False),
            (BENIGN_2, 13, 0.1, False),
        ]
    )
    report = _evaluate(scored, [_label()])

    assert report.benign_row_alert_rate == pytest.approx(1 / 4)
    assert report.benign_keys == 2
    assert report.benign_keys_alerted == 1


def test_benign_row_alert_rate_is_zero_without_benign_rows() -> None:
    report = _evaluate(_scored([(ABUSER, 12, 0.9, True)]), [_label()])
    assert report.benign_row_alert_rate == 0.0
    assert report.benign_keys == 0


def test_incidents_and_rows_outside_the_window_are_ignored() -> None:
    labels = [
        _label("inc-1", (ABUSER,)),
        _label(
            "inc-old",
            (ACCOMPLICE,),
            start=T0 - timedelta(hours=3),
            end=T0 - timedelta(hours=2),
        ),
        _label(
            "inc-later", (ACCOMPLICE,), start=T0 + timedelta(hours=2), end=T0 + timedelta(hours=3)
        ),
    ]
    scored = _scored(
        [
            (ABUSER, 12, 0.9, True),
            (ABUSER, -1, 0.9, True),  # before the window
            (BENIGN_1, 60, 0.9, True),  # at the window's end: excluded
            (BENIGN_1, 30, 0.1, False),
        ]
    )
    report = _evaluate(scored, labels)

    assert [o.incident_id for o in report.incidents] == ["inc-1"]
    assert report.recall == 1.0
    assert report.rows == 2
    assert report.alerts == 1
    assert report.benign_row_alert_rate == 0.0


def test_no_active_incident_gives_no_recall() -> None:
    report = _evaluate(_scored([(BENIGN_1, 5, 0.1, False)]), [])
    assert report.incidents == []
    assert report.recall is None
    assert report.precision_at_k is None


def test_precision_at_k_uses_the_number_of_incident_keys() -> None:
    labels = [_label("inc-1", (ABUSER, ACCOMPLICE))]
    scored = _scored(
        [
            (ABUSER, 12, 0.9, True),
            (ABUSER, 13, 0.2, False),
            (ACCOMPLICE, 12, 0.5, False),
            (BENIGN_1, 12, 0.7, True),
            (BENIGN_2, 12, 0.1, False),
        ]
    )
    report = _evaluate(scored, labels)

    # Keys by highest score: ABUSER 0.9, BENIGN_1 0.7, ACCOMPLICE 0.5, BENIGN_2 0.1.
    assert report.k == 2
    assert report.precision_at_k == 0.5
    assert [key for key, _, _ in report.ranked_keys] == [ABUSER, BENIGN_1, ACCOMPLICE, BENIGN_2]
    assert [is_incident for _, _, is_incident in report.ranked_keys] == [True, False, True, False]
    assert report.ranked_keys[0][1] == 0.9

    perfect = scored.assign(score=[0.9, 0.2, 0.8, 0.7, 0.1])
    assert _evaluate(perfect, labels).precision_at_k == 1.0
