"""A drift episode end to end: an SDK release shifts most tenants, drift is measured, the
drift sensor retrains once, and the new version replaces the champion only if the gate
finds it not worse on the same window; before the release, no drift and no run.

The twin (3.5 days; an SDK release at 48 h; a runaway CI and a credential stuffing after
it; about 390 keys with the legitimate look-alikes) lives in a home of its own. The
champion is trained on the two days before the release, then the rest lands. Dagster's
own APIs take every step: the jobs run in process on the home's instance, the sensor is
evaluated with `build_sensor_context`, and its run requests go through the daemon's
run-key rule (`support.sensor_daemon`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from support.sensor_daemon import Launched, launch, runs_of

from qabuse_dagster import model_registry, settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOURS = 84
ONSET_H = 48
SEED = 11
#: The library's sdk_release, landing after two whole days (a registered variant).
RELEASE = "sdk_release_at_48h"
SCENARIOS = [RELEASE, "runaway_ci", "credential_stuffing"]
SENSOR = "drift_sensor"


@dataclass(frozen=True)
class Episode:
    """What each step of the episode produced."""

    first_champion: model_registry.ModelVersionRef
    calm: Any  # the monitoring run before the release
    calm_tick: Any  # the drift sensor's answer to it
    drift: Any  # the monitoring run after the release landed
    tick: Any  # the drift sensor's answer to it
    launched: list[Launched]
    relaunched: list[Launched]  # the same request handed to the daemon again
    later: Any  # the monitoring run after the retraining
    later_tick: Any
    instance: Any


def _split(telemetry: Path, onset: pd.Timestamp, folder: Path) -> tuple[Path, Path]:
    """The twin's records before and after the release, as two files to land in turn."""
    before, after = folder / "before.jsonl", folder / "after.jsonl"
    with telemetry.open() as source, before.open("w") as early, after.open("w") as late:
        for line in source:
            stamp = pd.Timestamp(json.loads(line)["timestamp"])
            (early if stamp < onset else late).write(line)
    return before, after


def _monitor(definitions: Any, instance: Any) -> Any:
    """``feature_drift`` alone, through ``monitoring_job``: what the sensor reads."""
    from dagster import AssetKey

    from qabuse_dagster.pipeline import QUIET_RUN_CONFIG

    job = definitions.resolve_job_def("monitoring_job")
    return job.execute_in_process(
        instance=instance,
        run_config=QUIET_RUN_CONFIG,
        asset_selection=[AssetKey("feature_drift")],
        raise_on_error=False,
    )


def _tick(instance: Any, cursor: str | None) -> tuple[Any, str | None]:
    from dagster import build_sensor_context

    from qabuse_dagster.defs.sensors import drift_sensor

    context = build_sensor_context(instance=instance, cursor=cursor)
    return drift_sensor(context), context.cursor


@pytest.fixture(scope="module")
def episode(qabuse_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Episode]:
    from dagster import DagsterInstance, RunRequest

    from qabuse_dagster.definitions import build_definitions
    from qabuse_dagster.ingest.files import ingest_labels, ingest_telemetry
    from qabuse_dagster.ingest.partitions import hours_between
    from qabuse_dagster.pipeline import QUIET_RUN_CONFIG, run_pipeline
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.simulation.shifts import SHIFTS, SdkRelease, register_shift
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    home = tmp_path_factory.mktemp("drift-home")
    register_shift(RELEASE, lambda: SdkRelease(onset=ONSET_H / HOURS))
    with pytest.MonkeyPatch.context() as patch:  # this module's home; the session's after
        patch.setenv(settings.HOME_ENV, str(home))
        patch.setenv("DAGSTER_HOME", str(home / "dagster"))
        try:
            sim = simulate(
                hours=HOURS,
                seed=SEED,
                out=home / "simulation",
                hasher=KeyedHasher.demo(),
                scenarios=SCENARIOS,
            )
        finally:
            SHIFTS.pop(RELEASE)
        onset = sim.start + timedelta(hours=ONSET_H)
        before, after = _split(sim.telemetry_path, pd.Timestamp(onset), home)
        paths = settings.paths()
        ingest_telemetry([before], paths)
        ingest_labels(sim.labels_path, paths)
        run_pipeline(hours_between(sim.start, onset), train=False)
        definitions = build_definitions()
        instance = DagsterInstance.get()
        # The first champion learns the two days before the release: it is judged on the
        # last hour of them (no incident yet), and its drift reference is the day before.
        first = definitions.resolve_job_def("training_job").execute_in_process(
            instance=instance,
            run_config={
                **QUIET_RUN_CONFIG,
                "ops": {"detector_history": {"config": {"eval_hours": 1.0}}},
            },
            raise_on_error=False,
        )
        assert any(
            e.asset_key.path[-1] == "champion_model"
            for e in first.get_asset_materialization_events()
        )
        first_champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
        calm = _monitor(definitions, instance)
        calm_tick, cursor = _tick(instance, None)

        ingest_telemetry([after], paths)
        run_pipeline(hours_between(onset, sim.end), train=False)
        drift = _monitor(definitions, instance)
        tick, cursor = _tick(instance, cursor)
        requests = [tick] if isinstance(tick, RunRequest) else []
        launched = launch(instance, definitions, SENSOR, "training_job", requests, QUIET_RUN_CONFIG)
        relaunched = launch(
            instance, definitions, SENSOR, "training_job", requests, QUIET_RUN_CONFIG
        )
        later = _monitor(definitions, instance)
        later_tick, _ = _tick(instance, cursor)
        yield Episode(
            first_champion=first_champion,
            calm=calm,
            calm_tick=calm_tick,
            drift=drift,
            tick=tick,
            launched=launched,
            relaunched=relaunched,
            later=later,
            later_tick=later_tick,
            instance=instance,
        )


