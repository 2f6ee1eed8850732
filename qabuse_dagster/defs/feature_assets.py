"""Window features per entity and hour, the Feast store they feed, and the training set."""

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    BackfillPolicy,
    Config,
    MaterializeResult,
    MetadataValue,
    Output,
    TimeWindowPartitionMapping,
    asset,
)

from qabuse_dagster.defs.partitions import HOURLY_PARTITIONS
from qabuse_dagster.defs.resources import FeastResource, QabuseStorage
from qabuse_dagster.features import store as feast_ops
from qabuse_dagster.features.definitions import (
    DETECTOR_FEATURES,
    ENTITY_COLUMNS,
    FEATURES,
    TIMESTAMP_COLUMN,
    feature_schema,
)
from qabuse_dagster.features.windows import LOOKBACK, sequence_table, window_features
from qabuse_dagster.ingest.partitions import hours_between, read_raw, write_parquet_atomic

#: Raw hourly partitions before its own that a feature hour reads: rows look back `LOOKBACK`.
LOOKBACK_PARTITIONS = math.ceil(LOOKBACK / timedelta(hours=1))


def _bounds(low: float | None, high: float | None) -> str:
    return f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"


def window_features_asset(entity: str) -> AssetsDefinition:
    """The hourly window-feature asset of one Feast entity (a key of `ENTITY_COLUMNS`).

    It writes one Parquet file per hour under ``Paths.entity_windows(entity)`` (the
    entity's Feast offline source) and checks the rows: no nulls, every value within its
    `FeatureSpec` bounds, the source's schema, and no lag behind the raw telemetry.
    """
    entity_column = ENTITY_COLUMNS[entity]
    name = f"{entity}_window_features"
    who = entity.replace("_", " ")

    @asset(
        name=name,
        partitions_def=HOURLY_PARTITIONS,
        backfill_policy=BackfillPolicy.single_run(),
        deps=[
            AssetDep(
                "raw_telemetry",
                partition_mapping=TimeWindowPartitionMapping(
                    start_offset=-LOOKBACK_PARTITIONS, allow_nonexistent_upstream_partitions=True
                ),
            )
        ],
        check_specs=[
            AssetCheckSpec("no_nulls", asset=name, description="No feature value is null or NaN."),
            AssetCheckSpec(
                "value_ranges",
                asset=name,
                description="Every feature lies within its declared bounds (FeatureSpec low, "
                "high): ratios in [0, 1], counts and rates >= 0, changes in their range.",
            ),
            AssetCheckSpec(
                "schema",
                asset=name,
                description=f"Columns and types are the Feast source's: {entity_column}, "
                "instant, every feature.",
            ),
            AssetCheckSpec(
                "freshness",
                asset=name,
                description="The newest row is at the minute boundary after the newest raw "
                "record of the hour (features never lag the telemetry they were computed from).",
            ),
        ],
        group_name="features",
        kinds={"numpy", "parquet"},
        description=f"Per-{who} window features (1 minute, 5 minutes, 1 hour; looking back "
        f"24 h), one row per {who} and minute, one Parquet file per hour: the Feast offline "
        f"source of the {entity} views.",
    )
    def _entity_window_features(
        context: AssetExecutionContext, storage: QabuseStorage
    ) -> MaterializeResult:
        paths = storage.paths()
        folder = paths.entity_windows(entity)
        window = context.partition_time_window
        # The hour now open ends in the future: its rows stop at the present minute, since
        # a row past it would claim that no record arrives until then (and would outrank the
        # stream worker's fresher rows online). The hour is run again once it is complete.
        end = min(window.end, _present_minute() + timedelta(minutes=1))
        telemetry = read_raw(paths.raw_telemetry, window.start - LOOKBACK, end)
        rows = window_features(telemetry, window.start, end, entity_column=entity_column)
        per_hour = _write_hours(rows, folder, window.start, window.end)
        # Only the features the rows have: a missing one fails the schema check, not the run.
        specs = [f for f in FEATURES if f.name in rows.column_names]
        frame = rows.to_pandas()
        names = [f.name for f in specs]
        schema_problems = _schema_problems(rows.schema, entity_column)
        lag_s = _lag_behind_raw_s(telemetry, rows, window.start, end)
        nulls = int(frame[names].isna().sum().sum())
        out_of_range = _range_violations(frame)
        summary = frame[names].describe().T[["mean", "50%", "max"]].reset_index(names="feature")
        summary.insert(1, "unit", [f.unit for f in specs])
        summary.insert(2, "bounds", [_bounds(f.low, f.high) for f in specs])
        return MaterializeResult(
            metadata={
                "rows": MetadataValue.int(len(frame)),
                f"{entity}s": MetadataValue.int(int(frame[entity_column].nunique())),
                "features": MetadataValue.md(summary.to_markdown(index=False, floatfmt=".3g")),
                "per_hour": MetadataValue.md(
                    pd.DataFrame(per_hour).to_markdown(index=False) if per_hour else "(no rows)"
                ),
                "path": MetadataValue.path(str(folder)),
            },
            check_results=[
                AssetCheckResult(
                    check_name="no_nulls", passed=nulls == 0, metadata={"nulls": nulls}
                ),
                AssetCheckResult(
                    check_name="value_ranges",
                    passed=not out_of_range,
                    metadata={
                        "values_out_of_range": sum(out_of_range.values()),
                        "per_feature": MetadataValue.json(out_of_range),
                    },
                ),
                AssetCheckResult(
                    check_name="schema",
                    passed=not schema_problems,
                    metadata={"problems": MetadataValue.json(schema_problems)},
                ),
                AssetCheckResult(
                    check_name="freshness",
                    passed=lag_s is None or lag_s <= 0,
                    metadata={"lag_behind_raw_s": MetadataValue.float(float(lag_s or 0.0))},
                ),
            ],
        )

    return _entity_window_features


