"""The collector's durable spool: accepted records in SQLite, deduplicated on (job_id, status).

A record the collector acknowledges is committed here first (WAL journal,
``synchronous=FULL``: the commit is fsynced), so an answer of 200 survives a crash of the
process or the machine. The unique key ``(job_id, status)`` makes acceptance idempotent
across requests, restarts and collector processes: ``INSERT OR IGNORE`` keeps the first
copy, and the number of rows it inserted tells accepted records from duplicates.

Rows are numbered in commit order (``seq``, never reused). `compact` stages the rows
past the watermark into the hourly landing area with `stage_landing`, and only then moves
the watermark. A crash between the two stages them again next time; ``compact_hour``
drops the second copy, since it keeps the first record per (job_id, status) across the
raw partition and every landing file. Compacted rows stay for ``retention`` (default 7
days) so that a late duplicate is still answered as one; after that `compact` deletes
them, and a duplicate arriving later still lands only once, deduplicated by
``compact_hour`` (a copy of a record falls in the record's own hour).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from filelock import FileLock

from qabuse_dagster.ingest.partitions import records_to_table, stage_landing
from qabuse_dagster.ingest.wire import SpoolRow, spool_rows_to_table
from qabuse_dagster.settings import Paths
from qabuse_dagster.telemetry.contract import validate_record

logger = logging.getLogger(__name__)

#: Records staged per landing write by `compact`: bounds its memory.
COMPACT_BATCH = 50_000
#: How long a connection waits for another writer (the collector, a compaction) to finish.
BUSY_TIMEOUT_MS = 30_000
#: How long compacted rows are kept to answer late duplicates as duplicates.
DEFAULT_RETENTION = timedelta(days=7)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS spool (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        status TEXT NOT NULL,
        record TEXT NOT NULL,
        accepted_at INTEGER NOT NULL,
        UNIQUE (job_id, status)
    )""",
    """CREATE TABLE IF NOT EXISTS watermark (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        compacted_through INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO watermark (id, compacted_through) VALUES (1, 0)",
)
# The first spool layout (a "records" table with a compacted flag per row): its rows are
# moved over as uncompacted; staging some of them twice is harmless (see above).
_MIGRATE_V1 = (
    """INSERT OR IGNORE INTO spool (job_id, status, record, accepted_at)
        SELECT job_id, status, record, CAST(strftime('%s', 'now') AS INTEGER)
        FROM records ORDER BY rowid""",
    "DROP TABLE records",
)


def spool_path(paths: Paths) -> Path:
    """The collector's SQLite database: ``$QABUSE_HOME/collector/spool.sqlite``."""
    return paths.home / "collector" / "spool.sqlite"


def connect(database: Path) -> sqlite3.Connection:
    """Open (creating if needed) the spool database with durable settings."""
    database.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    conn = sqlite3.connect(
        database, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is fsynced before it returns, so an acknowledged record survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # 64 MiB of page cache: the (job_id, status) index is probed in random order.
    conn.execute("PRAGMA cache_size=-65536")
    with transaction(conn):
        for statement in _SCHEMA:
            conn.execute(statement)
        old = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'"
        if conn.execute(old).fetchone():
            for statement in _MIGRATE_V1:
                conn.execute(statement)
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (the write lock, waiting up to the busy timeout) ... ``COMMIT``."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@dataclass(frozen=True)
class Stored:
    """What one `Spool.add` did."""

    accepted: int
    duplicates: int


class Spool:
    """The spool of one collector process; `add` is safe to call from any thread."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self._conn = connect(database)
        self._lock = threading.Lock()

    def add(self, rows: Sequence[SpoolRow]) -> Stored:
        """Commit ``rows`` (durably) in one transaction, skipping known identities."""
        if not rows:
            return Stored(0, 0)
        now = int(time.time())
        with self._lock, transaction(self._conn):
            cursor = self._conn.executemany(
                "INSERT OR IGNORE INTO spool (job_id, status, record, accepted_at)"
                f" VALUES (?, ?, ?, {now})",
                rows,
            )
            inserted = cursor.rowcount
        return Stored(accepted=inserted, duplicates=len(rows) - inserted)

    def ping(self) -> None:
        """Raise if the database cannot be read."""
        with self._lock:
            self._conn.execute("SELECT compacted_through FROM watermark").fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass(frozen=True)
class CompactReport:
    """What one `compact` run did."""

    records: int
    landing_files: list[Path]
    expired: int = 0


def compact(
    paths: Paths, *, batch: int = COMPACT_BATCH, retention: timedelta = DEFAULT_RETENTION
) -> CompactReport:
    """Stage every spool record past the watermark into the landing area, then move it.

    Then delete compacted rows accepted more than ``retention`` ago. Safe to run beside
    live collectors (SQLite serialises the writers). Compactions run one at a time, across
    threads and processes alike (a file lock beside the database): a second waits for the
    first, then finds only what arrived since.
    """
    database = spool_path(paths)
    if not database.exists():
        return CompactReport(0, [])
    with FileLock(database.with_suffix(".compact.lock")):
        return _compact(database, paths, batch, retention)


def _compact(database: Path, paths: Paths, batch: int, retention: timedelta) -> CompactReport:
    total, written = 0, []
    conn = connect(database)
    try:
        while True:
            (through,) = conn.execute("SELECT compacted_through FROM watermark").fetchone()
            rows = conn.execute(
                "SELECT seq, record FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
                (through, batch),
            ).fetchall()
            if not rows:
                break
            # The stored JSON was validated on the way in and is canonical: one C decode
            # of the batch builds the table. Text that is not (written by an older
            # version) is validated record by record instead.
            texts = [text for _, text in rows]
            table = spool_rows_to_table(texts)
            if table is None:
                table = records_to_table([validate_record(json.loads(t)) for t in texts])
            written += stage_landing(table, paths.landing)
            with transaction(conn):
                conn.execute("UPDATE watermark SET compacted_through = ?", (rows[-1][0],))
            total += len(rows)
        cutoff = int(time.time() - retention.total_seconds())
        with transaction(conn):
            expired = conn.execute(
                "DELETE FROM spool WHERE seq <= (SELECT compacted_through FROM watermark)"
                " AND accepted_at < ?",
                (cutoff,),
            ).rowcount
    finally:
        conn.close()
    if total or expired:
        logger.info(
            "compacted %d collector records into %d landing files; %d expired from the spool",
            total,
            len(written),
            expired,
        )
    return CompactReport(total, written, expired)
