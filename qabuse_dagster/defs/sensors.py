"""Sensors: landed telemetry turns into runs of the hourly slice, once per landed state;
drift of the champion's inputs turns into one retraining per drift episode; enough new
analyst labels turn into a re-evaluation of the champion on the window they cover."""

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from dagster import (
    AssetKey,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from qabuse_dagster import settings
from qabuse_dagster.defs.jobs import evaluation_job, telemetry_job, training_job
from qabuse_dagster.defs.partitions import partition_key, split_by_partitions
from qabuse_dagster.evaluation.drift import newest_row_time
from qabuse_dagster.ingest.partitions import landing_hours, partition_dir
from qabuse_dagster.telemetry.labels import IncidentLabel, read_labels

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


#: Inputs at the error level (PSI 0.25 by default) that make a drift episode: one shifted
#: input is a change worth a look, several are a population the champion never saw.
DRIFT_MIN_FEATURES = 3
#: Least time between two retrainings the drift sensor starts.
DRIFT_COOLDOWN = timedelta(hours=6)
DRIFT_TRIGGER = "drift_sensor"
_DRIFT_ASSET = AssetKey("feature_drift")


@dataclass(frozen=True)
class DriftReading:
    """What one ``feature_drift`` materialisation said."""

    champion: str  # "name vN", the version whose inputs drifted
    features_error: int
    features: int
    window_hours: float = 24.0  # the span of recent rows compared
    judged: bool = True  # enough active keys for the drift to be judged


def drift_decision(
    reading: DriftReading,
    last_retrain: datetime | None,
    now: datetime,
    *,
    min_features: int = DRIFT_MIN_FEATURES,
    cooldown: timedelta = DRIFT_COOLDOWN,
) -> RunRequest | SkipReason:
    """Retrain when enough inputs drifted, at most once per champion and cooldown.

    The run key names the champion version whose inputs drifted: Dagster never starts a
    second run with a key it has seen, so one drift episode trains once. A new champion
    (the retrained one promoted) opens the next episode; a retrained version kept as
    challenger leaves the same champion, so the drift that is still there trains nothing
    more until a person acts.
    """
    if not reading.judged:
        return SkipReason(
            f"the drift of {reading.champion}'s inputs was not judged: too few active keys"
        )
    if reading.features_error < min_features:
        return SkipReason(
            f"{reading.features_error} of {reading.features} inputs of {reading.champion} at "
            f"the error level; {min_features} make a drift episode"
        )
    if last_retrain is not None and now - last_retrain < cooldown:
        return SkipReason(
            f"drift on {reading.features_error} inputs of {reading.champion}, but a drift "
            f"retraining started at {last_retrain.isoformat()}: cooling down until "
            f"{(last_retrain + cooldown).isoformat()}"
        )
    return RunRequest(
        run_key=f"drift/{reading.champion}",
        # Evaluated on the drifted window, trained on everything before it: the new
        # version learns the hours of the new population that came before the window,
        # and is judged beside the champion on the rows that showed the drift.
        run_config={"ops": {"detector_history": {"config": {"eval_hours": reading.window_hours}}}},
        tags={
            "qabuse/trigger": DRIFT_TRIGGER,
            "qabuse/drifted_inputs": str(reading.features_error),
            "qabuse/drifted_champion": reading.champion,
        },
    )


@sensor(
    job=training_job,
    minimum_interval_seconds=300,
    default_status=DefaultSensorStatus.RUNNING,
    description="Starts training_job when a feature_drift materialisation finds at least "
    f"{DRIFT_MIN_FEATURES} inputs at the error level: once per drifted champion version "
    f"(run key), and not within {DRIFT_COOLDOWN} of the previous drift retraining.",
)
def drift_sensor(context: SensorEvaluationContext) -> RunRequest | SkipReason:
    records = context.instance.fetch_materializations(_DRIFT_ASSET, limit=1).records
    materialization = records[0].asset_materialization if records else None
    if materialization is None:
        return SkipReason("feature_drift has not been materialised yet")
    if context.cursor is not None and int(context.cursor) >= records[0].storage_id:
        return SkipReason("no feature_drift materialisation since the last tick")
    context.update_cursor(str(records[0].storage_id))
    metadata = materialization.metadata
    reading = DriftReading(
        champion=str(metadata["champion"].value),
        features_error=int(str(metadata["features_error"].value)),
        features=int(str(metadata["features"].value)),
        window_hours=float(str(metadata["window_hours"].value)),
        judged=bool(metadata["judged"].value) if "judged" in metadata else True,
    )
    return drift_decision(reading, _last_drift_retrain(context), datetime.now(UTC))


def _last_drift_retrain(context: SensorEvaluationContext) -> datetime | None:
    """When the latest training_job run this sensor asked for was created, if any."""
    records = context.instance.get_run_records(
        filters=RunsFilter(
            job_name=training_job.name,
            tags={"qabuse/trigger": DRIFT_TRIGGER},
            statuses=[s for s in DagsterRunStatus if s is not DagsterRunStatus.CANCELED],
        ),
        limit=1,
    )
    return records[0].create_timestamp.astimezone(UTC) if records else None


#: New analyst labels (triage verdicts, upheld appeals) that make a re-evaluation worth
#: running: one verdict is an anecdote, a handful says how the champion does now.
LABEL_MIN_NEW = 5
#: The longest window a label-driven evaluation judges.
LABEL_MAX_WINDOW = timedelta(days=7)
LABEL_TRIGGER = "label_sensor"


def label_decision(
    labels: list[IncidentLabel],
    seen: int,
    newest_row: datetime | None,
    *,
    min_new: int = LABEL_MIN_NEW,
) -> RunRequest | SkipReason:
    """Re-evaluate the champion once ``min_new`` labels arrived after the first ``seen``.

    The analyst label file only grows, so the labels past ``seen`` are the new ones. The
    evaluation window runs from the earliest new label's start to the newest window row
    (at least an hour, at most `LABEL_MAX_WINDOW`); the run key is the label count, so
    one set of labels is evaluated once.
    """
    new = labels[seen:]
    if len(new) < min_new:
        return SkipReason(
            f"{len(new)} new analyst label(s) since the last evaluation; {min_new} start one"
        )
    if newest_row is None:
        return SkipReason(f"{len(new)} new analyst labels, but no window rows to evaluate")
    earliest = min(label.start for label in new)
    span = min(max(newest_row - earliest, HOUR), LABEL_MAX_WINDOW)
    hours = -(-span // HOUR)  # whole hours, rounded up
    return RunRequest(
        run_key=f"labels/{len(labels)}",
        run_config={"ops": {"continuous_evaluation": {"config": {"window_hours": float(hours)}}}},
        tags={"qabuse/trigger": LABEL_TRIGGER, "qabuse/new_labels": str(len(new))},
    )


@sensor(
    job=evaluation_job,
    minimum_interval_seconds=300,
    default_status=DefaultSensorStatus.RUNNING,
    description=f"Starts evaluation_job when analysts have given at least {LABEL_MIN_NEW} new "
    "labels (triage verdicts, upheld appeals): the champion is judged again on the window "
    "they cover, once per set of labels (run key).",
)
def label_sensor(context: SensorEvaluationContext) -> RunRequest | SkipReason:
    paths = settings.paths()
    labels = read_labels(paths.analyst_labels) if paths.analyst_labels.exists() else []
    seen = int(context.cursor or 0)
    if seen > len(labels):  # the file was replaced: its labels are all new
        seen = 0
    decision = label_decision(labels, seen, newest_row_time(paths.api_key_windows))
    if isinstance(decision, RunRequest):
        context.update_cursor(str(len(labels)))
    return decision