api_key_window_features = window_features_asset("api_key")
user_window_features = window_features_asset("user")


def _present_minute() -> datetime:
    return datetime.now(UTC).replace(second=0, microsecond=0)


def _write_hours(
    rows: pa.Table, folder: Path, start: datetime, end: datetime
) -> list[dict[str, object]]:
    """Write ``rows`` as one Parquet file per hour of ``[start, end)``; drop emptied hours."""
    hours = pc.floor_temporal(rows[TIMESTAMP_COLUMN], unit="hour")
    per_hour = []
    for hour in hours_between(start, end):
        part = rows.filter(pc.equal(hours, pd.Timestamp(hour)))
        target = folder / f"{hour:%Y-%m-%dT%H}.parquet"
        if part.num_rows:
            write_parquet_atomic(part, target)
            per_hour.append({"hour": f"{hour:%Y-%m-%d %H}:00", "rows": part.num_rows})
        else:
            target.unlink(missing_ok=True)
    return per_hour


def _range_violations(frame: pd.DataFrame) -> dict[str, int]:
    """Per feature, the values outside its `FeatureSpec` bounds (only features that have any).

    Null and NaN values are the null check's, never counted here.
    """
    violations = {}
    for spec in FEATURES:
        if spec.name not in frame.columns:
            continue
        values = frame[spec.name]
        bad = pd.Series(False, index=frame.index)
        if spec.low is not None:
            bad |= values < spec.low
        if spec.high is not None:
            bad |= values > spec.high
        if int(bad.sum()):
            violations[spec.name] = int(bad.sum())
    return violations


def _schema_problems(
    schema: pa.Schema, entity_column: str = ENTITY_COLUMNS["api_key"]
) -> list[str]:
    """What differs from the columns and types the entity's Feast source expects."""
    expected = {field.name: field.type for field in feature_schema(entity_column)}
    problems = [f"missing column {n}" for n in expected if n not in schema.names]
    problems += [f"unexpected column {n}" for n in schema.names if n not in expected]
    problems += [
        f"{n} is {schema.field(n).type}, expected {t}"
        for n, t in expected.items()
        if n in schema.names and schema.field(n).type != t
    ]
    return problems


