"""The collector's durable spool: accepted records in SQLite, deduplicated on (job_id, status).

A record the collector acknowledges is committed here first (WAL journal,
``synchronous=FULL``: the commit is fsynced), so an answer of 200 survives a crash of the
process or the machine. The primary key ``(job_id, status)`` makes acceptance idempotent
across requests and restarts: ``INSERT OR IGNORE`` keeps the first copy, and the number of
rows it inserted tells accepted records from duplicates.

`compact` moves records from the spool to the hourly landing area: it stages them with
`stage_landing` and only then marks them compacted. A crash between the two stages them
again next time; ``compact_hour`` drops the second copy, since it keeps the first record
per (job_id, status) across the raw partition and every landing file. Rows stay in the
table after compaction so that a late duplicate is still recognised.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qabuse_dagster.ingest.partitions import records_to_table, stage_landing
from qabuse_dagster.settings import Paths
from qabuse_dagster.telemetry.contract import TelemetryRecord, record_to_json, validate_record

logger = logging.getLogger(__name__)

#: Records staged per landing write by `compact`: bounds its memory.
COMPACT_BATCH = 50_000
#: How long a connection waits for another writer (the collector, a compaction) to finish.
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    job_id TEXT NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    compacted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, status)
);
CREATE INDEX IF NOT EXISTS pending ON records (compacted) WHERE compacted = 0;
"""


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
    conn.executescript(_SCHEMA)
    return conn


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

    def add(self, records: Sequence[TelemetryRecord]) -> Stored:
        """Commit ``records`` (durably) in one transaction, skipping known identities."""
        if not records:
            return Stored(0, 0)
        rows = [
            (
                r.job_id,
                r.status,
                json.dumps(record_to_json(r), separators=(",", ":"), ensure_ascii=False),
            )
            for r in records
        ]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._conn.executemany(
                    "INSERT OR IGNORE INTO records (job_id, status, record) VALUES (?, ?, ?)",
                    rows,
                )
                inserted = cursor.rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return Stored(accepted=inserted, duplicates=len(rows) - inserted)

    def ping(self) -> None:
        """Raise if the database cannot be read."""
        with self._lock:
            self._conn.execute("SELECT 1 FROM records LIMIT 1").fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass(frozen=True)
class CompactReport:
    """What one `compact` run did."""

    records: int
    landing_files: list[Path]


_compact_lock = threading.Lock()


def compact(paths: Paths, *, batch: int = COMPACT_BATCH) -> CompactReport:
    """Stage every uncompacted spool record into the landing area, then mark it compacted.

    Safe to run beside a live collector (SQLite serialises the writers). Runs in one
    process at a time per interpreter; two processes compacting at once may stage a
    record twice, which ``compact_hour`` deduplicates.
    """
    database = spool_path(paths)
    if not database.exists():
        return CompactReport(0, [])
    total, written = 0, []
    with _compact_lock:
        conn = connect(database)
        try:
            while True:
                rows = conn.execute(
                    "SELECT rowid, record FROM records WHERE compacted = 0 ORDER BY rowid LIMIT ?",
                    (batch,),
                ).fetchall()
                if not rows:
                    break
                # The stored JSON was validated on the way in; validating again rebuilds
                # the typed record that records_to_table wants.
                records = [validate_record(json.loads(text)) for _, text in rows]
                written += stage_landing(records_to_table(records), paths.landing)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(
                        "UPDATE records SET compacted = 1 WHERE rowid = ?",
                        [(rowid,) for rowid, _ in rows],
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                total += len(rows)
        finally:
            conn.close()
    if total:
        logger.info("compacted %d collector records into %d landing files", total, len(written))
    return CompactReport(total, written)
