"""Hourly raw partitions: landing files, compaction with de-duplication, reads, atomic writes."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from support.records import record

from qabuse_dagster.ingest import partitions
from qabuse_dagster.ingest.partitions import (
    STORED_SCHEMA,
    TELEMETRY_SCHEMA,
    compact_hour,
    hour_of,
    hours_between,
    landing_hours,
    partition_dir,
    read_raw,
    records_to_table,
    stage_landing,
    write_parquet_atomic,
)
from qabuse_dagster.settings import Paths
from qabuse_dagster.telemetry.contract import CONTRACT_COLUMNS

H0 = datetime(2026, 3, 2, 13, 0, tzinfo=UTC)
H1 = H0 + timedelta(hours=1)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path)


def _identities(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table["job_id"].to_pylist(), table["status"].to_pylist(), strict=True))


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_records_to_table_has_the_contract_schema() -> None:
    table = records_to_table(
        [
            record("j1", H0, gate_counts={"cx": 4, "h": 2}, tags={"team": "qa"}, region="eu"),
            record("j2", H0 + timedelta(minutes=1), shots=None),
        ]
    )
    assert table.schema.equals(TELEMETRY_SCHEMA)
    assert tuple(table.column_names) == CONTRACT_COLUMNS
    rows = table.to_pylist()
    assert rows[0]["gate_counts"] == [("cx", 4), ("h", 2)]
    assert rows[0]["tags"] == [("team", "qa")]
    assert rows[0]["timestamp"] == H0
    assert rows[1]["shots"] is None
    assert rows[1]["retry_count"] == 0


def test_records_to_table_of_nothing_is_empty_with_schema() -> None:
    table = records_to_table([])
    assert table.num_rows == 0
    assert table.schema.equals(TELEMETRY_SCHEMA)


def test_hour_helpers() -> None:
    assert hour_of(datetime(2026, 3, 2, 15, 59, 59, tzinfo=UTC)) == datetime(
        2026, 3, 2, 15, tzinfo=UTC
    )
    # An offset is converted to UTC before truncating.
    plus_two = datetime(2026, 3, 2, 17, 30, tzinfo=timezone(timedelta(hours=2)))
    assert hour_of(plus_two) == datetime(2026, 3, 2, 15, tzinfo=UTC)
    assert partition_dir(Path("/r"), H0 + timedelta(minutes=5)) == Path(
        "/r/date=2026-03-02/hour=13"
    )
    assert hours_between(H0 + timedelta(minutes=30), H0 + timedelta(hours=2)) == [H0, H1]
    assert hours_between(H0, H0 + timedelta(hours=2, minutes=1)) == [H0, H1, H0 + 2 * (H1 - H0)]
    assert hours_between(H0, H0) == []


def test_stage_landing_splits_by_hour(paths: Paths) -> None:
    table = records_to_table(
        [
            record("j1", H0 + timedelta(minutes=1)),
            record("j2", H1 + timedelta(minutes=59, seconds=59)),
            record("j3", H0 + timedelta(minutes=59, seconds=59, microseconds=999_999)),
            record("j4", H1),
        ]
    )
    written = stage_landing(table, paths.landing, tenant="t")

    assert len(written) == 2
    assert {p.parent for p in written} == {
        partition_dir(paths.landing, H0),
        partition_dir(paths.landing, H1),
    }
    by_hour = {p.parent: sorted(pq.read_table(p)["job_id"].to_pylist()) for p in written}
    assert by_hour[partition_dir(paths.landing, H0)] == ["j1", "j3"]
    assert by_hour[partition_dir(paths.landing, H1)] == ["j2", "j4"]
    assert all(p.name.startswith("batch-") and p.suffix == ".parquet" for p in written)
    assert landing_hours(paths.landing) == [H0, H1]


def test_staging_a_batch_twice_stores_each_record_once(paths: Paths) -> None:
    table = records_to_table([record("j1", H0), record("j2", H1)])
    first = stage_landing(table, paths.landing, tenant="t")
    second = stage_landing(table, paths.landing, tenant="t")
    # Names follow staging order, so the replay lands beside the first batch...
    assert sorted(first) != sorted(second)
    assert all(a.name < b.name for a, b in zip(sorted(first), sorted(second), strict=True))
    for hour in (H0, H1):
        compact_hour(hour, paths.landing, paths.raw_telemetry)
    # ...and compaction stores every (job_id, status) once.
    assert sorted(read_raw(paths.raw_telemetry)["job_id"].to_pylist()) == ["j1", "j2"]


def test_stage_landing_of_an_empty_table_writes_nothing(paths: Paths) -> None:
    assert stage_landing(records_to_table([]), paths.landing, tenant="t") == []
    assert not paths.landing.exists() or _all_files(paths.landing) == []


def test_compact_hour_merges_landing_and_removes_it(paths: Paths) -> None:
    stage_landing(
        records_to_table([record("j2", H0 + timedelta(minutes=5)), record("j1", H0)]),
        paths.landing,
        tenant="t",
    )
    stage_landing(
        records_to_table([record("j3", H0 + timedelta(minutes=2))]), paths.landing, tenant="t"
    )

    report = compact_hour(H0 + timedelta(minutes=17), paths.landing, paths.raw_telemetry)

    assert (report.hour, report.rows, report.new_rows) == (H0, 3, 3)
    assert (report.duplicates_dropped, report.landing_files) == (0, 2)
    assert list(partition_dir(paths.landing, H0).glob("*.parquet")) == []
    assert landing_hours(paths.landing) == []
    target = partition_dir(paths.raw_telemetry, H0) / "part-0.parquet"
    stored = pq.read_table(target)
    assert stored.schema.equals(STORED_SCHEMA)
    assert stored["tenant"].to_pylist() == ["t", "t", "t"]
    # Sorted by timestamp.
    assert stored["job_id"].to_pylist() == ["j1", "j3", "j2"]


def test_compact_hour_keeps_the_existing_record_over_a_later_copy(paths: Paths) -> None:
    stage_landing(
        records_to_table([record("j1", H0, shots=100), record("j2", H0)]), paths.landing, tenant="t"
    )
    compact_hour(H0, paths.landing, paths.raw_telemetry)

    later_copy = record("j1", H0 + timedelta(minutes=9), shots=999, backend="other_backend")
    stage_landing(records_to_table([later_copy, record("j3", H0)]), paths.landing, tenant="t")
    report = compact_hour(H0, paths.landing, paths.raw_telemetry)

    assert (report.rows, report.new_rows, report.duplicates_dropped) == (3, 1, 1)
    stored = read_raw(paths.raw_telemetry)
    assert sorted(_identities(stored)) == [
        ("j1", "submitted"),
        ("j2", "submitted"),
        ("j3", "submitted"),
    ]
    j1 = next(r for r in stored.to_pylist() if r["job_id"] == "j1")
    assert (j1["shots"], j1["backend"], j1["timestamp"]) == (100, "ibm_torino", H0)


def test_compact_hour_dedups_on_job_id_and_status(paths: Paths) -> None:
    batch = [
        record("j1", H0, "submitted"),
        record("j1", H0 + timedelta(seconds=1), "queued"),
        record("j1", H0 + timedelta(seconds=2), "completed"),
        record("j1", H0 + timedelta(seconds=3), "completed", shots=5),  # duplicate identity
        record("j2", H0, "completed"),
    ]
    stage_landing(records_to_table(batch), paths.landing, tenant="t")
    report = compact_hour(H0, paths.landing, paths.raw_telemetry)

    assert (report.rows, report.duplicates_dropped) == (4, 1)
    stored = read_raw(paths.raw_telemetry)
    j1_completed = [
        r for r in stored.to_pylist() if (r["job_id"], r["status"]) == ("j1", "completed")
    ]
    assert len(j1_completed) == 1
    assert j1_completed[0]["shots"] == 1024  # the first one in the batch


def test_compact_hour_is_idempotent(paths: Paths) -> None:
    batch = records_to_table([record("j1", H0), record("j2", H0 + timedelta(minutes=1))])
    stage_landing(batch, paths.landing, tenant="t")
    compact_hour(H0, paths.landing, paths.raw_telemetry)
    target = partition_dir(paths.raw_telemetry, H0) / "part-0.parquet"
    before = target.read_bytes()

    rerun = compact_hour(H0, paths.landing, paths.raw_telemetry)
    assert (rerun.rows, rerun.new_rows, rerun.duplicates_dropped, rerun.landing_files) == (
        2,
        0,
        0,
        0,
    )
    assert target.read_bytes() == before

    # A replayed batch (as after a crash before the landing files were deleted).
    stage_landing(batch, paths.landing, tenant="t")
    replay = compact_hour(H0, paths.landing, paths.raw_telemetry)
    assert (replay.rows, replay.new_rows, replay.duplicates_dropped) == (2, 0, 2)
    assert read_raw(paths.raw_telemetry).equals(pq.read_table(target, schema=TELEMETRY_SCHEMA))
    assert read_raw(paths.raw_telemetry).num_rows == 2


def test_compact_hour_with_nothing_to_do(paths: Paths) -> None:
    report = compact_hour(H0, paths.landing, paths.raw_telemetry)
    assert (report.rows, report.new_rows, report.landing_files) == (0, 0, 0)
    assert not (partition_dir(paths.raw_telemetry, H0) / "part-0.parquet").exists()


def test_compact_hour_refuses_records_of_another_hour(paths: Paths) -> None:
    stray = records_to_table([record("j1", H1 + timedelta(minutes=3))])
    landing_file = partition_dir(paths.landing, H0) / "batch-stray.parquet"
    write_parquet_atomic(stray, landing_file)

    with pytest.raises(ValueError, match="other hours"):
        compact_hour(H0, paths.landing, paths.raw_telemetry)
    assert landing_file.exists()
    assert not (partition_dir(paths.raw_telemetry, H0) / "part-0.parquet").exists()


def test_compacted_partitions_read_as_a_hive_dataset(paths: Paths) -> None:
    stage_landing(
        records_to_table([record("j1", H0), record("j2", H1), record("j3", H1)]),
        paths.landing,
        tenant="t",
    )
    for hour in landing_hours(paths.landing):
        compact_hour(hour, paths.landing, paths.raw_telemetry)

    table = ds.dataset(paths.raw_telemetry, partitioning="hive").to_table()
    assert table.column_names == [*CONTRACT_COLUMNS, "tenant", "date", "hour"]
    assert table.num_rows == 3
    hours = {(r["job_id"], str(r["date"]), int(r["hour"])) for r in table.to_pylist()}
    assert hours == {("j1", "2026-03-02", 13), ("j2", "2026-03-02", 14), ("j3", "2026-03-02", 14)}


def _compact_all(paths: Paths) -> None:
    for hour in landing_hours(paths.landing):
        compact_hour(hour, paths.landing, paths.raw_telemetry)


def test_read_raw_filters_half_open_interval(paths: Paths) -> None:
    times = {
        "before": H0 + timedelta(minutes=9, seconds=59, microseconds=999_999),
        "at_start": H0 + timedelta(minutes=10),
        "inside": H1 + timedelta(minutes=1),
        "at_end": H1 + timedelta(minutes=20),
    }
    stage_landing(
        records_to_table([record(j, t) for j, t in times.items()]), paths.landing, tenant="t"
    )
    _compact_all(paths)

    start, end = times["at_start"], times["at_end"]
    table = read_raw(paths.raw_telemetry, start, end)
    assert sorted(table["job_id"].to_pylist()) == ["at_start", "inside"]
    assert tuple(table.column_names) == CONTRACT_COLUMNS
    assert read_raw(paths.raw_telemetry).num_rows == 4
    assert sorted(read_raw(paths.raw_telemetry, start=start)["job_id"].to_pylist()) == [
        "at_end",
        "at_start",
        "inside",
    ]
    assert read_raw(paths.raw_telemetry, end=start)["job_id"].to_pylist() == ["before"]


def test_read_raw_prunes_partitions_outside_the_range(paths: Paths) -> None:
    stage_landing(records_to_table([record("j1", H0), record("j2", H1)]), paths.landing, tenant="t")
    _compact_all(paths)
    # Corrupt the H0 partition: a read that opens it would fail.
    (partition_dir(paths.raw_telemetry, H0) / "part-0.parquet").write_bytes(b"not parquet")

    table = read_raw(paths.raw_telemetry, H1, H1 + timedelta(hours=1))
    assert table["job_id"].to_pylist() == ["j2"]
    with pytest.raises(pa.ArrowInvalid):
        read_raw(paths.raw_telemetry, H0, H1 + timedelta(hours=1))


def test_read_raw_of_nothing_is_empty_with_schema(paths: Paths) -> None:
    table = read_raw(paths.raw_telemetry, H0, H1)
    assert table.num_rows == 0
    assert table.schema.equals(TELEMETRY_SCHEMA)


def test_write_parquet_atomic_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "dir" / "part-0.parquet"
    table = records_to_table([record("j1", H0)])
    write_parquet_atomic(table, target)
    write_parquet_atomic(records_to_table([record("j1", H0), record("j2", H0)]), target)

    assert _all_files(tmp_path) == [target]
    assert pq.read_table(target)["job_id"].to_pylist() == ["j1", "j2"]


def test_write_parquet_atomic_failure_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "part-0.parquet"
    write_parquet_atomic(records_to_table([record("j1", H0)]), target)
    before = target.read_bytes()

    def broken_write(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(partitions.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(records_to_table([record("j2", H0)]), target)

    assert _all_files(tmp_path) == [target]
    assert target.read_bytes() == before


def _landing_name(job_ids: list[str]) -> str:
    digest = hashlib.sha256()
    for job_id in job_ids:
        digest.update(f"{job_id}\x00submitted\x01".encode())
    return digest.hexdigest()[:24]


def test_compact_hour_keeps_the_first_staged_of_two_pending_batches(paths: Paths) -> None:
    # Pick a second batch whose digest name sorts before the first batch's name.
    first_ids = ["j1", "j2"]
    second_ids = next(
        ["j1", f"x{n}"]
        for n in range(1000)
        if _landing_name(["j1", f"x{n}"]) < _landing_name(first_ids)
    )
    stage_landing(
        records_to_table([record("j1", H0, shots=100), record("j2", H0)]), paths.landing, tenant="t"
    )
    stage_landing(
        records_to_table([record("j1", H0, shots=999), record(second_ids[1], H0)]),
        paths.landing,
        tenant="t",
    )
    compact_hour(H0, paths.landing, paths.raw_telemetry)

    j1 = next(r for r in read_raw(paths.raw_telemetry).to_pylist() if r["job_id"] == "j1")
    assert j1["shots"] == 100


def test_a_year_before_1000_gets_a_four_digit_folder_that_reads_back(tmp_path: Path) -> None:
    from qabuse_dagster.ingest.partitions import landing_hours, partition_dir

    early = datetime(1, 1, 1, 5, tzinfo=UTC)
    folder = partition_dir(tmp_path, early)
    folder.mkdir(parents=True)
    (folder / "batch-0.parquet").touch()

    assert folder.relative_to(tmp_path).as_posix() == "date=0001-01-01/hour=05"
    assert landing_hours(tmp_path) == [early]


def test_identity_is_per_tenant_so_no_tenant_shadows_another(paths: Paths) -> None:
    # Tenant "mallory" sends a guessed job id first; the owner's record must still land.
    guess = record("job-7", H0, backend="forged")
    stage_landing(records_to_table([guess]), paths.landing, tenant="mallory")
    stage_landing(records_to_table([record("job-7", H0)]), paths.landing, tenant="lab-a")
    stage_landing(records_to_table([record("job-7", H0)]), paths.landing, tenant="lab-a")

    report = compact_hour(H0, paths.landing, paths.raw_telemetry)

    stored = pq.read_table(partition_dir(paths.raw_telemetry, H0) / "part-0.parquet")
    assert (report.rows, report.duplicates_dropped) == (2, 1)
    assert sorted(
        zip(stored["tenant"].to_pylist(), stored["backend"].to_pylist(), strict=True)
    ) == [
        ("lab-a", "ibm_torino"),
        ("mallory", "forged"),
    ]
    assert read_raw(paths.raw_telemetry).column_names == list(CONTRACT_COLUMNS)


def test_a_partition_from_before_tenants_merges_with_its_tenant_null(paths: Paths) -> None:
    target = partition_dir(paths.raw_telemetry, H0) / "part-0.parquet"
    target.parent.mkdir(parents=True)
    pq.write_table(records_to_table([record("j1", H0)]), target)  # contract columns only
    stage_landing(records_to_table([record("j1", H0), record("j2", H0)]), paths.landing, tenant="t")

    compact_hour(H0, paths.landing, paths.raw_telemetry)

    stored = pq.read_table(target)
    # Null is a tenant of its own: who sent the old row is unknown, so no one shadows it.
    assert sorted(
        zip(stored["job_id"].to_pylist(), stored["tenant"].fill_null("?").to_pylist(), strict=True)
    ) == [
        ("j1", "?"),
        ("j1", "t"),
        ("j2", "t"),
    ]
