"""Run qabuse's Dagster jobs in process against the persistent instance the UI reads.

``qabuse demo`` and ``qabuse materialize`` go through here, so their runs, asset
materialisations and checks show up in ``dagster dev`` afterwards, exactly as if they
had been launched from the UI.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from qabuse_dagster import settings

logger = logging.getLogger(__name__)

#: Keep Dagster's per-event console log for the UI; the CLI shows its own progress.
QUIET_RUN_CONFIG: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
#: Training says even less on the console: a family that misses its floors, or a
#: challenger the gate holds, fails its blocking check and so its step, which Dagster
#: logs as an error with a stack trace. That is a verdict, not a crash: `PipelineResult`
#: reports it (`held_families`, `failed_checks`), the UI shows it, and a real crash still
#: raises here (no evaluation).
TRAINING_RUN_CONFIG: dict[str, Any] = {
    "loggers": {"console": {"config": {"log_level": "CRITICAL"}}}
}


@dataclass(frozen=True)
class PipelineResult:
    """What one pass through both jobs produced."""

    #: One telemetry run per span of consecutive hours.
    telemetry_run_ids: tuple[str, ...]
    training_run_id: str
    #: First and last partition materialised.
    partitions: tuple[str, str]
    evaluation: Any
    trained: Any
    champion_promoted: bool
    checks: dict[str, bool]
    #: Hours asked for that no partition holds (before the first, after the open one).
    skipped_hours: tuple[datetime, ...] = ()

    @property
    def failed_checks(self) -> list[str]:
        """Checks that failed, but for the families' promotion gates (`held_families`)."""
        return sorted(
            name
            for name, passed in self.checks.items()
            if not passed and _family_gate(name) is None
        )

    @property
    def held_families(self) -> list[str]:
        """Families whose challenger missed its floors, so kept its previous @champion.

        A family need not see every kind on its own; its gate failing holds back its
        alias and fails no run. The ensemble's gate (``ensemble_evaluation``) is not one.
        """
        return sorted(
            family
            for name, passed in self.checks.items()
            if not passed and (family := _family_gate(name)) is not None
        )


def _family_gate(check: str) -> str | None:
    asset, _, name = check.partition(":")
    if name != "meets_floors" or asset == "ensemble_evaluation":
        return None
    return asset.removesuffix("_evaluation")


#: The production instance's storage: runs, events and schedule/sensor state on PostgreSQL
#: (dagster-postgres). Dagster reads the URL from the environment itself, so the file
#: never holds a password and follows ``QABUSE_DAGSTER_PG_URL`` wherever it is set.
POSTGRES_STORAGE: dict[str, Any] = {
    "postgres": {"postgres_url": {"env": settings.DAGSTER_PG_URL_ENV}}
}
#: How many queued runs (a backfill's hours, the sensor's hours) the daemon launches at
#: once on a production instance: Dagster's own default, written out to be tuned here.
PRODUCTION_RUN_CONCURRENCY: dict[str, Any] = {"runs": {"max_concurrent_runs": 10}}
#: Keys that choose how runs are queued; a ``dagster.yaml`` that sets any keeps its own.
_RUN_QUEUE_KEYS = ("concurrency", "run_queue", "run_coordinator")


def export_dagster_home() -> str:
    """Point ``DAGSTER_HOME`` at ``$QABUSE_HOME/dagster`` and write its ``dagster.yaml``.

    The embedded profile's instance is SQLite in that folder. The production profile's
    (:mod:`qabuse_dagster.profile`, checked here, so every Dagster command refuses a
    broken one) keeps runs, events and schedule and sensor state on PostgreSQL
    (`POSTGRES_STORAGE`), and its run queue launches `PRODUCTION_RUN_CONCURRENCY` runs at
    once, so the hourly partitions the sensor or a backfill requests run in parallel.
    Each run's steps run in processes of their own (``QABUSE_DAGSTER_EXECUTOR``, see
    :mod:`qabuse_dagster.definitions`). Anything else in the file is kept: a
    ``run_launcher`` (dagster-k8s's ``K8sRunLauncher``, a Celery one) or a run queue of
    the operator's own is a change to this file only.

    Raises:
        ProfileError: the production profile's settings are missing or malformed.
    """
    from qabuse_dagster.profile import check_profile

    servers = check_profile()
    if servers is not None:
        # The psycopg2 spelling (`profile.dagster_sqlalchemy_url`), which this process and
        # every one it starts (dagster dev, a run's steps) hand to dagster-postgres.
        os.environ[settings.DAGSTER_PG_URL_ENV] = servers.dagster_postgres_url
    home = settings.paths().dagster_home
    home.mkdir(parents=True, exist_ok=True)
    _write_instance(home / "dagster.yaml", production=servers is not None)
    os.environ["DAGSTER_HOME"] = str(home)
    return str(home)