def _materialization(result: Any, asset: str) -> Any:
    (event,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset
    ]
    return event.materialization


def _checks(result: Any, asset: str) -> dict[str, Any]:
    return {
        e.check_name: e
        for e in result.get_asset_check_evaluations()
        if e.asset_key.path[-1] == asset
    }


def test_before_the_release_there_is_no_drift_and_no_run(episode: Episode) -> None:
    from dagster import SkipReason

    from qabuse_dagster.defs.sensors import DRIFT_MIN_FEATURES

    assert episode.calm.success
    metadata = _materialization(episode.calm, "feature_drift").metadata
    assert metadata["judged"].value is True and metadata["keys"].value >= 50
    assert metadata["features_error"].value < DRIFT_MIN_FEATURES, metadata["drift"].value
    assert _checks(episode.calm, "feature_drift")["psi_below_error"].passed
    assert isinstance(episode.calm_tick, SkipReason)
    assert "make a drift episode" in str(episode.calm_tick.skip_message)


def test_the_release_raises_the_drift_checks_on_shots_and_submission_inputs(
    episode: Episode,
) -> None:
    from qabuse_dagster.defs.sensors import DRIFT_MIN_FEATURES

    assert episode.drift.success
    metadata = _materialization(episode.drift, "feature_drift").metadata
    checks = _checks(episode.drift, "feature_drift")
    assert not checks["psi_below_error"].passed
    assert checks["psi_below_error"].severity.value == "ERROR"
    assert metadata["features_error"].value >= DRIFT_MIN_FEATURES
    failed = set(str(checks["psi_below_error"].metadata["features"].value).split(", "))
    # Fewer, larger jobs with more shots: what the release changed is what drifted.
    assert failed & {"mean_shots_5m", "max_shots_1h", "mean_shots_1h", "max_shots_5m"}
    assert failed & {"submissions_per_min_1h", "submissions_per_min_5m", "submissions_1m"}
    # The champion's own score moved too, and is reported beside the inputs.
    assert metadata["score_level"].value == "error"
    assert "model_score" in metadata["drift"].value


def test_the_drift_sensor_starts_exactly_one_training_run(episode: Episode) -> None:
    from dagster import RunRequest, SkipReason

    assert isinstance(episode.tick, RunRequest)
    champion = episode.first_champion
    assert episode.tick.run_key == f"drift/{champion.name} v{champion.version}"
    (launched,) = episode.launched
    assert launched.result is not None and launched.result.success
    # Handed to the daemon again, the same key starts nothing.
    assert [item.result for item in episode.relaunched] == [None]
    # The next drift reading, after the retraining, asks for nothing more.
    assert episode.later.success
    assert isinstance(episode.later_tick, SkipReason)
    runs = runs_of(episode.instance, SENSOR)
    assert len(runs) == 1
    assert runs[0].job_name == "training_job"
    assert runs[0].tags["qabuse/trigger"] == SENSOR


def test_the_retrained_version_is_judged_beside_the_champion_on_the_same_window(
    episode: Episode,
) -> None:
    result = episode.launched[0].result
    metadata = _materialization(result, "ensemble_evaluation").metadata
    first = episode.first_champion
    assert metadata["champion"].value == f"{first.name} v{first.version}"
    table = metadata["versus_champion"].value
    for figure in ("recall", "precision_at_k", "benign_key_day_alert_rate"):
        assert f"| {figure}" in table
    # Evaluated on the drifted day: the cutoff is 24 hours before the newest record, which
    # lies in the twin's last minute.
    history = _materialization(result, "detector_history").metadata
    cutoff = pd.Timestamp(history["cutoff"].value)
    end = pd.Timestamp("2026-11-02", tz="UTC") + pd.Timedelta(hours=HOURS)  # DEFAULT_START
    assert pd.Timedelta(hours=24) < end - cutoff <= pd.Timedelta(hours=24, minutes=1)
    # Both sides' figures are in the new version's MLflow run.
    challenger = model_registry.resolve_alias(settings.CHALLENGER_ALIAS)
    run = model_registry.configure().get_run(challenger.run_id)
    assert {"recall", "champion_recall", "champion_benign_key_day_alert_rate"} <= set(
        run.data.metrics
    )


def test_the_gate_decides_whether_the_new_version_becomes_champion(episode: Episode) -> None:
    result = episode.launched[0].result
    gate = _checks(result, "ensemble_evaluation")["not_worse_than_champion"]
    floors = _checks(result, "ensemble_evaluation")["meets_floors"]
    promoted = any(
        e.asset_key.path[-1] == "champion_model" for e in result.get_asset_materialization_events()
    )
    challenger = model_registry.resolve_alias(settings.CHALLENGER_ALIAS)
    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    assert challenger.version != episode.first_champion.version
    assert promoted == (gate.passed and floors.passed)
    if promoted:
        assert champion.version == challenger.version
        assert model_registry.rollback()[1].version == episode.first_champion.version
    else:
        assert champion.version == episode.first_champion.version
    # On this twin the champion trained before the release alerts on many more benign
    # key-days of the new population than the retrained version: it is replaced.
    assert gate.passed and promoted
