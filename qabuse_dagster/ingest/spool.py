"""The collector's durable spool: accepted records in SQLite, deduplicated per tenant.

A record the collector acknowledges is committed here first (WAL journal,
``synchronous=FULL``: the commit is fsynced), so an answer of 200 survives a crash of the
process or the machine. Every record arrives from a *tenant*, the owner of the token that
sent it. Three tables:

* ``identities``: the (tenant, job_id, status) of every record accepted in the last
  ``retention`` (default 7 days), with when. Its primary key makes acceptance idempotent
  across requests, restarts and collector processes: a record whose identity is there is
  a duplicate. Identity is per tenant, so a tenant that sends a guessed ``job_id`` first
  shadows nothing of another tenant's.
* ``batches``: the accepted records of each request and their tenant, as canonical JSON
  lines in one row, numbered in commit order; one row per request rather than per record
  costs a quarter less per record.
* ``key_owners``: which tenant may report each API key. The first tenant to report a key
  owns it; another tenant's records for it are refused (`Stored.foreign`), so no tenant
  can feed records into another's features to get its keys throttled. A tenant trusted
  with every key (a provider's own gateway) claims none and is never refused.

`compact` stages the batches into the hourly landing area with `stage_landing`, then
deletes them. A crash between the two stages them again next time; ``compact_hour``
drops the second copy, since it keeps the first record per (job_id, status) across the
raw partition and every landing file. Identities older than ``retention`` are deleted
then too; a duplicate arriving later is accepted again and still lands once,
deduplicated by ``compact_hour`` (a copy of a record falls in the record's own hour).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from filelock import FileLock

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

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
    """CREATE TABLE IF NOT EXISTS identities (
        tenant TEXT NOT NULL,
        job_id TEXT NOT NULL,
        status TEXT NOT NULL,
        accepted_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, job_id, status)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS identities_by_age ON identities (accepted_at)",
    """CREATE TABLE IF NOT EXISTS batches (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        records TEXT NOT NULL,
        tenant TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS key_owners (
        api_key_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        claimed_at INTEGER NOT NULL
    ) WITHOUT ROWID""",
)
#: The tenant of identities accepted before tenants existed: nobody's, so none is shadowed.
LEGACY_TENANT = ""
# The second layout had identities without a tenant, and batches without their tenant.
_MIGRATE_V2 = (
    "ALTER TABLE identities RENAME TO identities_v2",
    "DROP INDEX IF EXISTS identities_by_age",
    _SCHEMA[0],
    _SCHEMA[1],
    f"""INSERT INTO identities (tenant, job_id, status, accepted_at)
        SELECT '{LEGACY_TENANT}', job_id, status, accepted_at FROM identities_v2""",
    "DROP TABLE identities_v2",
    "ALTER TABLE batches ADD COLUMN tenant TEXT",
)
# The first spool layout, a "records" table of one row per record: its rows move over as
# one uncompacted batch (staging some twice is harmless, see above).
_MIGRATE_V1 = (
    f"""INSERT OR IGNORE INTO identities (tenant, job_id, status, accepted_at)
        SELECT '{LEGACY_TENANT}', job_id, status, CAST(strftime('%s', 'now') AS INTEGER)
        FROM records""",
    """INSERT INTO batches (records)
        SELECT group_concat(record, char(10)) FROM (SELECT record FROM records ORDER BY rowid)
        HAVING count(*) > 0""",
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
        columns = {row[1] for row in conn.execute("PRAGMA table_info(identities)")}
        if columns and "tenant" not in columns:
            for statement in _MIGRATE_V2:
                conn.execute(statement)
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
    #: Index in the rows given -> the tenant that owns the row's API key (not stored).
    foreign: dict[int, str] = field(default_factory=dict)


class _WriterTurn:
    """Collector processes take turns at the spool's write lock through an OS file lock.

    SQLite's own wait for a busy database sleeps in steps of up to 100 ms, so a second
    collector process would idle long after the first committed; ``flock`` wakes the next
    writer as soon as the lock is free. Where ``fcntl`` is missing (Windows) SQLite's wait
    alone serialises them.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if fcntl else None

    def __enter__(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # releases the GIL while it waits

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Spool:
    """The spool of one collector process; `add` is safe to call from any thread."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self._conn = connect(database)
        self._lock = threading.Lock()
        self._turn = _WriterTurn(database.with_name(database.name + ".writer-lock"))

    def add(self, rows: Sequence[SpoolRow], tenant: str, *, any_key: bool = False) -> Stored:
        """Commit the new ones of ``rows`` from ``tenant`` (durably) in one transaction.

        Duplicates (an identity ``tenant`` sent before) are counted. Rows for an API key
        that another tenant owns are refused and named in `Stored.foreign`; the keys of
        the others become ``tenant``'s if no one owned them. ``any_key``: a tenant
        trusted with every key, which neither claims nor is refused any.
        """
        if not tenant:
            raise ValueError("a tenant name is required")
        if not rows:
            return Stored(0, 0)
        now = int(time.time())
        insert = (
            "INSERT OR IGNORE INTO identities (tenant, job_id, status, accepted_at)"
            " VALUES (?, ?, ?, ?)"
        )
        with self._lock, self._turn, transaction(self._conn):
            foreign = {} if any_key else self._claim_keys(rows, tenant, now)
            owned = [row for i, row in enumerate(rows) if i not in foreign] if foreign else rows
            self._conn.execute("SAVEPOINT bulk")
            inserted = self._conn.executemany(
                insert, [(tenant, row.job_id, row.status, now) for row in owned]
            ).rowcount
            if inserted == len(owned):  # all new: the common case
                new = owned
            else:  # some known (a retry, a replayed batch): find which, one by one
                self._conn.execute("ROLLBACK TO bulk")
                new = [
                    row
                    for row in owned
                    if self._conn.execute(insert, (tenant, row.job_id, row.status, now)).rowcount
                ]
            self._conn.execute("RELEASE bulk")
            if new:
                self._conn.execute(
                    "INSERT INTO batches (records, tenant) VALUES (?, ?)",
                    ("\n".join(r.text for r in new), tenant),
                )
        return Stored(accepted=len(new), duplicates=len(owned) - len(new), foreign=foreign)

    def _claim_keys(self, rows: Sequence[SpoolRow], tenant: str, now: int) -> dict[int, str]:
        """Claim the unowned keys of ``rows`` for ``tenant``; rows whose key is another's."""
        keys = list({row.api_key_id for row in rows})
        self._conn.executemany(
            "INSERT OR IGNORE INTO key_owners (api_key_id, tenant, claimed_at) VALUES (?, ?, ?)",
            [(key, tenant, now) for key in keys],
        )
        owners: dict[str, str] = {}
        for start in range(0, len(keys), 500):  # SQLite's bound on host parameters
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            owners.update(
                self._conn.execute(
                    f"SELECT api_key_id, tenant FROM key_owners WHERE api_key_id IN ({marks})",
                    chunk,
                ).fetchall()
            )
        return {
            i: owners[row.api_key_id]
            for i, row in enumerate(rows)
            if owners[row.api_key_id] != tenant
        }

    def ping(self) -> None:
        """Raise if the database cannot be read."""
        with self._lock:
            self._conn.execute("SELECT count(*) FROM batches").fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._turn.close()


@dataclass(frozen=True)
class CompactReport:
    """What one `compact` run did."""

    records: int
    landing_files: list[Path]
    #: Identities dropped after the retention.
    expired: int = 0


def compact(
    paths: Paths, *, batch: int = COMPACT_BATCH, retention: timedelta = DEFAULT_RETENTION
) -> CompactReport:
    """Stage every spooled batch into the landing area, then delete it.

    Then forget identities accepted more than ``retention`` ago. Safe to run beside
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
        pending = deque(conn.execute("SELECT seq, tenant FROM batches ORDER BY seq").fetchall())
        while pending:
            # Whole batches of one tenant, up to about `batch` records at a time.
            seqs: list[int] = []
            texts: list[str] = []
            tenant = pending[0][1]
            while pending and len(texts) < batch and pending[0][1] == tenant:
                seq, _ = pending.popleft()
                (records,) = conn.execute(
                    "SELECT records FROM batches WHERE seq = ?", (seq,)
                ).fetchone()
                seqs.append(seq)
                texts += records.split("\n")
            # The stored JSON was validated on the way in and is canonical: one C decode
            # builds the table. Text that is not (an older version's) is validated
            # record by record instead.
            table = spool_rows_to_table(texts)
            if table is None:
                table = records_to_table([validate_record(json.loads(t)) for t in texts])
            written += stage_landing(table, paths.landing, tenant=tenant)
            with transaction(conn):
                conn.executemany("DELETE FROM batches WHERE seq = ?", [(s,) for s in seqs])
            total += len(texts)
        cutoff = int(time.time() - retention.total_seconds())
        with transaction(conn):
            expired = conn.execute(
                "DELETE FROM identities WHERE accepted_at < ?", (cutoff,)
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