def _lag_behind_raw_s(
    telemetry: pa.Table, rows: pa.Table, start: datetime, end: datetime
) -> float | None:
    """Seconds by which the newest row falls short of covering the newest raw record.

    A record at ``t`` is first seen by the row at the next minute boundary, so records of
    the hour's last minute are first seen by the next hour's rows and are left out. None
    when the hour has no other raw record.
    """
    stamps = telemetry["timestamp"]
    last_minute = end - timedelta(minutes=1)
    inside = pc.and_(pc.greater_equal(stamps, start), pc.less(stamps, last_minute))
    newest_raw = pc.max(stamps.filter(inside)).as_py()
    if newest_raw is None:
        return None
    due = newest_raw.replace(second=0, microsecond=0) + timedelta(minutes=1)
    newest_row = pc.max(rows[TIMESTAMP_COLUMN]).as_py() if rows.num_rows else start
    return (due - newest_row).total_seconds()


def _event_time_range(folder: Path) -> tuple[datetime, datetime]:
    """First and last event time of the hourly Parquet files in ``folder``."""
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ValueError(f"no window features in {folder}: materialise the feature assets first")
    first = pc.min(pq.read_table(files[0], columns=[TIMESTAMP_COLUMN])[TIMESTAMP_COLUMN])
    last = pc.max(pq.read_table(files[-1], columns=[TIMESTAMP_COLUMN])[TIMESTAMP_COLUMN])
    return first.as_py(), last.as_py()


@asset(
    deps=[api_key_window_features, user_window_features],
    group_name="features",
    kinds={"feast", "sqlite"},
    description="feature_repo/ applied to the Feast registry, and the latest window "
    "features per api key and per user materialised into the online store.",
)
def feast_online_store(storage: QabuseStorage, feast: FeastResource) -> MaterializeResult:
    store = feast.store()
    report = feast_ops.apply_repo(store)
    ranges = {
        entity: _event_time_range(storage.paths().entity_windows(entity))
        for entity in ENTITY_COLUMNS
    }
    loaded = []

    def load(entity: str, views: list[str], first: datetime, last: datetime) -> None:
        # Never over a newer online row (one the stream worker pushed): those are kept.
        report = feast_ops.materialize(store, first, last + timedelta(seconds=1), views)
        loaded.append(
            {
                "entity": entity,
                "views": ", ".join(views),
                "from": first,
                "to": last,
                "rows_written": sum(report.written.values()),
                "online_kept": sum(report.kept_online.values()),
            }
        )

    for entity, (first, last) in ranges.items():
        load(entity, feast_ops.entity_views(store, entity), first, last)
    first, last = ranges["api_key"]
    for view, table in _latest_serving_rows(storage, last).items():
        if table.num_rows:
            load("api_key", [view], first, last)
    return MaterializeResult(
        metadata={
            "feature_views": MetadataValue.json(report.feature_views),
            "feature_services": MetadataValue.json(report.feature_services),
            "materialized": MetadataValue.md(pd.DataFrame(loaded).to_markdown(index=False)),
            "materialized_from": MetadataValue.text(
                min(first for first, _ in ranges.values()).isoformat()
            ),
            "materialized_to": MetadataValue.text(
                max(last for _, last in ranges.values()).isoformat()
            ),
            "plan": MetadataValue.md(f"```\n{report.plan or 'no changes'}\n```"),
        }
    )


