"""Raw telemetry: landing files compacted into hourly partitions, with data checks."""

import pyarrow.compute as pc
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    BackfillPolicy,
    MaterializeResult,
    MetadataValue,
    asset,
)

from qabuse_dagster.defs.partitions import HOURLY_PARTITIONS
from qabuse_dagster.defs.resources import QabuseStorage
from qabuse_dagster.ingest.partitions import compact_hour, hours_between, read_raw
from qabuse_dagster.telemetry.contract import CONTRACT_COLUMNS

RAW_CHECKS = [
    AssetCheckSpec(
        "identity_unique",
        asset="raw_telemetry",
        description="No two records share (job_id, status).",
    ),
    AssetCheckSpec(
        "timestamps_in_partition",
        asset="raw_telemetry",
        description="Every record lies in its partition's hour.",
    ),
    AssetCheckSpec(
        "contract_columns",
        asset="raw_telemetry",
        description="Partition files have exactly the contract's columns.",
    ),
]


@asset(
    partitions_def=HOURLY_PARTITIONS,
    backfill_policy=BackfillPolicy.single_run(),
    check_specs=RAW_CHECKS,
    group_name="telemetry",
    kinds={"parquet"},
    description="Validated telemetry, one Hive-style Parquet partition per UTC hour "
    "under $QABUSE_HOME/raw/telemetry, exactly once per (job_id, status).",
)
def raw_telemetry(context: AssetExecutionContext, storage: QabuseStorage) -> MaterializeResult:
    paths = storage.paths()
    window = context.partition_time_window
    reports = [
        compact_hour(h, paths.landing, paths.raw_telemetry)
        for h in hours_between(window.start, window.end)
    ]
    table = read_raw(paths.raw_telemetry, window.start, window.end)
    n = table.num_rows
    unique = table.select(["job_id", "status"]).group_by(["job_id", "status"]).aggregate([])
    hours = pc.floor_temporal(table["timestamp"], unit="hour")
    outside = (
        n
        - (
            pc.sum(
                pc.and_(pc.greater_equal(hours, window.start), pc.less(hours, window.end))
            ).as_py()
            or 0
        )
        if n
        else 0
    )
    status_mix = table.group_by("status").aggregate([("job_id", "count")]).to_pandas()
    per_hour = [
        {
            "hour": f"{r.hour:%Y-%m-%d %H}:00",
            "rows": r.rows,
            "new": r.new_rows,
            "duplicates dropped": r.duplicates_dropped,
            "landing files": r.landing_files,
        }
        for r in reports
        if r.rows
    ]
    import pandas as pd

    return MaterializeResult(
        metadata={
            "rows": MetadataValue.int(n),
            "new_rows": MetadataValue.int(sum(r.new_rows for r in reports)),
            "duplicates_dropped": MetadataValue.int(sum(r.duplicates_dropped for r in reports)),
            "api_keys": MetadataValue.int(
                pc.count_distinct(table["api_key_id"]).as_py() if n else 0
            ),
            "status_mix": MetadataValue.md(
                status_mix.rename(columns={"job_id_count": "records"}).to_markdown(index=False)
                if n
                else "(no records)"
            ),
            "per_hour": MetadataValue.md(
                pd.DataFrame(per_hour).to_markdown(index=False) if per_hour else "(no records)"
            ),
            "path": MetadataValue.path(str(paths.raw_telemetry)),
        },
        check_results=[
            AssetCheckResult(
                check_name="identity_unique",
                passed=unique.num_rows == n,
                metadata={"duplicates": n - unique.num_rows},
            ),
            AssetCheckResult(
                check_name="timestamps_in_partition",
                passed=outside == 0,
                metadata={"records_outside": outside},
            ),
            AssetCheckResult(
                check_name="contract_columns",
                passed=tuple(table.column_names) == CONTRACT_COLUMNS,
                severity=AssetCheckSeverity.ERROR,
                metadata={"columns": len(table.column_names)},
            ),
        ],
    )
