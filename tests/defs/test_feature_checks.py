"""The window-feature assets: one per entity, and checks that can fail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qabuse_dagster.defs import feature_assets
from qabuse_dagster.defs.feature_assets import (
    _lag_behind_raw_s,
    _range_violations,
    _schema_problems,
)
from qabuse_dagster.features.definitions import (
    ACTIVITY_LOOKBACK_MINUTES,
    ENTITY_COLUMNS,
    FEATURES,
    JOB_MEMORY_MINUTES,
    feature_schema,
)
from qabuse_dagster.features.windows import window_features

HOUR = datetime(2026, 11, 2, 10, tzinfo=UTC)
END = HOUR + timedelta(hours=1)


def _raw(*minutes: float) -> pa.Table:
    stamps = [HOUR + timedelta(minutes=m) for m in minutes]
    n = len(stamps)
    return pa.table(
        {
            "api_key_id": ["k"] * n,
            "user": ["u"] * n,
            "timestamp": pa.array(stamps, type=pa.timestamp("us", tz="UTC")),
            "status": ["submitted"] * n,
            "shots": [100] * n,
            "code_hash": ["c"] * n,
        }
    )


@pytest.mark.parametrize("entity", sorted(ENTITY_COLUMNS))
def test_each_entity_has_an_asset_reading_a_day_of_raw_partitions(entity: str) -> None:
    from dagster import AssetKey

    asset = getattr(feature_assets, f"{entity}_window_features")
    assert asset.key == AssetKey(f"{entity}_window_features")
    mapping = asset.get_partition_mapping(AssetKey("raw_telemetry"))
    # Rows look back 24 h (entity age, gap), and whether a record is its job's first one
    # looks back a further day (the job memory), so an hour reads the 48 hours before it.
    assert mapping.start_offset == -(ACTIVITY_LOOKBACK_MINUTES + JOB_MEMORY_MINUTES) // 60
    assert mapping.start_offset == -48
    assert {spec.name for spec in asset.check_specs} == {
        "no_nulls",
        "value_ranges",
        "schema",
        "freshness",
    }


def test_the_schema_check_passes_on_real_rows_and_names_each_difference() -> None:
    rows = window_features(_raw(1.5), HOUR, END)
    assert _schema_problems(rows.schema) == []
    assert feature_schema("api_key_id").names == rows.column_names
    broken = rows.drop_columns(["fail_rate_1m"]).append_column("extra", pa.array([1] * len(rows)))
    broken = broken.set_column(2, "submissions_1m", rows["submissions_1m"].cast(pa.float64()))
    problems = _schema_problems(broken.schema)
    assert "missing column fail_rate_1m" in problems
    assert "unexpected column extra" in problems
    assert any(p.startswith("submissions_1m is double") for p in problems)


def test_the_schema_check_follows_the_entity_column() -> None:
    rows = window_features(_raw(1.5), HOUR, END, entity_column="user")
    assert _schema_problems(rows.schema, "user") == []
    assert set(_schema_problems(rows.schema, "api_key_id")) == {
        "missing column api_key_id",
        "unexpected column user",
    }


def test_value_ranges_follow_each_features_declared_bounds() -> None:
    rows = window_features(_raw(1.5, 2.5, 30.0), HOUR, END).to_pandas()
    assert _range_violations(rows) == {}
    edge = rows.head(1).copy()
    outside = rows.head(1).copy()
    expected = {}
    for spec in FEATURES:
        # The bounds themselves are allowed; one past either end is counted.
        edge[spec.name] = spec.low if spec.low is not None else -1e9
        if spec.high is not None:
            outside[spec.name] = spec.high + 0.5
            expected[spec.name] = 1
        elif spec.low is not None:
            outside[spec.name] = spec.low - 0.5
            expected[spec.name] = 1
        else:
            outside[spec.name] = -1e9
    assert _range_violations(edge) == {}
    assert _range_violations(outside) == expected
    # Unbounded features (z-scores) are never flagged; a ratio past 1 is.
    assert "submissions_1m_zscore" not in expected and expected["fail_rate_1m"] == 1


def test_nulls_are_left_to_the_null_check() -> None:
    rows = window_features(_raw(1.5), HOUR, END).to_pandas().head(1)
    rows["fail_rate_1m"] = float("nan")
    assert _range_violations(rows) == {}


def test_freshness_is_met_by_rows_covering_the_newest_record_and_fails_on_stale_rows() -> None:
    raw = _raw(3.2, 41.7)
    rows = window_features(raw, HOUR, END)
    assert _lag_behind_raw_s(raw, rows, HOUR, END) <= 0
    stale = rows.filter(pa.compute.less(rows["event_timestamp"], HOUR + timedelta(minutes=30)))
    assert _lag_behind_raw_s(raw, stale, HOUR, END) == (42 - 8) * 60
    assert _lag_behind_raw_s(_raw(), rows.slice(0, 0), HOUR, END) is None
    # A record of the last minute is first seen by the next hour's rows.
    late = _raw(59.5)
    assert _lag_behind_raw_s(late, window_features(late, HOUR, END), HOUR, END) is None


@pytest.mark.integration
def test_the_open_hour_has_no_row_past_the_present_minute(tmp_path: Path) -> None:
    """A row after now would claim that no record comes until then, and would outrank the
    stream worker's fresher rows in the online store."""
    from dagster import materialize
    from support.records import record

    from qabuse_dagster import settings
    from qabuse_dagster.defs.partitions import partition_key
    from qabuse_dagster.defs.resources import QabuseStorage
    from qabuse_dagster.ingest.partitions import (
        hour_of,
        partition_dir,
        records_to_table,
        write_parquet_atomic,
    )

    now = datetime.now(UTC)
    records = [record(f"job-{i}", now - timedelta(minutes=i)) for i in range(1, 40)]
    raw = settings.Paths(tmp_path).raw_telemetry
    for hour in sorted({hour_of(r.timestamp) for r in records}):
        table = records_to_table([r for r in records if hour_of(r.timestamp) == hour])
        write_parquet_atomic(table, partition_dir(raw, hour) / "part-0.parquet")
    result = materialize(
        [feature_assets.api_key_window_features],
        partition_key=partition_key(now),
        resources={"storage": QabuseStorage(home=str(tmp_path))},
    )
    assert result.success
    written = pq.read_table(settings.Paths(tmp_path).api_key_windows).to_pandas()
    stamps = pd.to_datetime(written["event_timestamp"], utc=True)
    assert len(stamps) > 0
    assert stamps.max() <= pd.Timestamp(now)
    # Up to the present minute, not short of it: the newest row is this minute's.
    assert stamps.max() >= pd.Timestamp(now).floor("min") - pd.Timedelta(minutes=1)