def _latest_serving_rows(storage: QabuseStorage, last: datetime) -> dict[str, pa.Table]:
    """Each active key's sequence and campaign rows at the last hour, written for Feast.

    Serving reads only an entity's latest row, so these views hold the rows of the keys
    active in the hour before ``last`` (the sequences of their latest minute, the campaign
    graph built at its latest instants).
    """
    from models.campaign import CAMPAIGN_FEATURES, campaign_features

    paths = storage.paths()
    start = last - timedelta(hours=1)
    telemetry = read_raw(
        paths.raw_telemetry, start - timedelta(days=4), last + timedelta(minutes=1)
    )
    if telemetry.num_rows == 0:
        return {}
    end = last + timedelta(minutes=1)
    rows = window_features(telemetry, start, end, features=["submissions_1m"]).to_pandas()
    latest = rows.sort_values(TIMESTAMP_COLUMN).groupby(ENTITY_COLUMNS["api_key"]).tail(1)
    sequences = sequence_table(telemetry, pa.Table.from_pandas(latest, preserve_index=False))
    records = telemetry.to_pandas()
    records["timestamp"] = pd.to_datetime(records["timestamp"], utc=True)
    campaign = campaign_features(records, start, end)
    campaign = campaign.sort_values(TIMESTAMP_COLUMN).groupby("api_key_id").tail(1)
    campaign[list(CAMPAIGN_FEATURES)] = campaign[list(CAMPAIGN_FEATURES)].astype(float)
    tables = {
        "api_key_sequence": (feast_ops.sequence_folder(paths), sequences),
        "api_key_campaign": (
            feast_ops.campaign_folder(paths),
            pa.Table.from_pandas(campaign.reset_index(drop=True), preserve_index=False),
        ),
    }
    out = {}
    for view, (folder, table) in tables.items():
        folder.mkdir(parents=True, exist_ok=True)
        if table.num_rows:
            write_parquet_atomic(table, folder / f"latest-{last:%Y%m%dT%H%M}.parquet")
        out[view] = table
    return out


class TrainingSetConfig(Config):
    """How many (key, instant) rows to draw for point-in-time retrieval."""

    max_rows: int = 200_000
    seed: int = 0


@asset(
    deps=[feast_online_store],
    group_name="features",
    kinds={"feast", "pandas"},
    description="Point-in-time-correct training rows from Feast historical retrieval, "
    f"one per (api key, minute) with the detector's feature service "
    f"({feast_ops.FEATURE_SERVICE}: {len(DETECTOR_FEATURES)} features).",
)
def training_set(
    context: AssetExecutionContext,
    config: TrainingSetConfig,
    storage: QabuseStorage,
    feast: FeastResource,
) -> Output[pd.DataFrame]:
    key = ENTITY_COLUMNS["api_key"]
    source = pq.read_table(
        storage.paths().api_key_windows, columns=[key, TIMESTAMP_COLUMN]
    ).to_pandas()
    if len(source) > config.max_rows:
        source = source.sample(config.max_rows, random_state=config.seed)
    entity_df = source.sort_values([TIMESTAMP_COLUMN, key]).reset_index(drop=True)
    frame = feast_ops.historical_features(feast.store(), entity_df, feast_ops.FEATURE_SERVICE)
    missing = int(frame[list(DETECTOR_FEATURES)].isna().any(axis=1).sum())
    frame = (
        frame.dropna(subset=list(DETECTOR_FEATURES))
        .sort_values([TIMESTAMP_COLUMN, key])
        .reset_index(drop=True)
    )
    context.log.info("training set: %d rows, %d without features dropped", len(frame), missing)
    return Output(
        frame,
        metadata={
            "rows": MetadataValue.int(len(frame)),
            "rows_without_features": MetadataValue.int(missing),
            "api_keys": MetadataValue.int(int(frame[key].nunique())),
            "from": MetadataValue.text(str(frame[TIMESTAMP_COLUMN].min())),
            "to": MetadataValue.text(str(frame[TIMESTAMP_COLUMN].max())),
            "preview": MetadataValue.md(frame.head(10).to_markdown(index=False, floatfmt=".3g")),
        },
    )
