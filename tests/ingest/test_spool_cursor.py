"""Tailing the spool: commit times, reading after a cursor, consumers that hold compaction back."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support.records import record

from qabuse_dagster.ingest.spool import (
    CONSUMER_TIMEOUT,
    Spool,
    batch_table,
    commit_consumer,
    compact,
    connect,
    consumer_position,
    read_batches,
    register_consumer,
    spool_path,
    unregister_consumer,
)
from qabuse_dagster.ingest.wire import SpoolRow, spool_row_of
from qabuse_dagster.settings import Paths

H0 = datetime(2026, 3, 2, 13, tzinfo=UTC)


def row(job: str) -> SpoolRow:
    return spool_row_of(record(job, H0))


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "home")


@pytest.fixture
def spool(paths: Paths) -> Spool:
    return Spool(spool_path(paths))


@pytest.fixture
def conn(paths: Paths, spool: Spool) -> sqlite3.Connection:
    return connect(spool_path(paths))


def _landed_jobs(paths: Paths) -> set[str]:
    import pyarrow.parquet as pq

    return {
        job
        for path in paths.landing.rglob("batch-*.parquet")
        for job in pq.read_table(path, columns=["job_id"])["job_id"].to_pylist()
    }


def test_batches_read_back_in_commit_order_with_their_commit_time(
    spool: Spool, conn: sqlite3.Connection
) -> None:
    before = time.time_ns() // 1_000_000
    spool.add([row("a-1"), row("a-2")], "lab-a")
    spool.add([row("b-1")], "lab-a")
    spool.add([row("a-1")], "lab-a")  # a duplicate: no batch
    spool.add([row("c-1")], "gateway", any_key=True)
    after = time.time_ns() // 1_000_000

    batches = read_batches(conn, 0)
    assert [[json.loads(t)["job_id"] for t in b.records] for b in batches] == [
        ["a-1", "a-2"],
        ["b-1"],
        ["c-1"],
    ]
    assert [b.seq for b in batches] == sorted(b.seq for b in batches)
    stamps = [b.accepted_at_ms for b in batches]
    assert all(s is not None and before <= s <= after for s in stamps)
    # After a cursor, and at most `limit`.
    assert [b.seq for b in read_batches(conn, batches[0].seq, limit=1)] == [batches[1].seq]
    assert read_batches(conn, batches[-1].seq) == []
    # By path too.
    assert read_batches(spool_path(Paths(spool.database.parent.parent)), 0) == batches


def test_a_consumers_position_is_durable_and_only_moves_forward(
    paths: Paths, conn: sqlite3.Connection
) -> None:
    assert consumer_position(conn, "stream") is None
    assert register_consumer(conn, "stream") == 0
    commit_consumer(conn, "stream", 7)
    commit_consumer(conn, "stream", 3)  # a late, smaller commit changes nothing
    assert register_consumer(conn, "stream") == 7  # registering again keeps the position

    other = connect(spool_path(paths))  # another process, or after a restart
    assert consumer_position(other, "stream") == 7
    with pytest.raises(KeyError, match="register"):
        commit_consumer(other, "nobody", 1)
    with pytest.raises(ValueError, match="name"):
        register_consumer(other, "")


def test_compaction_leaves_what_a_consumer_has_not_processed(
    spool: Spool, paths: Paths, conn: sqlite3.Connection
) -> None:
    register_consumer(conn, "stream")
    spool.add([row("j-1")], "lab-a")
    spool.add([row("j-2")], "lab-a")
    spool.add([row("j-3")], "lab-a")
    _, second, third = read_batches(conn, 0)

    assert compact(paths).records == 0  # nothing processed yet: nothing moves
    assert len(read_batches(conn, 0)) == 3

    commit_consumer(conn, "stream", second.seq)
    assert compact(paths).records == 2
    assert [b.seq for b in read_batches(conn, 0)] == [third.seq]
    assert _landed_jobs(paths) == {"j-1", "j-2"}

    # Two consumers: the slower one holds compaction back.
    register_consumer(conn, "audit-copy")
    commit_consumer(conn, "stream", third.seq)
    assert compact(paths).records == 0
    assert unregister_consumer(conn, "audit-copy")
    assert not unregister_consumer(conn, "audit-copy")
    assert compact(paths).records == 1
    assert read_batches(conn, 0) == []
    assert _landed_jobs(paths) == {"j-1", "j-2", "j-3"}


def test_a_consumer_silent_past_the_timeout_no_longer_holds_compaction_back(
    spool: Spool, paths: Paths, conn: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    register_consumer(conn, "stream")
    spool.add([row("j-1")], "lab-a")
    assert compact(paths).records == 0
    long_ago = int((time.time() - CONSUMER_TIMEOUT.total_seconds() - 60) * 1000)
    with conn:
        conn.execute("UPDATE consumers SET updated_at_ms = ? WHERE name = 'stream'", (long_ago,))
    assert compact(paths).records == 1
    assert "has not moved" in caplog.text and "'stream'" in caplog.text
    # Its heartbeat (a commit at the same position) makes it live again.
    spool.add([row("j-2")], "lab-a")
    commit_consumer(conn, "stream", 0)
    assert compact(paths).records == 0


def test_without_consumers_compaction_moves_everything(
    spool: Spool, paths: Paths, conn: sqlite3.Connection
) -> None:
    spool.add([row("j-1"), row("j-2")], "lab-a")
    spool.add([row("j-3")], "gateway", any_key=True)
    assert compact(paths).records == 3
    assert read_batches(conn, 0) == []


def test_a_spool_without_commit_times_is_migrated(paths: Paths) -> None:
    database = spool_path(paths)
    database.parent.mkdir(parents=True)
    old = sqlite3.connect(database)
    old.executescript(
        """CREATE TABLE identities (tenant TEXT NOT NULL, job_id TEXT NOT NULL,
               status TEXT NOT NULL, accepted_at INTEGER NOT NULL,
               PRIMARY KEY (tenant, job_id, status)) WITHOUT ROWID;
           CREATE TABLE batches (seq INTEGER PRIMARY KEY AUTOINCREMENT, records TEXT NOT NULL,
               tenant TEXT);"""
    )
    old.execute("INSERT INTO batches (records, tenant) VALUES (?, 'lab-a')", (row("old-1").text,))
    old.commit()
    old.close()

    Spool(database).add([row("new-1")], "lab-a")
    conn = connect(database)
    old_batch, new_batch = read_batches(conn, 0)
    assert old_batch.accepted_at_ms is None and new_batch.accepted_at_ms is not None
    assert compact(paths).records == 2


def test_batch_table_reports_and_leaves_out_what_is_not_a_record() -> None:
    texts = [row("j-1").text, '{"not": "a record"}', "{truncated", row("j-2").text]
    table, bad = batch_table(texts)
    assert table["job_id"].to_pylist() == ["j-1", "j-2"]
    assert [index for index, _ in bad] == [1, 2]
    assert all(reason for _, reason in bad)
    # The canonical fast path gives the same table.
    fast, none = batch_table([texts[0], texts[3]])
    assert none == [] and fast.equals(table)


def test_compaction_keeps_a_damaged_batch_in_the_spool(
    spool: Spool, paths: Paths, conn: sqlite3.Connection
) -> None:
    spool.add([row("j-1")], "lab-a")
    with conn:  # damage it, as a disk error or a hand edit could
        conn.execute("UPDATE batches SET records = records || char(10) || '{oops'")
    with pytest.raises(ValueError, match="not valid"):
        compact(paths)
    assert len(read_batches(conn, 0)) == 1
