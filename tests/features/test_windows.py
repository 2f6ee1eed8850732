"""Per-api-key window features: exact answers on tiny hand-made telemetry tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from qabuse_dagster.features.windows import (
    DETECTOR_FEATURES,
    ENTITY_COLUMN,
    FEATURE_NAMES,
    FEATURES,
    FEATURES_BY_WINDOW,
    TIMESTAMP_COLUMN,
    ZSCORE_STD_FLOOR,
    window_features,
)

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
KEY_A = "a" * 16
KEY_B = "b" * 16
COLUMNS = [ENTITY_COLUMN, TIMESTAMP_COLUMN, *FEATURE_NAMES]

INPUT_SCHEMA = pa.schema(
    [
        ("api_key_id", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),
        ("shots", pa.int64()),
        ("code_hash", pa.string()),
    ]
)


def _table(records: list[tuple[str, datetime, str, int | None, str]]) -> pa.Table:
    """Records as (api_key_id, timestamp, status, shots, code_hash) tuples."""
    columns = list(zip(*records, strict=True)) if records else [[] for _ in INPUT_SCHEMA]
    return pa.table(
        {
            field.name: pa.array(col, field.type)
            for field, col in zip(INPUT_SCHEMA, columns, strict=True)
        },
        schema=INPUT_SCHEMA,
    )


def _rows(table: pa.Table) -> list[dict[str, object]]:
    assert table.column_names == COLUMNS
    return table.to_pylist()


def _by_time(table: pa.Table, key: str = KEY_A) -> dict[datetime, dict[str, object]]:
    return {r[TIMESTAMP_COLUMN]: r for r in _rows(table) if r[ENTITY_COLUMN] == key}


def _features(records, start=T0 - timedelta(hours=1), end=T0 + timedelta(hours=1)) -> pa.Table:
    return window_features(_table(records), start, end)


def test_one_record_gives_a_row_at_each_of_the_next_five_minute_boundaries() -> None:
    rows = _by_time(_features([(KEY_A, T0 + timedelta(seconds=30), "submitted", 100, "c1")]))

    assert sorted(rows) == [T0 + k * MINUTE for k in range(1, 6)]
    assert [rows[t]["submissions_1m"] for t in sorted(rows)] == [1, 0, 0, 0, 0]
    assert [rows[t]["mean_shots_1m"] for t in sorted(rows)] == [100.0, 0.0, 0.0, 0.0, 0.0]
    assert [rows[t]["distinct_code_hashes_1m"] for t in sorted(rows)] == [1, 0, 0, 0, 0]
    for t in rows:
        assert rows[t]["submissions_per_min_5m"] == pytest.approx(1 / 5)
        assert rows[t]["mean_shots_5m"] == 100.0
        assert rows[t]["distinct_code_hashes_5m"] == 1
    assert all(r[TIMESTAMP_COLUMN].tzinfo is not None for r in rows.values())


def test_window_bounds_are_closed_below_and_open_above() -> None:
    # a lies exactly on t - 1 min of the row at T0; b lies exactly on T0.
    rows = _by_time(
        _features(
            [
                (KEY_A, T0 - MINUTE, "submitted", 10, "c1"),
                (KEY_A, T0, "submitted", 30, "c2"),
            ]
        )
    )

    assert sorted(rows) == [T0 + k * MINUTE for k in range(0, 6)]
    # Row T0: [T0-1m, T0) holds a, not b.
    assert rows[T0]["submissions_1m"] == 1
    assert rows[T0]["mean_shots_1m"] == 10.0
    assert rows[T0]["submissions_per_min_5m"] == pytest.approx(1 / 5)
    # Row T0+1m: the 1-minute window holds b only; the 5-minute window both.
    assert rows[T0 + MINUTE]["submissions_1m"] == 1
    assert rows[T0 + MINUTE]["mean_shots_1m"] == 30.0
    assert rows[T0 + MINUTE]["submissions_per_min_5m"] == pytest.approx(2 / 5)
    assert rows[T0 + MINUTE]["mean_shots_5m"] == 20.0
    # Row T0+4m: [T0-1m, T0+4m) still holds a, exactly on its lower bound.
    assert rows[T0 + 4 * MINUTE]["submissions_per_min_5m"] == pytest.approx(2 / 5)
    assert rows[T0 + 4 * MINUTE]["distinct_code_hashes_5m"] == 2
    # Row T0+5m: [T0, T0+5m) holds b only.
    assert rows[T0 + 5 * MINUTE]["submissions_per_min_5m"] == pytest.approx(1 / 5)
    assert rows[T0 + 5 * MINUTE]["distinct_code_hashes_5m"] == 1
    assert rows[T0 + 5 * MINUTE]["mean_shots_5m"] == 30.0


def test_submissions_and_fail_rate_follow_the_counting_conventions() -> None:
    at = T0 + timedelta(seconds=10)
    statuses = (
        ["submitted"] * 1
        + ["queued"] * 3
        + ["running"] * 1
        + ["completed"] * 3
        + ["failed"] * 1
        + ["cancelled"] * 1
        + ["rejected"] * 2
    )
    rows = _by_time(_features([(KEY_A, at, s, 100, "c1") for s in statuses]))
    row = rows[T0 + MINUTE]

    # submitted + rejected
    assert row["submissions_1m"] == 3
    assert row["submissions_per_min_5m"] == pytest.approx(3 / 5)
    # (failed + rejected) / (completed + failed + cancelled + rejected)
    assert row["fail_rate_1m"] == pytest.approx(3 / 7)
    assert row["fail_rate_5m"] == pytest.approx(3 / 7)
    # Later rows: no outcome in the last minute, so the 1-minute rate is 0, never NaN.
    later = rows[T0 + 2 * MINUTE]
    assert later["fail_rate_1m"] == 0.0
    assert later["fail_rate_5m"] == pytest.approx(3 / 7)


def test_fail_rate_is_zero_without_outcomes() -> None:
    rows = _by_time(
        _features(
            [
                (KEY_A, T0 + timedelta(seconds=5), "submitted", 100, "c1"),
                (KEY_A, T0 + timedelta(seconds=6), "queued", 100, "c1"),
                (KEY_A, T0 + timedelta(seconds=7), "running", 100, "c1"),
            ]
        )
    )
    for row in rows.values():
        assert row["fail_rate_1m"] == 0.0
        assert row["fail_rate_5m"] == 0.0


def test_mean_shots_ignores_nulls_and_non_submissions() -> None:
    at = T0 + timedelta(seconds=20)
    rows = _by_time(
        _features(
            [
                (KEY_A, at, "submitted", 100, "c1"),
                (KEY_A, at, "submitted", None, "c1"),
                (KEY_A, at, "rejected", 300, "c1"),
                (KEY_A, at, "completed", 10_000, "c1"),
            ]
        )
    )
    assert rows[T0 + MINUTE]["mean_shots_1m"] == pytest.approx(200.0)
    assert rows[T0 + MINUTE]["mean_shots_5m"] == pytest.approx(200.0)


def test_mean_shots_is_zero_when_every_submission_is_analytic() -> None:
    rows = _by_time(_features([(KEY_A, T0 + timedelta(seconds=1), "submitted", None, "c1")]))
    assert rows[T0 + MINUTE]["mean_shots_1m"] == 0.0
    assert rows[T0 + MINUTE]["mean_shots_5m"] == 0.0


def test_distinct_code_hashes_count_submitted_code_only() -> None:
    rows = _by_time(
        _features(
            [
                (KEY_A, T0 + timedelta(seconds=1), "submitted", 1, "c1"),
                (KEY_A, T0 + timedelta(seconds=2), "submitted", 1, "c1"),
                (KEY_A, T0 + timedelta(seconds=3), "rejected", 1, "c2"),
                (KEY_A, T0 + timedelta(seconds=4), "completed", 1, "c9"),
                (KEY_A, T0 + timedelta(seconds=65), "submitted", 1, "c3"),
                (KEY_A, T0 + timedelta(seconds=66), "submitted", 1, "c1"),
            ]
        )
    )
    assert rows[T0 + MINUTE]["distinct_code_hashes_1m"] == 2
    assert rows[T0 + 2 * MINUTE]["distinct_code_hashes_1m"] == 2
    assert rows[T0 + 2 * MINUTE]["distinct_code_hashes_5m"] == 3
    assert rows[T0 + 3 * MINUTE]["distinct_code_hashes_1m"] == 0
    assert rows[T0 + 3 * MINUTE]["distinct_code_hashes_5m"] == 3


def test_submissions_per_min_5m_is_five_minute_submissions_over_five() -> None:
    per_minute = [4, 0, 2, 1, 0, 3]  # submissions in minutes T0 .. T0+5m
    records = [
        (KEY_A, T0 + m * MINUTE + timedelta(seconds=s), "submitted", 1, "c1")
        for m, n in enumerate(per_minute)
        for s in range(n)
    ]
    rows = _by_time(_features(records))
    for k in range(1, 7):
        t = T0 + k * MINUTE
        expected = sum(per_minute[max(0, k - 5) : k]) / 5
        assert rows[t]["submissions_per_min_5m"] == pytest.approx(expected), t
        assert rows[t]["submissions_1m"] == per_minute[k - 1]


def _expected_zscore(counts: np.ndarray, i: int) -> float:
    """z of minute i - 1 against minutes i - 60 .. i - 2, with the std floor."""
    last = counts[i - 1]
    history = counts[i - 60 : i - 1]
    assert len(history) == 59
    return float((last - history.mean()) / max(history.std(), ZSCORE_STD_FLOOR))


def test_zscore_against_previous_59_minutes_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    base = T0 - timedelta(hours=1)
    n_minutes = 90
    counts = np.zeros(n_minutes + 10, dtype=int)
    counts[:n_minutes] = rng.poisson(1.5, size=n_minutes)
    counts[70] = 12  # a burst the z-score must flag
    counts[80:85] = 0  # a silent stretch: zero minutes belong to the history too
    records = []
    has_record = np.zeros_like(counts, dtype=bool)
    for m in range(n_minutes):
        for s in range(counts[m]):
            records.append((KEY_A, base + m * MINUTE + timedelta(seconds=s), "submitted", 1, "c1"))
        if rng.random() < 0.3:  # outcomes count for row existence, not for the z-score
            records.append((KEY_A, base + m * MINUTE + timedelta(seconds=59), "completed", 1, "c1"))
            has_record[m] = True
        has_record[m] |= counts[m] > 0

    start, end = base + 60 * MINUTE, base + 95 * MINUTE
    rows = _by_time(window_features(_table(records), start, end))

    expected_times = [
        base + i * MINUTE for i in range(60, 95) if has_record[max(0, i - 5) : i].any()
    ]
    assert sorted(rows) == expected_times
    for t, row in rows.items():
        i = (t - base) // MINUTE
        assert row["submissions_1m"] == counts[i - 1]
        assert row["submissions_1m_zscore"] == pytest.approx(_expected_zscore(counts, i)), t
    assert rows[base + 71 * MINUTE]["submissions_1m_zscore"] >= 3.0


def test_zscore_std_is_floored_for_a_flat_history() -> None:
    base = T0 - timedelta(hours=1)
    records = [
        (KEY_A, base + m * MINUTE + timedelta(seconds=1), "submitted", 1, "c1") for m in range(59)
    ]
    records += [
        (KEY_A, base + 59 * MINUTE + timedelta(seconds=s), "submitted", 1, "c1") for s in range(10)
    ]
    rows = _by_time(window_features(_table(records), T0, T0 + MINUTE))

    assert list(rows) == [T0]
    # history: 59 minutes of exactly 1 (std 0, floored to 1); last minute: 10.
    assert rows[T0]["submissions_1m_zscore"] == pytest.approx((10 - 1) / ZSCORE_STD_FLOOR)
    assert np.isfinite(rows[T0]["submissions_1m_zscore"])


def test_zscore_of_a_new_key_uses_zero_history() -> None:
    rows = _by_time(
        _features([(KEY_A, T0 + timedelta(seconds=s), "submitted", 1, "c1") for s in range(3)])
    )
    assert rows[T0 + MINUTE]["submissions_1m_zscore"] == pytest.approx(3.0)
    counts = np.zeros(70, dtype=int)
    counts[60] = 3
    assert rows[T0 + 2 * MINUTE]["submissions_1m_zscore"] == pytest.approx(
        _expected_zscore(counts, 62)
    )


def test_keys_are_kept_apart_and_rows_ordered_by_time_then_key() -> None:
    at = T0 + timedelta(seconds=30)
    table = _features(
        [
            (KEY_B, at, "submitted", 50, "cb"),
            (KEY_A, at, "submitted", 100, "ca1"),
            (KEY_A, at, "submitted", 300, "ca2"),
            (KEY_A, at, "failed", 100, "ca1"),
        ]
    )
    rows = _rows(table)
    order = [(r[TIMESTAMP_COLUMN], r[ENTITY_COLUMN]) for r in rows]
    assert order == sorted(order)
    assert len(rows) == 10

    a, b = _by_time(table, KEY_A)[T0 + MINUTE], _by_time(table, KEY_B)[T0 + MINUTE]
    assert (a["submissions_1m"], a["mean_shots_1m"], a["distinct_code_hashes_1m"]) == (
        2,
        200.0,
        2,
    )
    assert a["fail_rate_1m"] == 1.0
    assert (b["submissions_1m"], b["mean_shots_1m"], b["distinct_code_hashes_1m"]) == (1, 50.0, 1)
    assert b["fail_rate_1m"] == 0.0


def test_rows_outside_start_end_are_dropped_but_lookback_records_count() -> None:
    start, end = T0, T0 + 3 * MINUTE
    records = [
        (KEY_A, T0 - 3 * MINUTE + timedelta(seconds=30), "submitted", 100, "c1"),  # lookback
        (KEY_A, T0 + MINUTE + timedelta(seconds=10), "submitted", 300, "c2"),
        (KEY_A, end, "submitted", 7, "c3"),  # at end: excluded
        (KEY_A, end + 2 * MINUTE, "submitted", 7, "c4"),  # after end: excluded
    ]
    rows = _by_time(window_features(_table(records), start, end))

    assert sorted(rows) == [T0, T0 + MINUTE, T0 + 2 * MINUTE]
    assert rows[T0]["submissions_per_min_5m"] == pytest.approx(1 / 5)
    assert rows[T0]["mean_shots_5m"] == 100.0
    assert rows[T0 + 2 * MINUTE]["submissions_1m"] == 1
    assert rows[T0 + 2 * MINUTE]["submissions_per_min_5m"] == pytest.approx(2 / 5)
    assert rows[T0 + 2 * MINUTE]["distinct_code_hashes_5m"] == 2


def test_records_before_the_lookback_are_ignored() -> None:
    old = T0 - timedelta(minutes=90)
    rows = _rows(window_features(_table([(KEY_A, old, "submitted", 1, "c1")]), T0, T0 + MINUTE))
    assert rows == []


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (T0.replace(tzinfo=None), T0 + MINUTE),
        (T0, (T0 + MINUTE).replace(tzinfo=None)),
    ],
)
def test_tz_naive_bounds_raise(start: datetime, end: datetime) -> None:
    with pytest.raises(ValueError, match="tz-aware"):
        window_features(_table([(KEY_A, T0, "submitted", 1, "c1")]), start, end)


def test_empty_input_gives_empty_output_with_every_column() -> None:
    table = window_features(_table([]), T0, T0 + timedelta(hours=1))
    assert table.num_rows == 0
    assert table.column_names == COLUMNS
    assert table.schema.field(TIMESTAMP_COLUMN).type == pa.timestamp("us", tz="UTC")


def test_feature_specs_are_complete_and_unique() -> None:
    names = [f.name for f in FEATURES]
    assert tuple(names) == FEATURE_NAMES
    assert len(set(names)) == len(names)
    assert all(f.unit.strip() and f.description.strip() for f in FEATURES)
    descriptions = [f.description for f in FEATURES]
    assert len(set(descriptions)) == len(descriptions)
    by_window = [name for names in FEATURES_BY_WINDOW.values() for name in names]
    assert sorted(by_window) == sorted(FEATURE_NAMES)
    assert set(DETECTOR_FEATURES) <= set(FEATURE_NAMES)


@pytest.mark.parametrize("seed", [1, 2])
def test_the_numpy_engine_gives_the_duckdb_sql_rows_bit_for_bit(seed: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The engine replaced a DuckDB query; both must give the same table on real twin data."""
    from benchmarks.duckdb_windows import duckdb_window_features
    from qabuse_dagster.evaluation.report import read_telemetry_jsonl
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    result = simulate(hours=14, seed=seed, out=tmp_path, hasher=KeyedHasher.demo())
    telemetry = read_telemetry_jsonl(result.telemetry_path)
    start = result.start + timedelta(minutes=37)  # mid-hour: the lookback is cut mid-window
    ours = window_features(telemetry, start, result.end)
    oracle = duckdb_window_features(telemetry, start, result.end)
    assert ours.num_rows > 1000
    _assert_same_rows(ours, oracle)


