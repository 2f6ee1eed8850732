"""Monitoring in Dagster: ``feature_drift`` against the champion's stored reference, the
hourly ``continuous_evaluation``, the drift and label sensors, and the schedules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from models.registry import families
from qabuse_dagster import model_registry, settings
from qabuse_dagster.evaluation.drift import SCORE_FEATURE

pytestmark = pytest.mark.integration


def _run(config: dict[str, Any] | None = None) -> Any:
    """``feature_drift`` alone, through ``monitoring_job``."""
    from dagster import AssetKey, DagsterInstance

    from qabuse_dagster.definitions import build_definitions
    from qabuse_dagster.pipeline import QUIET_RUN_CONFIG

    run_config = dict(QUIET_RUN_CONFIG)
    if config is not None:
        run_config["ops"] = {"feature_drift": {"config": config}}
    job = build_definitions().resolve_job_def("monitoring_job")
    return job.execute_in_process(
        instance=DagsterInstance.get(),
        run_config=run_config,
        asset_selection=[AssetKey("feature_drift")],
        raise_on_error=False,
    )


@pytest.fixture(scope="module")
def default_drift(pipeline_run: Any) -> Any:
    """One ``feature_drift`` run at the default levels on the session twin, shared."""
    return _run()


def _metadata(result: Any, asset: str) -> Any:
    (event,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset
    ]
    return event.materialization.metadata


def _checks(result: Any) -> dict[str, Any]:
    """The run's asset check evaluations by check name."""
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_the_champion_version_carries_its_drift_reference(pipeline_run: Any) -> None:
    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    reference = model_registry.load_drift_reference(champion)
    assert reference is not None
    assert {"submissions_per_min_1h", "interarrival_regularity_1h", SCORE_FEATURE} <= set(reference)
    for bins in reference.values():
        assert len(bins["shares"]) == len(bins["edges"]) + 1
        assert sum(bins["shares"]) == pytest.approx(1.0)
    # A family's own version has none: drift is watched on the served ensemble.
    family = model_registry.resolve_alias(
        settings.CHALLENGER_ALIAS, model_registry.family_model_name(sorted(families())[0])
    )
    assert model_registry.load_drift_reference(family) is None


def test_feature_drift_reports_every_input_with_a_table_a_plot_and_its_checks(
    default_drift: Any,
) -> None:
    result = default_drift
    assert result.success
    metadata = _metadata(result, "feature_drift")
    assert metadata["features"].value >= 20
    assert metadata["rows_compared"].value > 1000
    assert metadata["drift"].value.count("\n") >= metadata["features"].value
    assert metadata["plot"].value.startswith("![reference against current bins](data:image/png")
    assert metadata["champion"].value.startswith(settings.model_name())
    checks = _checks(result)
    assert set(checks) == {"psi_below_warn", "psi_below_error"}
    # The session twin is a small deployment: its drift is shown, and not judged.
    assert metadata["keys"].value < 30 and metadata["judged"].value is False
    assert checks["psi_below_warn"].passed and checks["psi_below_error"].passed
    assert "noise" in str(checks["psi_below_error"].metadata["why"].value)


def test_the_drift_reading_includes_the_champions_own_score(default_drift: Any) -> None:
    metadata = _metadata(default_drift, "feature_drift")
    assert metadata["score_level"].value in {"ok", "warn", "error"}
    assert metadata["score_psi"].value >= 0.0
    assert "| model_score" in metadata["drift"].value
    # The sensor counts inputs only: the score is not one of them.
    assert metadata["features"].value == metadata["drift"].value.count("\n") - 2


def test_a_deployment_too_small_to_judge_starts_no_training(default_drift: Any) -> None:
    from dagster import DagsterInstance, SkipReason
    from support.sensor_daemon import runs_of

    # (Before the tests below, which report drift readings at made-up levels.) A populous
    # twin without drift starts nothing either: see test_drift_retraining.
    assert default_drift.success
    quiet, _ = _tick(None)
    assert isinstance(quiet, SkipReason)
    assert "not judged" in str(quiet.skip_message)
    assert runs_of(DagsterInstance.get(), "drift_sensor") == []


def test_the_check_levels_are_configurable(pipeline_run: Any) -> None:
    # At PSI 0 every input is over both levels: both checks fail, the error one as ERROR
    # (judged from a single key, for the test).
    result = _run({"psi_warn": 0.0, "psi_error": 0.0, "min_keys": 1})
    assert result.success  # a failed check does not fail the run; it is reported
    checks = _checks(result)
    assert {name: e.passed for name, e in checks.items()} == {
        "psi_below_warn": False,
        "psi_below_error": False,
    }
    assert {name: e.severity.value for name, e in checks.items()} == {
        "psi_below_warn": "WARN",
        "psi_below_error": "ERROR",
    }
    refused = _run({"psi_warn": 0.3, "psi_error": 0.2})
    assert not refused.success


