"""Continuous evaluation's figures: a window's alerted keys against the labels active in it."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pandas as pd

from qabuse_dagster.evaluation.continuous import window_figures
from qabuse_dagster.telemetry.labels import FALSE_POSITIVE_KIND, IncidentLabel

START = datetime(2026, 11, 2, 10, tzinfo=UTC)


def h(name: str) -> str:
    """A contract-valid identifier (hex digest) for a readable name."""
    return hashlib.sha256(name.encode()).hexdigest()


END = START + timedelta(hours=1)


def _rows(verdicts: dict[str, bool], at: datetime = START + timedelta(minutes=30)) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "api_key_id": [h(key) for key in verdicts],
            "event_timestamp": pd.Timestamp(at),
            "score": [1.0 if alert else 0.0 for alert in verdicts.values()],
            "alert": list(verdicts.values()),
        }
    )


def _label(keys: tuple[str, ...] = (), users: tuple[str, ...] = (), **kw: object) -> IncidentLabel:
    fields: dict[str, object] = {
        "incident_id": "i-1",
        "kind": "key_leak",
        "start": START - timedelta(hours=2),
        "end": START + timedelta(minutes=10),
        "api_key_ids": tuple(map(h, keys)) or None,
        "users": tuple(map(h, users)) or None,
        **kw,
    }
    return IncidentLabel(**fields)  # type: ignore[arg-type]


def test_keys_an_active_incident_names_are_hits_and_the_rest_are_benign() -> None:
    rows = _rows({"leak": True, "b1": True, "b2": False, "b3": False, "quiet-leak": False})
    figures = window_figures(rows, [_label(("leak", "quiet-leak"))], START, END)
    assert (figures.active_keys, figures.alerted_keys, figures.incident_keys) == (5, 2, 2)
    assert figures.precision == 0.5  # leak of {leak, b1}
    assert figures.benign_alert_rate == 1 / 3  # b1 of {b1, b2, b3}
    assert figures.recall == 0.5  # leak of {leak, quiet-leak}
    assert set(figures.metrics()) >= {"precision", "benign_alert_rate", "recall"}


def test_a_label_outside_the_window_or_saying_legitimate_is_no_incident() -> None:
    rows = _rows({"k": True, "b": False})
    earlier = _label(("k",), end=START)  # ended as the window starts
    cleared = _label(("k",), kind=FALSE_POSITIVE_KIND, incident_id="analyst-fp-1")
    for labels in ([earlier], [cleared]):
        figures = window_figures(rows, labels, START, END)
        assert figures.incident_keys == 0
        assert figures.precision == 0.0 and figures.recall is None
        assert figures.benign_alert_rate == 0.5


def test_a_label_on_users_covers_their_keys() -> None:
    rows = _rows({"k1": True, "k2": True, "b": False})
    figures = window_figures(
        rows, [_label(users=("mallory",))], START, END, {h("mallory"): [h("k1")]}
    )
    assert figures.incident_keys == 1 and figures.precision == 0.5 and figures.recall == 1.0


def test_rows_outside_the_window_do_not_count_and_no_alert_has_no_precision() -> None:
    rows = pd.concat([_rows({"a": False}), _rows({"late": True}, at=END)])
    figures = window_figures(rows, [], START, END)
    assert figures.active_keys == 1 and figures.alerted_keys == 0
    assert figures.precision is None and figures.benign_alert_rate == 0.0
    assert "precision" not in figures.metrics()