def test_the_engines_agree_on_dense_synthetic_telemetry_with_nulls() -> None:
    import numpy as np
    import pyarrow.compute as pc

    from benchmarks.duckdb_windows import duckdb_window_features
    from benchmarks.feature_windows import DATA_START, generate_telemetry

    telemetry = generate_telemetry(40_000, 60, 0.5, seed=3)
    rng = np.random.default_rng(0)
    # Null shots and code hashes are allowed on some statuses: counts must skip them.
    for column in ("shots", "code_hash"):
        values = telemetry[column]
        nulls = pa.array(rng.random(len(values)) < 0.1)
        index = telemetry.schema.get_field_index(column)
        telemetry = telemetry.set_column(index, column, pc.if_else(nulls, None, values))
    start, end = DATA_START + timedelta(minutes=90), DATA_START + timedelta(hours=12, minutes=5)
    _assert_same_rows(
        window_features(telemetry, start, end), duckdb_window_features(telemetry, start, end)
    )


def _assert_same_rows(ours: pa.Table, oracle: pa.Table) -> None:
    """Same rows, keys, instants and counts; ratios equal up to the last bits of a double
    (the z-score's square and root round differently in DuckDB and numpy). The DuckDB
    engine has the detector's features only."""
    ours = ours.select(oracle.column_names)
    assert ours.schema == oracle.schema
    assert ours.num_rows == oracle.num_rows
    for name in ours.column_names:
        mine, theirs = ours[name].to_numpy(), oracle[name].to_numpy()
        if mine.dtype.kind == "f":
            np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(mine, theirs, err_msg=name)