# --- the drift sensor: Dagster's own sensor evaluation, on the session's instance ------


def _tick(cursor: str | None) -> tuple[Any, str | None]:
    from dagster import DagsterInstance, build_sensor_context

    from qabuse_dagster.defs.sensors import drift_sensor

    context = build_sensor_context(instance=DagsterInstance.get(), cursor=cursor)
    return drift_sensor(context), context.cursor


def _report_reading(features_error: int) -> None:
    """A ``feature_drift`` reading reported to the session's instance, as the asset writes
    its metadata (the asset itself is run in the tests above and in test_drift_retraining)."""
    from dagster import AssetMaterialization, DagsterInstance

    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    DagsterInstance.get().report_runless_asset_event(
        AssetMaterialization(
            "feature_drift",
            metadata={
                "champion": f"{champion.name} v{champion.version}",
                "features_error": features_error,
                "features": 25,
                "window_hours": 24.0,
                "judged": True,
            },
        )
    )


def test_the_drift_sensor_retrains_once_per_drifted_champion(pipeline_run: Any) -> None:
    from dagster import RunRequest, SkipReason

    # No drift: no input at the error level.
    _report_reading(0)
    quiet, cursor = _tick(None)
    assert isinstance(quiet, SkipReason) and "make a drift episode" in str(quiet.skip_message)
    assert isinstance(_tick(cursor)[0], SkipReason)  # nothing new since

    # Drift: every input at the error level.
    _report_reading(25)
    request, cursor = _tick(cursor)
    assert isinstance(request, RunRequest)
    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    assert request.run_key == f"drift/{champion.name} v{champion.version}"
    assert request.tags["qabuse/trigger"] == "drift_sensor"
    history = request.run_config["ops"]["detector_history"]["config"]
    assert history == {"eval_hours": 24.0}  # judged on the drifted day
    assert isinstance(_tick(cursor)[0], SkipReason)  # the same materialisation: no second ask

    # The drift persists: the same episode asks with the same key, which Dagster runs once.
    _report_reading(25)
    again, _ = _tick(cursor)
    assert isinstance(again, RunRequest) and again.run_key == request.run_key


def test_a_drift_retraining_cools_down() -> None:
    from dagster import RunRequest, SkipReason

    from qabuse_dagster.defs.sensors import DRIFT_COOLDOWN, DriftReading, drift_decision

    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    drifted = DriftReading(champion="qabuse-api-key-detector v3", features_error=5, features=30)
    assert isinstance(drift_decision(drifted, None, now), RunRequest)
    recent = now - DRIFT_COOLDOWN / 2
    cooling = drift_decision(drifted, recent, now)
    assert isinstance(cooling, SkipReason) and "cooling down" in str(cooling.skip_message)
    assert isinstance(drift_decision(drifted, now - DRIFT_COOLDOWN, now), RunRequest)
    few = DriftReading(champion="qabuse-api-key-detector v3", features_error=2, features=30)
    assert isinstance(drift_decision(few, None, now), SkipReason)
    assert isinstance(drift_decision(few, None, now, min_features=2), RunRequest)
    unjudged = DriftReading(
        champion="qabuse-api-key-detector v3", features_error=25, features=30, judged=False
    )
    skipped = drift_decision(unjudged, None, now)
    assert isinstance(skipped, SkipReason) and "not judged" in str(skipped.skip_message)


