"""Drift monitoring in Dagster: ``feature_drift`` against the champion's stored reference."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from models.registry import families
from qabuse_dagster import model_registry, settings
from qabuse_dagster.evaluation.drift import SCORE_FEATURE

pytestmark = pytest.mark.integration


def _run(config: dict[str, Any] | None = None) -> Any:
    from dagster import DagsterInstance

    from qabuse_dagster.definitions import build_definitions
    from qabuse_dagster.pipeline import QUIET_RUN_CONFIG

    run_config = dict(QUIET_RUN_CONFIG)
    if config is not None:
        run_config["ops"] = {"feature_drift": {"config": config}}
    job = build_definitions().resolve_job_def("monitoring_job")
    return job.execute_in_process(
        instance=DagsterInstance.get(), run_config=run_config, raise_on_error=False
    )


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
    pipeline_run: Any,
) -> None:
    result = _run()
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["features"].value >= 20
    assert metadata["rows_compared"].value > 1000
    assert metadata["drift"].value.count("\n") >= metadata["features"].value
    assert metadata["plot"].value.startswith("![reference against current bins](data:image/png")
    assert metadata["champion"].value.startswith(settings.model_name())
    checks = _checks(result)
    assert set(checks) == {"psi_below_warn", "psi_below_error"}
    warned = metadata["features_warn_or_worse"].value
    assert checks["psi_below_warn"].passed == (warned == 0)
    assert checks["psi_below_error"].passed == (metadata["features_error"].value == 0)


def test_the_check_levels_are_configurable(pipeline_run: Any) -> None:
    # At PSI 0 every input is over both levels: both checks fail, the error one as ERROR.
    result = _run({"psi_warn": 0.0, "psi_error": 0.0})
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


def test_the_drift_sensor_retrains_once_per_drifted_champion(pipeline_run: Any) -> None:
    from dagster import RunRequest, SkipReason

    # No drift: every input under levels no population reaches.
    assert _run({"psi_warn": 50.0, "psi_error": 100.0}).success
    quiet, cursor = _tick(None)
    assert isinstance(quiet, SkipReason) and "make a drift episode" in str(quiet.skip_message)
    assert isinstance(_tick(cursor)[0], SkipReason)  # nothing new since

    # Drift: every input at the error level.
    assert _run({"psi_warn": 0.0, "psi_error": 0.0}).success
    request, cursor = _tick(cursor)
    assert isinstance(request, RunRequest)
    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    assert request.run_key == f"drift/{champion.name} v{champion.version}"
    assert request.tags["qabuse/trigger"] == "drift_sensor"
    assert isinstance(_tick(cursor)[0], SkipReason)  # the same materialisation: no second ask

    # The drift persists: the same episode asks with the same key, which Dagster runs once.
    assert _run({"psi_warn": 0.0, "psi_error": 0.0}).success
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