def _write_instance(config: Path, *, production: bool) -> None:
    """Dagster's telemetry and its first-visit dialog off, whatever else the file says;
    the profile's storage and run queue.

    Telemetry: this machine reaches no network, and a user's runs are their own. The
    dialog (``nux``) would greet every fresh home's UI before the asset graph. A home
    moved back to the embedded profile loses the production storage and queue this wrote
    (its runs stay in PostgreSQL), never settings of the operator's own.
    """
    import copy

    import yaml

    current = yaml.safe_load(config.read_text()) if config.exists() else None
    found = current if isinstance(current, dict) else {}
    wanted = copy.deepcopy(found)
    for key in ("telemetry", "nux"):
        section = wanted.get(key)
        wanted[key] = {**(section if isinstance(section, dict) else {}), "enabled": False}
    if production:
        wanted["storage"] = POSTGRES_STORAGE
        if not any(key in wanted for key in _RUN_QUEUE_KEYS):
            wanted["concurrency"] = PRODUCTION_RUN_CONCURRENCY
    else:
        for key, written in (
            ("storage", POSTGRES_STORAGE),
            ("concurrency", PRODUCTION_RUN_CONCURRENCY),
        ):
            if wanted.get(key) == written:
                del wanted[key]
    if wanted != found:
        config.write_text(yaml.safe_dump(wanted, sort_keys=False))


class NothingToMaterialise(ValueError):
    """No hour asked for has a partition."""


def run_pipeline(hours: Iterable[datetime], *, train: bool = True) -> PipelineResult:
    """Materialise raw telemetry and features for ``hours``, then train and promote.

    Each span of consecutive hours runs as one single-run backfill, so sparse hours cost
    time for those hours alone, never for the gap between them. Hours no partition holds
    are skipped and reported. The training job then applies Feast, builds the training
    set, trains, registers, evaluates and, if the blocking check passes, promotes the
    model to @champion.

    Raises:
        NothingToMaterialise: none of ``hours`` has a partition.
    """
    from dagster import DagsterInstance
    from dagster._core.storage.tags import (
        ASSET_PARTITION_RANGE_END_TAG,
        ASSET_PARTITION_RANGE_START_TAG,
    )

    from qabuse_dagster.definitions import build_definitions
    from qabuse_dagster.defs.partitions import partition_key, split_by_partitions
    from qabuse_dagster.ingest.partitions import HOUR, contiguous_spans

    inside, outside = split_by_partitions(hours)
    if outside:
        logger.info("%d hour(s) outside the hourly partitions skipped", len(outside))
    spans = contiguous_spans(inside)
    if not spans:
        raise NothingToMaterialise(
            f"no hour to materialise: {len(outside)} hour(s) asked for, none inside the "
            "hourly partitions (from QABUSE_TELEMETRY_START to the hour now open)"
        )
    export_dagster_home()
    defs = build_definitions()
    instance = DagsterInstance.get()
    run_ids: list[str] = []
    checks: dict[str, bool] = {}
    for start, end in spans:
        telemetry = defs.resolve_job_def("telemetry_job").execute_in_process(
            instance=instance,
            run_config=QUIET_RUN_CONFIG,
            tags={
                ASSET_PARTITION_RANGE_START_TAG: partition_key(start),
                ASSET_PARTITION_RANGE_END_TAG: partition_key(end - HOUR),
            },
        )
        run_ids.append(telemetry.run_id)
        for name, passed in _checks(telemetry).items():  # failed in any span: failed
            checks[name] = checks.get(name, True) and passed
    first, last = partition_key(spans[0][0]), partition_key(spans[-1][1] - HOUR)
    skipped = tuple(outside)
    if not train:
        return PipelineResult(tuple(run_ids), "", (first, last), None, None, False, checks, skipped)
    training = defs.resolve_job_def("training_job").execute_in_process(
        instance=instance, run_config=TRAINING_RUN_CONFIG, raise_on_error=False
    )
    evaluation = _output(training, "ensemble_evaluation")
    trained = _output(training, "ensemble_model")
    promoted = any(
        event.asset_key is not None and event.asset_key.to_user_string() == "champion_model"
        for event in training.get_asset_materialization_events()
    )
    if not training.success and evaluation is None:
        failure = next(iter(training.get_step_failure_events()), None)
        error = failure.step_failure_data.error if failure is not None else None
        raise RuntimeError(
            f"training_job failed at {failure.step_key if failure else '?'}: "
            f"{error.message if error is not None else 'see the Dagster UI'}"
        )
    checks.update(_checks(training))
    return PipelineResult(
        tuple(run_ids),
        training.run_id,
        (first, last),
        evaluation,
        trained,
        promoted,
        checks,
        skipped,
    )