def test_continuous_evaluation_keeps_a_time_series_in_mlflow(pipeline_run: Any) -> None:
    from dagster import DagsterInstance

    from qabuse_dagster.definitions import build_definitions
    from qabuse_dagster.pipeline import QUIET_RUN_CONFIG

    job = build_definitions().resolve_job_def("evaluation_job")
    for hours in (1.0, 24.0):
        result = job.execute_in_process(
            instance=DagsterInstance.get(),
            run_config={
                **QUIET_RUN_CONFIG,
                "ops": {"continuous_evaluation": {"config": {"window_hours": hours}}},
            },
        )
        assert result.success
    metadata = _metadata(result, "continuous_evaluation")
    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    assert metadata["champion"].value == f"{champion.name} v{champion.version}"
    # The session twin's runaway CI runs to its end: the last day holds it, alerted on.
    assert metadata["labelled_incident_in_window"].value is True
    assert metadata["recall"].value == 1.0
    assert 0.0 < metadata["precision"].value <= 1.0
    assert 0.0 <= metadata["benign_alert_rate"].value <= 0.05
    assert metadata["plot"].value.startswith("![hourly precision and benign alert rate](data:")
    client = model_registry.configure()
    experiment = client.get_experiment_by_name(model_registry.MONITORING_EXPERIMENT)
    assert experiment is not None
    (run,) = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{model_registry.MONITORED_VERSION_TAG}` = "
        f"'{champion.name} v{champion.version}'",
    )
    # The hour and the day are two series: a point never mixes the two windows.
    assert {"benign_alert_rate", "benign_alert_rate_24h", "recall_24h"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "benign_alert_rate")) >= 1


def test_the_schedules_ask_for_their_jobs_at_their_times() -> None:
    from dagster import RunRequest, build_schedule_context

    from qabuse_dagster.defs.jobs import hourly_monitoring_schedule, weekly_training_schedule

    monday = datetime(2026, 12, 7, 3, tzinfo=UTC)
    for schedule, job in (
        (weekly_training_schedule, "training_job"),
        (hourly_monitoring_schedule, "monitoring_job"),
    ):
        (request,) = (
            schedule.evaluate_tick(
                build_schedule_context(scheduled_execution_time=monday)
            ).run_requests
            or []
        )
        assert isinstance(request, RunRequest)
        assert schedule.job_name == job
    assert weekly_training_schedule.cron_schedule == "0 3 * * 1"
    assert hourly_monitoring_schedule.cron_schedule == "15 * * * *"


# --- the label sensor: enough new analyst labels re-evaluate the champion --------------


def _label(i: int, start: datetime) -> Any:
    from qabuse_dagster.telemetry.labels import IncidentLabel

    return IncidentLabel(
        incident_id=f"analyst-{i}",
        kind="key_leak",
        start=start,
        end=start + timedelta(hours=1),
        api_key_ids=(f"{i:064x}",),
    )


def test_a_handful_of_new_labels_starts_one_evaluation_over_their_window() -> None:
    from dagster import RunRequest, SkipReason

    from qabuse_dagster.defs.sensors import LABEL_MAX_WINDOW, LABEL_MIN_NEW, label_decision

    newest = datetime(2026, 12, 7, 12, tzinfo=UTC)
    labels = [_label(i, newest - timedelta(hours=30 - i)) for i in range(LABEL_MIN_NEW + 2)]
    few = label_decision(labels[: LABEL_MIN_NEW - 1], 0, newest)
    assert isinstance(few, SkipReason) and f"{LABEL_MIN_NEW} start one" in str(few.skip_message)
    request = label_decision(labels, 2, newest)  # 5 new past the 2 already seen
    assert isinstance(request, RunRequest)
    assert request.run_key == f"labels/{len(labels)}"
    window = request.run_config["ops"]["continuous_evaluation"]["config"]["window_hours"]
    assert window == 28.0  # from the earliest new label's start (28 h before) to the newest row
    assert isinstance(label_decision(labels, len(labels), newest), SkipReason)
    old = [_label(i, newest - timedelta(days=30)) for i in range(LABEL_MIN_NEW)]
    capped = label_decision(old, 0, newest)
    assert isinstance(capped, RunRequest)
    config = capped.run_config["ops"]["continuous_evaluation"]["config"]
    assert config["window_hours"] == LABEL_MAX_WINDOW / timedelta(hours=1)
    assert isinstance(label_decision(labels, 0, None), SkipReason)


def test_the_label_sensor_reads_the_analyst_label_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster import RunRequest, SkipReason, build_sensor_context

    from qabuse_dagster.defs.sensors import LABEL_MIN_NEW, label_sensor
    from qabuse_dagster.telemetry.labels import write_labels

    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    paths = settings.paths()
    newest = datetime(2026, 12, 7, 12, tzinfo=UTC)
    paths.api_key_windows.mkdir(parents=True)
    pd.DataFrame({"api_key_id": ["a" * 64], "event_timestamp": [pd.Timestamp(newest)]}).to_parquet(
        paths.api_key_windows / "2026-12-07-12.parquet"
    )
    paths.analyst_labels.parent.mkdir(parents=True, exist_ok=True)
    labels = [_label(i, newest - timedelta(hours=3)) for i in range(LABEL_MIN_NEW)]
    write_labels(labels[:2], paths.analyst_labels)
    context = build_sensor_context()
    assert isinstance(label_sensor(context), SkipReason)
    assert context.cursor is None  # nothing asked: the two labels still count as new
    write_labels(labels, paths.analyst_labels)
    request = label_sensor(context)
    assert isinstance(request, RunRequest) and request.run_key == f"labels/{LABEL_MIN_NEW}"
    assert context.cursor == str(LABEL_MIN_NEW)
    assert isinstance(label_sensor(context), SkipReason)
