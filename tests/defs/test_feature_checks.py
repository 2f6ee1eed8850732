"""The window-feature asset's schema and freshness checks can fail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa

from qabuse_dagster.defs.feature_assets import _lag_behind_raw_s, _schema_problems
from qabuse_dagster.features.windows import FEATURE_SCHEMA, window_features

HOUR = datetime(2026, 11, 2, 10, tzinfo=UTC)


def _raw(*minutes: float) -> pa.Table:
    stamps = [HOUR + timedelta(minutes=m) for m in minutes]
    n = len(stamps)
    return pa.table(
        {
            "api_key_id": ["k"] * n,
            "timestamp": pa.array(stamps, type=pa.timestamp("us", tz="UTC")),
            "status": ["submitted"] * n,
            "shots": [100] * n,
            "code_hash": ["c"] * n,
        }
    )


def test_the_schema_check_passes_on_real_rows_and_names_each_difference() -> None:
    rows = window_features(_raw(1.5), HOUR, HOUR + timedelta(hours=1))
    assert _schema_problems(rows.schema) == []
    broken = rows.drop_columns(["fail_rate_1m"]).append_column("extra", pa.array([1] * len(rows)))
    broken = broken.set_column(2, "submissions_1m", rows["submissions_1m"].cast(pa.float64()))
    problems = _schema_problems(broken.schema)
    assert "missing column fail_rate_1m" in problems
    assert "unexpected column extra" in problems
    assert any(p.startswith("submissions_1m is double") for p in problems)
    assert FEATURE_SCHEMA.names == rows.column_names


def test_freshness_is_met_by_rows_covering_the_newest_record_and_fails_on_stale_rows() -> None:
    end = HOUR + timedelta(hours=1)
    raw = _raw(3.2, 41.7)
    rows = window_features(raw, HOUR, end)
    assert _lag_behind_raw_s(raw, rows, HOUR, end) <= 0
    stale = rows.filter(pa.compute.less(rows["event_timestamp"], HOUR + timedelta(minutes=30)))
    assert _lag_behind_raw_s(raw, stale, HOUR, end) == (42 - 8) * 60
    assert _lag_behind_raw_s(_raw(), rows.slice(0, 0), HOUR, end) is None
    # A record of the last minute is first seen by the next hour's rows.
    late = _raw(59.5)
    assert _lag_behind_raw_s(late, window_features(late, HOUR, end), HOUR, end) is None
