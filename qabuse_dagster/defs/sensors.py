"""Sensors: landed telemetry turns into runs of the hourly slice, once per landed state."""

from datetime import UTC, datetime, timedelta

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from qabuse_dagster import settings
from qabuse_dagster.defs.jobs import telemetry_job
from qabuse_dagster.ingest.partitions import landing_hours, partition_dir

#: An hour is complete this long after it ends; later records start another run.
GRACE = timedelta(minutes=2)
HOUR = timedelta(hours=1)


def landed_run_requests(now: datetime) -> list[RunRequest]:
    """One run of `telemetry_job` per complete hour with landing files waiting.

    The run key is the hour and its newest landing file (names start with the staging
    instant), so the same landed state never runs twice, and records landing later for
    that hour (late or replayed ones) start a new run that compacts them too.
    """
    landing = settings.paths().landing
    requests = []
    for hour in landing_hours(landing):
        if hour + HOUR + GRACE > now:
            continue  # still open: the streaming path serves it meanwhile
        newest = max(p.name for p in partition_dir(landing, hour).glob("batch-*.parquet"))
        partition = f"{hour:%Y-%m-%d-%H:00}"
        requests.append(
            RunRequest(
                run_key=f"{partition}/{newest}",
                partition_key=partition,
                tags={"qabuse/trigger": "landed_telemetry_sensor"},
            )
        )
    return requests


@sensor(
    job=telemetry_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Runs the hourly slice (raw_telemetry and the window features) for every "
    "complete hour with landed telemetry waiting; run keys make it idempotent.",
)
def landed_telemetry_sensor(context: SensorEvaluationContext) -> SensorResult | SkipReason:
    requests = landed_run_requests(datetime.now(UTC))
    if not requests:
        return SkipReason("no complete hour has landed telemetry waiting")
    context.log.info("%d hour(s) with landed telemetry", len(requests))
    return SensorResult(run_requests=requests)