def _checks(result: Any) -> dict[str, bool]:
    """Each asset check's verdict in a run, as ``asset:check`` → passed."""
    return {
        f"{e.asset_key.to_user_string()}:{e.check_name}": e.passed
        for e in result.get_asset_check_evaluations()
    }


def _output(result: Any, node: str) -> Any:
    try:
        return result.output_for_node(node)
    except Exception:  # the step failed or was skipped: no output to show
        return None


@dataclass(frozen=True)
class MonitoringResult:
    """What one run of ``monitoring_job`` found: drift and the last hour's evaluation."""

    run_id: str
    success: bool
    #: ``feature_drift``'s and ``continuous_evaluation``'s metadata, as plain values.
    drift: dict[str, Any]
    evaluation: dict[str, Any]
    checks: dict[str, bool]


def run_monitoring() -> MonitoringResult:
    """Run ``monitoring_job`` (drift, the champion's last hour) on the persistent instance."""
    from dagster import DagsterInstance

    from qabuse_dagster.definitions import build_definitions

    export_dagster_home()
    result = (
        build_definitions()
        .resolve_job_def("monitoring_job")
        .execute_in_process(
            instance=DagsterInstance.get(), run_config=QUIET_RUN_CONFIG, raise_on_error=False
        )
    )
    found: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        metadata = event.materialization.metadata
        if event.asset_key is not None:
            found[event.asset_key.to_user_string()] = {k: v.value for k, v in metadata.items()}
    return MonitoringResult(
        run_id=result.run_id,
        success=result.success,
        drift=found.get("feature_drift", {}),
        evaluation=found.get("continuous_evaluation", {}),
        checks=_checks(result),
    )


@dataclass(frozen=True)
class Instigator:
    """A schedule or sensor: what it starts, how often, and whether it is running."""

    kind: str  # "schedule" or "sensor"
    name: str
    job: str
    cadence: str
    status: str  # "running" or "stopped": the instance's, else the default


def instigators() -> list[Instigator]:
    """Every schedule and sensor with its state in the persistent instance.

    A state a person set (in the UI, ``dagster schedule start``) is the instance's; one
    never touched is the definition's default. Either takes effect under the daemon
    (``qabuse up``).
    """
    from dagster import DagsterInstance, DefaultScheduleStatus, DefaultSensorStatus

    from qabuse_dagster.definitions import build_definitions

    export_dagster_home()
    repository = build_definitions().get_repository_def()
    stored = {
        state.instigator_name: state.status.value.lower()
        for state in DagsterInstance.get().all_instigator_state()
    }
    found = []
    for schedule in repository.schedule_defs:
        default = schedule.default_status == DefaultScheduleStatus.RUNNING
        found.append(
            Instigator(
                "schedule",
                schedule.name,
                schedule.job_name,
                f"cron {schedule.cron_schedule} {schedule.execution_timezone or 'UTC'}",
                stored.get(schedule.name, "running" if default else "stopped"),
            )
        )
    for sensor in repository.sensor_defs:
        default = sensor.default_status == DefaultSensorStatus.RUNNING
        found.append(
            Instigator(
                "sensor",
                sensor.name,
                ", ".join(target.job_name for target in sensor.targets),
                f"every {sensor.minimum_interval_seconds or 30} s",
                stored.get(sensor.name, "running" if default else "stopped"),
            )
        )
    return found
