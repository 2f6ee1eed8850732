"""The collector's durable spool: accepted records in SQLite, deduplicated per tenant.

A record the collector acknowledges is committed here first (WAL journal,
``synchronous=FULL``: the commit is fsynced), so an answer of 200 survives a crash of the
process or the machine. Every record arrives from a *tenant*, the owner of the token that
sent it. Four tables:

* ``identities``: the (tenant, job_id, status) of every record accepted in the last
  ``retention`` (default 7 days), with when. Its primary key makes acceptance idempotent
  across requests, restarts and collector processes: a record whose identity is there is
  a duplicate. Identity is per tenant, so a tenant that sends a guessed ``job_id`` first
  shadows nothing of another tenant's.
* ``batches``: the accepted records of each request, their tenant and when they were
  committed (``accepted_at_ms``, epoch milliseconds; null in batches from before it was
  kept), as canonical JSON lines in one row, numbered in commit order; one row per request
  rather than per record costs a quarter less per record.
* ``key_owners``: which tenant may report each API key. The first tenant to report a key
  owns it; another tenant's records for it are refused (`Stored.foreign`), so no tenant
  can feed records into another's features to get its keys throttled. A tenant trusted
  with every key (a provider's own gateway) claims none and is never refused.
* ``consumers``: readers that tail the batches as they are committed (the stream worker,
  `read_batches`), each with the last ``seq`` it has processed.

`compact` stages the batches into the hourly landing area with `stage_landing`, then
deletes them: only those every registered consumer has processed, so that a consumer never
misses a batch (with no consumer registered, all of them). A consumer that stops for good
holds the landing area back until `unregister_consumer` forgets it. A crash between the
two stages them again next time; ``compact_hour`` drops the second copy, since it keeps
the first record per (job_id, status) across the raw partition and every landing file.
Identities older than ``retention`` are deleted then too; a duplicate arriving later is
accepted again and still lands once, deduplicated by ``compact_hour`` (a copy of a record
falls in the record's own hour).
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
from typing import NamedTuple

import pyarrow as pa
from filelock import FileLock

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from qabuse_dagster.ingest.partitions import records_to_table, stage_landing
from qabuse_dagster.ingest.wire import SpoolRow, spool_rows_to_table
from qabuse_dagster.settings import Paths
from qabuse_dagster.telemetry.contract import ContractViolation, validate_record

logger = logging.getLogger(__name__)

#: Records staged per landing write by `compact`: bounds its memory.
COMPACT_BATCH = 50_000
#: How long a connection waits for another writer (the collector, a compaction) to finish.
BUSY_TIMEOUT_MS = 30_000
#: How long compacted rows are kept to answer late duplicates as duplicates.
DEFAULT_RETENTION = timedelta(days=7)
#: A consumer that has not committed (or sent its heartbeat) for this long is taken for
#: gone: compaction no longer waits for it.
CONSUMER_TIMEOUT = timedelta(hours=1)

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
        tenant TEXT,
        accepted_at_ms INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS key_owners (
        api_key_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        claimed_at INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS consumers (
        name TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
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
# The third layout had batches without their commit time: those read as accepted at null.
_MIGRATE_V3 = ("ALTER TABLE batches ADD COLUMN accepted_at_ms INTEGER",)
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
        if "accepted_at_ms" not in {row[1] for row in conn.execute("PRAGMA table_info(batches)")}:
            for statement in _MIGRATE_V3:
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
        self._turn = _WriterTurn(_writer_lock_of(database))

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
                # The commit time to the millisecond (the stream measures its latency from
                # it), taken under the write lock, just before the commit.
                self._conn.execute(
                    "INSERT INTO batches (records, tenant, accepted_at_ms) VALUES (?, ?, ?)",
                    ("\n".join(r.text for r in new), tenant, time.time_ns() // 1_000_000),
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


class SpoolBatch(NamedTuple):
    """One committed batch, as `read_batches` gives it."""

    seq: int
    #: When it was committed (epoch milliseconds); None for a batch from before that was kept.
    accepted_at_ms: int | None
    #: The records' canonical JSON texts (`SpoolRow.text`), in the order they were accepted.
    records: list[str]


@contextlib.contextmanager
def _connection(conn_or_path: sqlite3.Connection | Path) -> Iterator[sqlite3.Connection]:
    """The connection given, or one opened on the database at the path for the block."""
    if isinstance(conn_or_path, sqlite3.Connection):
        yield conn_or_path
        return
    conn = connect(conn_or_path)
    try:
        yield conn
    finally:
        conn.close()


def read_batches(
    conn_or_path: sqlite3.Connection | Path, after_seq: int, limit: int = 100
) -> list[SpoolBatch]:
    """The batches committed after ``after_seq``, oldest first, at most ``limit`` of them.

    Sequence numbers rise in commit order and are never reused (each writer holds the
    write lock from its insert to its commit), so a reader that keeps the last ``seq`` it
    processed and asks for what follows sees every batch once, in order: a batch of a lower
    number can never commit later. A batch `compact` has deleted is not there any more:
    register a consumer (`register_consumer`) to hold compaction back.

    Args:
        conn_or_path: An open spool connection (`connect`; a reader polling often keeps
            one), or the database file.
        after_seq: The last sequence number already read (0 for the first).
        limit: The most batches returned.
    """
    with _connection(conn_or_path) as conn:
        rows = conn.execute(
            "SELECT seq, accepted_at_ms, records FROM batches WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
    return [SpoolBatch(seq, accepted, records.split("\n")) for seq, accepted, records in rows]


def batch_table(texts: Sequence[str]) -> tuple[pa.Table, list[tuple[int, str]]]:
    """The records of a batch as one table (`TELEMETRY_SCHEMA`), as compaction reads them.

    The stored JSON was validated on the way in and is canonical: one C decode builds the
    table. Text that is not (an older version's) is validated record by record instead.

    Returns:
        The table of the valid records, in their order, and for each text that is not a
        valid record (never written by the collector, but a damaged file can hold one) its
        0-based index and why; those are left out of the table.
    """
    table = spool_rows_to_table(texts)
    if table is not None:
        return table, []
    records, bad = [], []
    for i, text in enumerate(texts):
        try:
            records.append(validate_record(json.loads(text)))
        except (ContractViolation, ValueError) as exc:  # JSONDecodeError is a ValueError
            bad.append((i, f"{type(exc).__name__}: {str(exc)[:200]}"))
    return records_to_table(records), bad


def register_consumer(conn: sqlite3.Connection, name: str) -> int:
    """Register the consumer ``name`` (once; again is harmless) and return its position.

    From its registration on, `compact` deletes only the batches it has processed. A new
    consumer starts at 0: it reads every batch still in the spool.
    """
    if not name:
        raise ValueError("a consumer needs a name")
    with transaction(conn):
        conn.execute(
            "INSERT OR IGNORE INTO consumers (name, seq, updated_at_ms) VALUES (?, 0, ?)",
            (name, time.time_ns() // 1_000_000),
        )
        (seq,) = conn.execute("SELECT seq FROM consumers WHERE name = ?", (name,)).fetchone()
    return int(seq)


def consumer_position(conn: sqlite3.Connection, name: str) -> int | None:
    """The last ``seq`` the consumer ``name`` processed; None when it is not registered."""
    row = conn.execute("SELECT seq FROM consumers WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def commit_consumer(conn: sqlite3.Connection, name: str, seq: int) -> None:
    """Record (durably) that the consumer ``name`` has processed every batch up to ``seq``.

    The position only moves forward: a smaller ``seq`` leaves it where it is.

    Raises:
        KeyError: ``name`` is not registered.
    """
    # The collectors' turn at the write lock first: a collector then waits on the file
    # lock, which wakes it as soon as this commit is done, not on SQLite's busy wait.
    turn = _WriterTurn(_writer_lock(conn))
    try:
        with turn, transaction(conn):
            updated = conn.execute(
                "UPDATE consumers SET seq = max(seq, ?), updated_at_ms = ? WHERE name = ?",
                (seq, time.time_ns() // 1_000_000, name),
            ).rowcount
    finally:
        turn.close()
    if not updated:
        raise KeyError(f"no spool consumer named {name!r}: register it first")


def unregister_consumer(conn: sqlite3.Connection, name: str) -> bool:
    """Forget the consumer ``name``, so that compaction no longer waits for it.

    Returns:
        Whether it was registered.
    """
    with transaction(conn):
        return bool(conn.execute("DELETE FROM consumers WHERE name = ?", (name,)).rowcount)


def _writer_lock(conn: sqlite3.Connection) -> Path:
    """The collectors' writer lock file beside the database ``conn`` is open on."""
    return _writer_lock_of(Path(conn.execute("PRAGMA database_list").fetchone()[2]))


def _writer_lock_of(database: Path) -> Path:
    return database.with_name(database.name + ".writer-lock")


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
        # Only what every live consumer has processed: staged and deleted together, so the
        # landing area never holds a batch the spool still holds. A consumer silent for
        # CONSUMER_TIMEOUT is taken for gone (a stream worker that was stopped for good):
        # it no longer holds the landing area back, and it is told so.
        stale_before = int((time.time() - CONSUMER_TIMEOUT.total_seconds()) * 1000)
        for name, seq in conn.execute(
            "SELECT name, seq FROM consumers WHERE updated_at_ms < ?", (stale_before,)
        ).fetchall():
            logger.warning(
                "spool consumer %r has not moved for %s (at batch %d): compacting past it",
                name,
                CONSUMER_TIMEOUT,
                seq,
            )
        (until,) = conn.execute(
            "SELECT min(seq) FROM consumers WHERE updated_at_ms >= ?", (stale_before,)
        ).fetchone()
        if until is None:
            until = conn.execute("SELECT coalesce(max(seq), 0) FROM batches").fetchone()[0]
        else:
            held = conn.execute("SELECT count(*) FROM batches WHERE seq > ?", (until,)).fetchone()
            if held[0]:
                logger.debug("%d spool batches wait for a consumer to process them", held[0])
        pending = deque(
            conn.execute(
                "SELECT seq, tenant FROM batches WHERE seq <= ? ORDER BY seq", (until,)
            ).fetchall()
        )
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
            table, bad = batch_table(texts)
            if bad:  # never dropped here: the batches stay in the spool for a person to see
                raise ValueError(
                    f"spool batches {seqs[0]}..{seqs[-1]}: record {bad[0][0]} is not valid: "
                    f"{bad[0][1]}"
                )
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
