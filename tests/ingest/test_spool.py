"""The collector's spool: identity per tenant, API keys owned by one tenant, migrations."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.records import record

from qabuse_dagster.ingest.partitions import compact_hour, landing_hours
from qabuse_dagster.ingest.spool import Spool, compact, connect, spool_path
from qabuse_dagster.ingest.wire import SpoolRow, spool_row_of
from qabuse_dagster.settings import Paths

H0 = datetime(2026, 3, 2, 13, tzinfo=UTC)
KEY_A, KEY_B = "a" * 64, "b" * 64


def row(job: str, key: str = KEY_A, **extra: object) -> SpoolRow:
    return spool_row_of(record(job, H0, api_key_id=key, **extra))


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "home")


@pytest.fixture
def spool(paths: Paths) -> Spool:
    return Spool(spool_path(paths))


def _landed(paths: Paths) -> list[tuple[str, str, str]]:
    for hour in landing_hours(paths.landing):
        compact_hour(hour, paths.landing, paths.raw_telemetry)
    table = pq.read_table(next(paths.raw_telemetry.rglob("part-0.parquet")))
    return sorted(
        zip(
            table["tenant"].fill_null("<none>").to_pylist(),
            table["job_id"].to_pylist(),
            table["backend"].to_pylist(),
            strict=True,
        )
    )


def test_a_guessed_job_id_from_another_tenant_shadows_nothing(spool: Spool, paths: Paths) -> None:
    # A trusted tenant (a gateway, any_key) sends a forged copy of lab-a's job id first.
    forged = spool.add([row("job-1", backend="forged")], "gateway", any_key=True)
    real = spool.add([row("job-1")], "lab-a")
    again = spool.add([row("job-1")], "lab-a")

    assert (forged.accepted, real.accepted, real.duplicates) == (1, 1, 0)
    assert (again.accepted, again.duplicates) == (0, 1)
    compact(paths)
    assert _landed(paths) == [("gateway", "job-1", "forged"), ("lab-a", "job-1", "ibm_torino")]


def test_the_first_tenant_to_report_a_key_owns_it(spool: Spool) -> None:
    first = spool.add([row("a-1", KEY_A)], "lab-a")
    mixed = spool.add([row("b-1", KEY_B), row("a-2", KEY_A), row("b-2", KEY_B)], "lab-b")
    trusted = spool.add([row("a-3", KEY_A), row("b-3", KEY_B)], "gateway", any_key=True)
    back = spool.add([row("b-4", KEY_B)], "lab-a")

    assert first.accepted == 1
    assert (mixed.accepted, mixed.foreign) == (2, {1: "lab-a"})  # a-2 refused, b-* claimed
    assert (trusted.accepted, trusted.foreign) == (2, {})
    assert (back.accepted, back.foreign) == (0, {0: "lab-b"})


def test_ownership_and_identities_hold_across_processes(paths: Paths) -> None:
    Spool(spool_path(paths)).add([row("a-1")], "lab-a")
    other = Spool(spool_path(paths))  # another collector worker, or after a restart
    assert other.add([row("a-1")], "lab-a").duplicates == 1
    assert other.add([row("a-2")], "lab-b").foreign == {0: "lab-a"}


def test_a_tenant_is_required(spool: Spool) -> None:
    with pytest.raises(ValueError, match="tenant"):
        spool.add([row("x")], "")


def test_a_spool_from_before_tenants_is_migrated(paths: Paths) -> None:
    database = spool_path(paths)
    database.parent.mkdir(parents=True)
    old = sqlite3.connect(database)
    old.executescript(
        """CREATE TABLE identities (job_id TEXT NOT NULL, status TEXT NOT NULL,
               accepted_at INTEGER NOT NULL, PRIMARY KEY (job_id, status)) WITHOUT ROWID;
           CREATE INDEX identities_by_age ON identities (accepted_at);
           CREATE TABLE batches (seq INTEGER PRIMARY KEY AUTOINCREMENT, records TEXT NOT NULL);"""
    )
    old.execute("INSERT INTO identities VALUES ('old-1', 'submitted', ?)", (int(time.time()),))
    old.execute("INSERT INTO batches (records) VALUES (?)", (row("old-1").text,))
    old.commit()
    old.close()

    spool = Spool(database)
    answer = spool.add([row("new-1")], "lab-a")
    compact(paths)

    assert answer.accepted == 1
    conn = connect(database)
    assert conn.execute("SELECT tenant, job_id FROM identities ORDER BY job_id").fetchall() == [
        ("lab-a", "new-1"),
        ("", "old-1"),
    ]
    conn.close()
    assert _landed(paths) == [("<none>", "old-1", "ibm_torino"), ("lab-a", "new-1", "ibm_torino")]
