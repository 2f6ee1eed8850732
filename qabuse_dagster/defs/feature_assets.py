"""Window features per hour, the Feast store they feed, and the point-in-time training set."""

from datetime import datetime, timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
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
from qabuse_dagster.features.windows import (
    FEATURE_NAMES,
    FEATURE_SCHEMA,
    FEATURES,
    LOOKBACK,
    window_features,
)
from qabuse_dagster.ingest.partitions import hours_between, read_raw, write_parquet_atomic

_RATIOS = [n for n in FEATURE_NAMES if n.startswith("fail_rate")]
_NON_NEGATIVE = [n for n in FEATURE_NAMES if not n.endswith("zscore")]


@asset(
    partitions_def=HOURLY_PARTITIONS,
    backfill_policy=BackfillPolicy.single_run(),
    deps=[
        AssetDep(
            "raw_telemetry",
            # Each hour's rows look back up to an hour (the z-score's history).
            partition_mapping=TimeWindowPartitionMapping(
                start_offset=-1, allow_nonexistent_upstream_partitions=True
            ),
        )
    ],
    check_specs=[
        AssetCheckSpec(
            "no_nulls",
            asset="api_key_window_features",
            description="No feature value is null or NaN.",
        ),
        AssetCheckSpec(
            "value_ranges",
            asset="api_key_window_features",
            description="Ratios lie in [0, 1]; counts, rates and shots are >= 0.",
        ),
        AssetCheckSpec(
            "schema",
            asset="api_key_window_features",
            description="Columns and types are the Feast source's: key, instant, every feature.",
        ),
        AssetCheckSpec(
            "freshness",
            asset="api_key_window_features",
            description="The newest row is at the minute boundary after the newest raw "
            "record of the hour (features never lag the telemetry they were computed from).",
        ),
    ],
    group_name="features",
    kinds={"numpy", "parquet"},
    description="Per-api-key 1- and 5-minute window features, one row per key and minute, "
    "one Parquet file per hour: the Feast offline source.",
)
def api_key_window_features(
    context: AssetExecutionContext, storage: QabuseStorage
) -> MaterializeResult:
    paths = storage.paths()
    window = context.partition_time_window
    telemetry = read_raw(paths.raw_telemetry, window.start - LOOKBACK, window.end)
    rows = window_features(telemetry, window.start, window.end)
    hours = pc.floor_temporal(rows["event_timestamp"], unit="hour")
    per_hour = []
    for hour in hours_between(window.start, window.end):
        part = rows.filter(pc.equal(hours, pd.Timestamp(hour)))
        target = paths.api_key_windows / f"{hour:%Y-%m-%dT%H}.parquet"
        if part.num_rows:
            write_parquet_atomic(part, target)
            per_hour.append({"hour": f"{hour:%Y-%m-%d %H}:00", "rows": part.num_rows})
        else:
            target.unlink(missing_ok=True)
    frame = rows.to_pandas()
    schema_problems = _schema_problems(rows.schema)
    lag_s = _lag_behind_raw_s(telemetry, rows, window.start, window.end)
    nulls = int(frame[list(FEATURE_NAMES)].isna().sum().sum())
    bad_ratio = int(((frame[_RATIOS] < 0) | (frame[_RATIOS] > 1)).sum().sum())
    negative = int((frame[_NON_NEGATIVE] < 0).sum().sum())
    summary = frame[list(FEATURE_NAMES)].describe().T[["mean", "50%", "max"]].reset_index()
    summary.insert(1, "unit", [f.unit for f in FEATURES])
    return MaterializeResult(
        metadata={
            "rows": MetadataValue.int(len(frame)),
            "api_keys": MetadataValue.int(int(frame["api_key_id"].nunique())),
            "features": MetadataValue.md(summary.to_markdown(index=False, floatfmt=".3g")),
            "per_hour": MetadataValue.md(
                pd.DataFrame(per_hour).to_markdown(index=False) if per_hour else "(no rows)"
            ),
            "path": MetadataValue.path(str(paths.api_key_windows)),
        },
        check_results=[
            AssetCheckResult(check_name="no_nulls", passed=nulls == 0, metadata={"nulls": nulls}),
            AssetCheckResult(
                check_name="value_ranges",
                passed=bad_ratio == 0 and negative == 0,
                metadata={"ratios_out_of_range": bad_ratio, "negative_values": negative},
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


def _schema_problems(schema: pa.Schema) -> list[str]:
    """What differs from the columns and types the Feast source expects."""
    expected = {field.name: field.type for field in FEATURE_SCHEMA}
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
    newest_row = pc.max(rows["event_timestamp"]).as_py() if rows.num_rows else start
    return (due - newest_row).total_seconds()


@asset(
    deps=[api_key_window_features],
    group_name="features",
    kinds={"feast", "sqlite"},
    description="feature_repo/ applied to the Feast registry, and the latest window "
    "features per api key materialised into the SQLite online store.",
)
def feast_online_store(storage: QabuseStorage, feast: FeastResource) -> MaterializeResult:
    store = feast.store()
    report = feast_ops.apply_repo(store)
    files = sorted(storage.paths().api_key_windows.glob("*.parquet"))
    if not files:
        raise ValueError("no window features yet: materialise api_key_window_features first")
    stamps = pq.read_table(files[0], columns=["event_timestamp"])["event_timestamp"]
    first = pc.min(stamps).as_py()
    last = pc.max(pq.read_table(files[-1], columns=["event_timestamp"])["event_timestamp"]).as_py()
    feast_ops.materialize(store, first, last + timedelta(seconds=1))
    return MaterializeResult(
        metadata={
            "feature_views": MetadataValue.json(report.feature_views),
            "feature_services": MetadataValue.json(report.feature_services),
            "materialized_from": MetadataValue.text(first.isoformat()),
            "materialized_to": MetadataValue.text(last.isoformat()),
            "plan": MetadataValue.md(f"```\n{report.plan or 'no changes'}\n```"),
        }
    )


class TrainingSetConfig(Config):
    """How many (key, instant) rows to draw for point-in-time retrieval."""

    max_rows: int = 200_000
    seed: int = 0


@asset(
    deps=[feast_online_store],
    group_name="features",
    kinds={"feast", "pandas"},
    description="Point-in-time-correct training rows from Feast historical retrieval, "
    "one per (api key, minute) with the detector's feature service.",
)
def training_set(
    context: AssetExecutionContext,
    config: TrainingSetConfig,
    storage: QabuseStorage,
    feast: FeastResource,
) -> Output[pd.DataFrame]:
    source = pq.read_table(
        storage.paths().api_key_windows, columns=["api_key_id", "event_timestamp"]
    ).to_pandas()
    if len(source) > config.max_rows:
        source = source.sample(config.max_rows, random_state=config.seed)
    entity_df = source.sort_values(["event_timestamp", "api_key_id"]).reset_index(drop=True)
    frame = feast_ops.historical_features(feast.store(), entity_df)
    missing = int(frame[list(FEATURE_NAMES)].isna().any(axis=1).sum())
    frame = (
        frame.dropna(subset=list(FEATURE_NAMES))
        .sort_values(["event_timestamp", "api_key_id"])
        .reset_index(drop=True)
    )
    context.log.info("training set: %d rows, %d without features dropped", len(frame), missing)
    return Output(
        frame,
        metadata={
            "rows": MetadataValue.int(len(frame)),
            "rows_without_features": MetadataValue.int(missing),
            "api_keys": MetadataValue.int(int(frame["api_key_id"].nunique())),
            "from": MetadataValue.text(str(frame["event_timestamp"].min())),
            "to": MetadataValue.text(str(frame["event_timestamp"].max())),
            "preview": MetadataValue.md(frame.head(10).to_markdown(index=False, floatfmt=".3g")),
        },
    )
