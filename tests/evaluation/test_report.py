"""Backtest report: the ensemble, each family and the baseline replayed on the twin and by hand."""

from __future__ import annotations

import inspect
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pyarrow as pa
import pytest

from qabuse_dagster.evaluation.families import ENSEMBLE, resolve_names
from qabuse_dagster.evaluation.html_report import write_html
from qabuse_dagster.evaluation.report import (
    BASELINE,
    BacktestError,
    BacktestReport,
    TelemetryFileError,
    judge,
    read_telemetry_jsonl,
    run_backtest,
    run_backtests,
)
from qabuse_dagster.simulation import SimulationResult, simulate
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.labels import BENIGN_LABEL_KIND, IncidentLabel, read_labels

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_METRICS = {
    "type": "object",
    "required": [
        "recall",
        "precision_at_k",
        "pr_auc",
        "benign_key_day_alert_rate",
        "benign_row_alert_rate",
    ],
    "properties": {
        "recall": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "precision_at_k": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "pr_auc": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "benign_key_day_alert_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "benign_row_alert_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "median_time_to_detect_s": _NUMBER_OR_NULL,
        "median_delay_after_first_row_s": _NUMBER_OR_NULL,
    },
}
REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["detector", "incidents", "overall", "per_kind"],
    "properties": {
        "detector": {"type": "string", "minLength": 1},
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
                    "delay_after_first_row_s": {"type": ["number", "null"], "minimum": 0},
                },
            },
        },
        "overall": _METRICS,
        "per_kind": {"type": "object", "additionalProperties": _METRICS},
    },
}

T0 = datetime(2026, 3, 2, tzinfo=UTC)
#: Every detector a default ``qabuse evaluate`` reports, champion first.
ALL = [ENSEMBLE, *resolve_names("all"), BASELINE]


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationResult, pa.Table]:
    """Three days: the families train on warmed-up rows (after the first day)."""
    out = tmp_path_factory.mktemp("twin")
    result = simulate(hours=120, seed=5, out=out, hasher=KeyedHasher.demo())
    return result, read_telemetry_jsonl(result.telemetry_path)


@pytest.fixture(scope="module")
def reports(twin: tuple[SimulationResult, pa.Table]) -> list[BacktestReport]:
    result, table = twin
    labels = read_labels(result.labels_path)
    return run_backtests(table, labels, detectors=ALL, key_kinds=result.api_keys)


def test_one_report_per_detector_in_order(reports: list[BacktestReport]) -> None:
    assert [r.detector for r in reports] == ALL
    thresholds = {r.detector: r.threshold for r in reports}
    assert len(set(thresholds.values())) == len(ALL)  # each its own fit, not one shared


def test_the_ensemble_detects_the_runaway_ci(reports: list[BacktestReport]) -> None:
    ensemble = reports[0]
    assert ensemble.detector == ENSEMBLE
    assert ensemble.overall.recall is not None and ensemble.overall.recall >= 1.0
    assert ensemble.per_kind["runaway_ci"].recall == 1.0
    (incident,) = ensemble.incidents
    assert incident.detected and incident.time_to_detect_s is not None
    assert 0 <= incident.time_to_detect_s <= 15 * 60
    assert ensemble.overall.pr_auc is not None and ensemble.overall.pr_auc >= 0.5


def test_the_ensemble_keeps_benign_alerts_near_its_budget(reports: list[BacktestReport]) -> None:
    """Trained with a 1% key-day budget; a loose ceiling for a day and a half of few keys."""
    overall = reports[0].overall
    assert overall.benign_key_days > 0
    assert overall.benign_key_day_alert_rate <= 0.1
    assert overall.benign_key_days_alerted == round(
        overall.benign_key_day_alert_rate * overall.benign_key_days
    )
    assert 0.0 <= overall.benign_row_alert_rate <= 1.0


def test_any_family_that_sees_the_incident_makes_the_ensemble_see_it(
    reports: list[BacktestReport],
) -> None:
    ensemble, families = reports[0], reports[1:-1]
    (outcome,) = ensemble.incidents
    detected_by = [r.detector for r in families if r.incidents[0].detected]
    assert detected_by, "no family detected the runaway CI"
    first = min(
        r.incidents[0].first_alert for r in families if r.incidents[0].first_alert is not None
    )
    assert outcome.first_alert is not None
    assert outcome.first_alert <= first + timedelta(minutes=15)


def test_judge_gives_the_figures_of_the_backtest(
    twin: tuple[SimulationResult, pa.Table], reports: list[BacktestReport]
) -> None:
    result, table = twin
    ensemble = reports[0]
    again = judge(
        ENSEMBLE,
        ensemble.scored,
        ensemble.threshold,
        table,
        read_labels(result.labels_path),
        ensemble.train_until,
        train_rows=ensemble.train_rows,
        key_kinds=result.api_keys,
    )
    assert again.to_dict() == ensemble.to_dict()


def test_the_single_detector_default_is_the_champion() -> None:
    assert inspect.signature(run_backtest).parameters["detector"].default == ENSEMBLE


def test_an_unknown_detector_is_refused(twin: tuple[SimulationResult, pa.Table]) -> None:
    _, table = twin
    with pytest.raises(BacktestError, match=r"unknown detector.*isolation_forest"):
        run_backtests(table, [], detectors=["nope", BASELINE])


def test_json_validates_for_every_detector(reports: list[BacktestReport]) -> None:
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
    pair = [reports[0], reports[-1]]
    page = write_html(pair, tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>")
    assert "ensemble vs baseline" in page
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


@pytest.fixture(scope="module")
def hand_made_reports() -> list[BacktestReport]:
    """A key family, the user family and the baseline on the hand-made burst."""
    return run_backtests(
        _hand_made_telemetry(),
        [_label("leak-1", users=("c3" * 8,))],
        train_until=T0 + timedelta(hours=3),
        detectors=["isolation_forest", "user_isolation_forest", BASELINE],
    )


@pytest.mark.parametrize("index", [0, 1, 2])
def test_users_labelled_incident_maps_to_their_keys(
    hand_made_reports: list[BacktestReport], index: int
) -> None:
    report = hand_made_reports[index]
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


def test_an_upheld_appeal_label_is_read_as_benign(
    twin: tuple[SimulationResult, pa.Table], reports: list[BacktestReport]
) -> None:
    """The label an upheld appeal writes makes its key benign, not an incident."""
    result, table = twin
    ensemble = reports[0]
    labels = read_labels(result.labels_path)
    incident_keys = {k for label in labels for k in (label.api_key_ids or [])}
    some_key = sorted(set(ensemble.scored["api_key_id"]) - incident_keys)[0]
    appealed = IncidentLabel.model_validate(
        {
            "incident_id": "ledger-7",
            "kind": BENIGN_LABEL_KIND,
            "start": ensemble.train_until.isoformat(),
            "end": (ensemble.train_until + timedelta(days=1)).isoformat(),
            "api_key_ids": [some_key],
        }
    )
    again = judge(
        ENSEMBLE,
        ensemble.scored,
        ensemble.threshold,
        table,
        [*labels, appealed],
        ensemble.train_until,
        train_rows=ensemble.train_rows,
        key_kinds=result.api_keys,
    )
    assert BENIGN_LABEL_KIND not in again.per_kind
    assert [i.incident_id for i in again.incidents] == [i.incident_id for i in ensemble.incidents]
    assert again.overall.benign_key_days == ensemble.overall.benign_key_days
