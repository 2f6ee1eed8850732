"""Sensors: landed telemetry turns into runs of the hourly slice, once per landed state."""

from dataclasses import dataclass, field
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
from qabuse_dagster.defs.partitions import partition_key, split_by_partitions
from qabuse_dagster.ingest.partitions import landing_hours, partition_dir

#: An hour is complete this long after it ends; later records start another run.
GRACE = timedelta(minutes=2)
HOUR = timedelta(hours=1)


@dataclass
class LandedState:
    """What the sensor found: runs to request, and landed hours no partition holds."""

    requests: list[RunRequest] = field(default_factory=list)
    outside: list[datetime] = field(default_factory=list)


def landed_run_requests(now: datetime) -> LandedState:
    """One run of `telemetry_job` per complete hour with landing files waiting.

    The run key is the hour and its newest landing file (names start with the staging
    instant), so the same landed state never runs twice, and records landing later for
    that hour (late or replayed ones) start a new run that compacts them too. Landed
    hours without a partition are reported instead of requested: one bad hour must not
    fail the tick and stop every good hour with it.
    """
    landing = settings.paths().landing
    inside, outside = split_by_partitions(landing_hours(landing), now)
    state = LandedState(outside=outside)
    for hour in inside:
        if hour + HOUR + GRACE > now:
            continue  # still open: the streaming path serves it meanwhile
        newest = max(
            (p.name for p in partition_dir(landing, hour).glob("batch-*.parquet")), default=None
        )
        if newest is None:
            continue  # compacted between the listing and now
        partition = partition_key(hour)
        state.requests.append(
            RunRequest(
                run_key=f"{partition}/{newest}",
                partition_key=partition,
                tags={"qabuse/trigger": "landed_telemetry_sensor"},
            )
        )
    return state


def _describe(hours: list[datetime]) -> str:
    shown = ", ".join(h.isoformat() for h in hours[:3])
    return shown + (f" and {len(hours) - 3} more" if len(hours) > 3 else "")


@sensor(
    job=telemetry_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Runs the hourly slice (raw_telemetry and the window features) for every "
    "complete hour with landed telemetry waiting; run keys make it idempotent. Landed hours "
    "outside the partitions are reported and skipped.",
)
def landed_telemetry_sensor(context: SensorEvaluationContext) -> SensorResult | SkipReason:
    state = landed_run_requests(datetime.now(UTC))
    if state.outside:
        context.log.warning(
            "%d landed hour(s) outside the hourly partitions, skipped: %s (see "
            "QABUSE_TELEMETRY_START; their files stay in the landing area)",
            len(state.outside),
            _describe(state.outside),
        )
    if not state.requests:
        why = "no complete hour has landed telemetry waiting"
        if state.outside:
            why += f"; skipped {len(state.outside)} hour(s) outside the partitions"
        return SkipReason(why)
    context.log.info("%d hour(s) with landed telemetry", len(state.requests))
    return SensorResult(run_requests=state.requests)
