"""Backtest report: qabuse and the tutorial baseline replayed on the twin and on hand-made data."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pyarrow as pa
import pytest

from qabuse_dagster.evaluation.html_report import write_html
from qabuse_dagster.evaluation.labels import IncidentLabel, read_labels
from qabuse_dagster.evaluation.report import (
    BacktestError,
    BacktestReport,
    TelemetryFileError,
    read_telemetry_jsonl,
    run_backtest,
)
from qabuse_dagster.simulation import SimulationResult, simulate
from qabuse_dagster.telemetry.hashing import KeyedHasher

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_METRICS = {
    "type": "object",
    "required": ["recall", "precision_at_k", "pr_auc", "benign_alert_rate"],
    "properties": {
        "recall": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "precision_at_k": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "pr_auc": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "benign_alert_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "median_time_to_detect_s": _NUMBER_OR_NULL,
    },
}
REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["detector", "incidents", "overall", "per_kind"],
    "properties": {
        "detector": {"enum": ["qabuse", "baseline"]},
        "incidents": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["incident_id", "kind", "detected", "time_to_detect_s"],
                "properties": {
                    "incident_id": {"type": "string"},
                    "kind": {"type": "string"},
                    "detected": {"type": "boolean"},
                    "time_to_detect_s": {"type": ["number", "null"], "minimum": 0},
                },
            },
        },
        "overall": _METRICS,
        "per_kind": {"type": "object", "additionalProperties": _METRICS},
    },
}

T0 = datetime(2026, 3, 2, tzinfo=UTC)


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationResult, pa.Table]:
    out = tmp_path_factory.mktemp("twin")
    result = simulate(hours=30, seed=5, out=out, hasher=KeyedHasher.demo())
    return result, read_telemetry_jsonl(result.telemetry_path)


@pytest.fixture(scope="module")
def reports(twin: tuple[SimulationResult, pa.Table]) -> list[BacktestReport]:
    result, table = twin
    labels = read_labels(result.labels_path)
    return [
        run_backtest(table, labels, detector=name, key_kinds=result.api_keys)
        for name in ("qabuse", "baseline")
    ]


def test_qabuse_detects_the_runaway_ci(reports: list[BacktestReport]) -> None:
    qabuse = reports[0]
    assert qabuse.detector == "qabuse"
    assert qabuse.overall.recall is not None and qabuse.overall.recall >= 1.0
    assert qabuse.per_kind["runaway_ci"].recall == 1.0
    (incident,) = qabuse.incidents
    assert incident.detected and incident.time_to_detect_s is not None
    assert 0 <= incident.time_to_detect_s <= 15 * 60
    assert qabuse.overall.pr_auc is not None and qabuse.overall.pr_auc >= 0.5


def test_json_validates_for_both_detectors(reports: list[BacktestReport]) -> None:
    for report in reports:
        data = json.loads(report.to_json())
        jsonschema.validate(data, REPORT_SCHEMA)
        assert data == report.to_dict()


def test_train_and_evaluation_split_at_the_middle(
    twin: tuple[SimulationResult, pa.Table], reports: list[BacktestReport]
) -> None:
    result, _ = twin
    for report in reports:
        middle = result.start + (result.end - result.start) / 2
        assert abs(report.train_until - middle) < timedelta(minutes=30)
        assert report.scored["event_timestamp"].min() >= report.train_until
        assert report.train_rows > 0 and report.eval_rows == len(report.scored)


def test_lookalikes_reported_per_benign_kind(reports: list[BacktestReport]) -> None:
    for report in reports:
        assert {"ci_suite", "research_group", "variational_loop"} <= set(report.lookalikes)
        assert "runaway_ci" not in report.lookalikes
        key_days = sum(m.key_days for m in report.lookalikes.values())
        assert key_days == report.overall.benign_key_days


def test_write_html_side_by_side(reports: list[BacktestReport], tmp_path: Path) -> None:
    page = write_html(reports, tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>")
    assert "qabuse vs baseline" in page
    # PR curve, time to detect, and one timeline per incident and detector.
    assert page.count("data:image/png;base64,") == 2 + 2 * len(reports[0].incidents)


def test_labels_naming_absent_keys_fail(twin: tuple[SimulationResult, pa.Table]) -> None:
    _, table = twin
    label = _label("ghost-1", api_key_ids=("ab" * 8,))
    with pytest.raises(BacktestError, match="ghost-1"):
        run_backtest(table, [label])


def test_train_until_outside_the_span_fails(twin: tuple[SimulationResult, pa.Table]) -> None:
    _, table = twin
    with pytest.raises(BacktestError, match="no training or no evaluation"):
        run_backtest(table, [], train_until=datetime(2020, 1, 1, tzinfo=UTC))


def _label(incident_id: str, **targets: tuple[str, ...]) -> IncidentLabel:
    return IncidentLabel.model_validate(
        {
            "incident_id": incident_id,
            "kind": "key_leak",
            "start": (T0 + timedelta(hours=5)).isoformat(),
            "end": (T0 + timedelta(hours=6)).isoformat(),
            **{k: list(v) for k, v in targets.items()},
        }
    )


def _hand_made_telemetry() -> pa.Table:
    """Three steady users over 6 hours; user ``abuser`` bursts on two keys from hour 5."""
    rows: dict[str, list[object]] = {
        k: [] for k in ("user", "api_key_id", "timestamp", "status", "shots", "code_hash")
    }

    def add(user: str, key: str, at: datetime) -> None:
        for column, value in zip(rows, (user, key, at, "submitted", 100, "c0" * 8), strict=True):
            rows[column].append(value)

    users = {"a1" * 8: ["0a" * 8], "b2" * 8: ["0b" * 8], "c3" * 8: ["1c" * 8, "2c" * 8]}
    for minute in range(6 * 60):
        for i, (user, keys) in enumerate(users.items()):
            for j in range(1 + (minute + i) % 3):
                add(
                    user,
                    keys[(minute + j) % len(keys)],
                    T0 + timedelta(minutes=minute, seconds=7 * j),
                )
    for second in range(0, 3600, 2):  # 30 per minute per key from hour 5
        for key in users["c3" * 8]:
            add("c3" * 8, key, T0 + timedelta(hours=5, seconds=second))
    table = pa.table(rows)
    return table.set_column(
        2, "timestamp", pa.array(rows["timestamp"], pa.timestamp("us", tz="UTC"))
    )


@pytest.mark.parametrize("detector", ["qabuse", "baseline"])
def test_users_labelled_incident_maps_to_their_keys(detector: str) -> None:
    label = _label("leak-1", users=("c3" * 8,))
    report = run_backtest(
        _hand_made_telemetry(),
        [label],
        train_until=T0 + timedelta(hours=3),
        detector=detector,  # type: ignore[arg-type]
    )
    assert report.incident_keys["leak-1"] == ["1c" * 8, "2c" * 8]
    (outcome,) = report.incidents
    assert outcome.detected
    assert report.overall.recall == 1.0
    assert report.overall.k == 2
    assert report.overall.precision_at_k == 1.0
    jsonschema.validate(report.to_dict(), REPORT_SCHEMA)


def test_labels_naming_absent_users_fail() -> None:
    with pytest.raises(BacktestError, match=r"leak-2.*users"):
        run_backtest(_hand_made_telemetry(), [_label("leak-2", users=("dd" * 8,))])


def test_read_telemetry_jsonl_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TelemetryFileError, match="empty"):
        read_telemetry_jsonl(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n{not json\n")
    with pytest.raises(TelemetryFileError, match=r"bad\.jsonl:2: .*not JSON"):
        read_telemetry_jsonl(bad)
