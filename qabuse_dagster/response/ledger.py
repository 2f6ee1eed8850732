"""The decision ledger: append-only, each record chained to the one before by a keyed hash.

Every step that changes a key's access or billing is a :class:`LedgerEntry`; the ledger
gives it the next sequence number (from 1, without gaps) and stores it as a
:class:`LedgerRecord` whose ``hash`` is

    HMAC-SHA256(K, f"{seq}|{prev_hash}|{recorded_at_ms}|".encode() + entry.canonical())

with ``prev_hash`` the previous record's ``hash`` (64 zeros for the first) and ``K``
derived from the deployment's signing key (:func:`qabuse_dagster.settings.signing_key`).
Beside the records a *head* (the number of records, the last hash and time, and a MAC
over them) is updated in the same transaction as every append. :meth:`Ledger.verify` recomputes the
chain and compares it with the head; it tells what it finds as a :class:`LedgerProblem`:

* ``edited``: a record's contents no longer match its hash (the entry, its time, its link);
* ``broken_link``: two intact records that do not chain (``prev_hash`` is not the hash
  of the record before): records from elsewhere spliced in;
* ``missing``: a gap in the sequence numbers: deleted records;
* ``reordered``: a record, or its entry, that verifies at another position (rows swapped
  or renumbered), or a ``recorded_at_ms`` earlier than the record before's;
* ``truncated``: the head vouches for records that are gone, disagrees with the last
  record, or is itself missing or altered (then at seq 0, the head's place);
* ``unreadable``: a row that does not parse as a record.

What this does not catch, without something outside the database: whoever holds the
signing key can rewrite the records and recompute every hash and the head; and whoever
puts back an older copy of the whole database (the records *and* the head, say a
backup) leaves a shorter ledger that verifies. Only an external anchor catches those:
publish :meth:`Ledger.head` somewhere the database's writers cannot rewrite (a log
shipper, a ticket, write-once storage) and compare it later. A moved record is recognised
(``reordered``) when it lands in a gap or on another failing row, as in a swap; one
copied over another while its original stays in place reads as ``edited``.

Two backends share the :class:`Ledger` interface; :func:`open_ledger` picks one from the
URL (default :func:`qabuse_dagster.settings.ledger_url`):

* ``sqlite:///PATH``: :class:`SqliteLedger`, the embedded default. WAL journal,
  ``synchronous=FULL`` (each append is on disk when it returns) and each append in a
  ``BEGIN IMMEDIATE`` transaction, so several processes may append to one file.
* ``postgresql://...``: :class:`PostgresLedger` (psycopg 3). Appends serialise on a row
  lock on the head (``SELECT ... FOR UPDATE``).

A ledger object holds one connection, which a lock lets the threads of a process share
(a gateway appends from a request while its follower reads new records); each process
opens its own.

Example:
    >>> from qabuse_dagster.response.records import LedgerEntry
    >>> with open_ledger("sqlite:///:memory:", key=b"k" * 32) as ledger:
    ...     record = ledger.append(LedgerEntry(60_000, "ab" * 8, "throttle", "system", "0.91"))
    ...     (record.seq, ledger.verify().ok)
    (1, True)
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import hmac
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeGuard

from qabuse_dagster import settings
from qabuse_dagster.response.records import LedgerEntry, LedgerRecord

if TYPE_CHECKING:  # psycopg (libpq) loads only for a PostgreSQL ledger
    import psycopg

__all__ = [
    "GENESIS_HASH",
    "MAX_ENTRY_BYTES",
    "Ledger",
    "LedgerError",
    "LedgerProblem",
    "PostgresLedger",
    "ProblemKind",
    "SqliteLedger",
    "VerifyReport",
    "chain_key",
    "open_ledger",
    "verify_ledger",
]

logger = logging.getLogger(__name__)

#: The ``prev_hash`` of the first record.
GENESIS_HASH = "0" * 64
#: The largest entry accepted, as canonical JSON. An entry is an audit line, not a blob
#: store: bulky evidence belongs elsewhere, referenced from ``params``.
MAX_ENTRY_BYTES = 64 * 1024
# Derives the chain key from the signing key, so that the challenge tokens signed with
# the same secret never share a MAC key with the ledger.
_KEY_CONTEXT = b"qabuse-ledger-v1"
_PAGE_ROWS = 1_000
# Past this many MAC trials, verify stops looking for where failing rows came from and
# calls them edited: a ledger rewritten wholesale should not take hours to report.
_MAX_REORDER_TRIALS = 200_000
# Gap and tail positions considered as a moved record's origin, at most.
_MAX_ORIGIN_SEQS = 10_000
# pg_advisory_xact_lock key: concurrent first opens create the tables once ("qabuse" + 1).
_PG_SCHEMA_LOCK = 0x7161627573650001

ProblemKind = Literal["edited", "broken_link", "missing", "reordered", "truncated", "unreadable"]

# seq_type: SQLite's INTEGER PRIMARY KEY is the rowid (never NULL, never text);
# PostgreSQL's INTEGER would stop at 2**31 records.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS ledger_records (
        seq {seq_type} PRIMARY KEY,
        entry TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        recorded_at_ms BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS ledger_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        n_records BIGINT NOT NULL,
        last_hash TEXT NOT NULL,
        last_recorded_at_ms BIGINT NOT NULL,
        mac TEXT NOT NULL
    )""",
)
# Only into a ledger with no head and no records: a head deleted from a ledger that has
# records must stay missing (verify reports it), not come back vouching for nothing.
_INSERT_GENESIS_HEAD = """INSERT INTO ledger_head
    (id, n_records, last_hash, last_recorded_at_ms, mac)
    SELECT 1, 0, {p}, 0, {p}
    WHERE NOT EXISTS (SELECT 1 FROM ledger_head) AND NOT EXISTS (SELECT 1 FROM ledger_records)"""
_SELECT_HEAD = "SELECT n_records, last_hash, last_recorded_at_ms, mac FROM ledger_head WHERE id = 1"
_SELECT_ROWS = "SELECT seq, entry, prev_hash, hash, recorded_at_ms FROM ledger_records"
_INSERT_RECORD = (
    "INSERT INTO ledger_records (seq, entry, prev_hash, hash, recorded_at_ms) "
    "VALUES ({p}, {p}, {p}, {p}, {p})"
)
_UPDATE_HEAD = (
    "UPDATE ledger_head SET n_records = {p}, last_hash = {p}, last_recorded_at_ms = {p}, "
    "mac = {p} WHERE id = 1"
)

#: A stored record as the database returns it: seq, entry JSON, prev_hash, hash, recorded_at_ms.
RawRow = tuple[Any, ...]
#: The stored head: n_records, last_hash, last_recorded_at_ms, mac.
RawHead = tuple[Any, ...]


class LedgerError(RuntimeError):
    """The ledger cannot be used: it is missing, unreachable, or its head is not trusted."""


@dataclass(frozen=True)
class LedgerProblem:
    """One thing :meth:`Ledger.verify` found wrong.

    Attributes:
        seq: Where: the record's sequence number (the first of a range), or 0 for the head.
        kind: What kind of tampering or damage it looks like.
        message: What is wrong and where, for a person.
    """

    seq: int
    kind: ProblemKind
    message: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.kind}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`Ledger.verify` found.

    Attributes:
        ok: True when the chain and the head are intact.
        count: How many records the ledger holds.
        head_hash: The head's last hash (the last record's where the head is unreadable):
            the value to publish as an external anchor.
        problems: Everything wrong, in seq order; empty when ``ok``.
    """

    ok: bool
    count: int
    head_hash: str
    problems: list[LedgerProblem] = field(default_factory=list)


def chain_key(signing_key: bytes) -> bytes:
    """The MAC key of the chain and the head, derived from the deployment's signing key."""
    return hmac.new(signing_key, _KEY_CONTEXT, hashlib.sha256).digest()


def _record_mac(key: bytes, seq: int, prev_hash: str, recorded_at_ms: int, entry: bytes) -> str:
    message = f"{seq}|{prev_hash}|{recorded_at_ms}|".encode() + entry
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _head_mac(key: bytes, n_records: int, last_hash: str, last_recorded_at_ms: int) -> str:
    # "head|..." can never equal a record's message, which starts with its seq's digits.
    message = f"head|{n_records}|{last_hash}|{last_recorded_at_ms}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _is_hash(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _head_parses(head: RawHead) -> bool:
    return (
        len(head) == 4
        and _is_int(head[0])
        and _is_hash(head[1])
        and _is_int(head[2])
        and isinstance(head[3], str)
    )


@dataclass(frozen=True)
class _Prepared:
    """An entry checked for appending: as it will read back, and the bytes the MAC covers."""

    entry: LedgerEntry
    canonical: bytes


def _prepare(entry: LedgerEntry) -> _Prepared:
    """Check that ``entry`` can be stored and will read back exactly.

    Raises:
        ValueError: Not finite, plain JSON; over :data:`MAX_ENTRY_BYTES`; or it would not
            read back as written.
    """
    if not isinstance(entry, LedgerEntry):
        raise TypeError(f"the ledger records LedgerEntry objects, got {type(entry).__name__}")
    where = f"{entry.action!r} entry at {entry.at_ms}"
    try:
        canonical = entry.canonical()
    except ValueError as exc:
        raise ValueError(f"refusing to record the {where}: {exc}") from None
    if len(canonical) > MAX_ENTRY_BYTES:
        raise ValueError(
            f"refusing to record the {where}: it is {len(canonical)} bytes of JSON, over the "
            f"{MAX_ENTRY_BYTES}-byte limit; keep bulky evidence elsewhere and reference it "
            "from params"
        )
    stored = LedgerEntry.from_dict(json.loads(canonical))
    if stored.canonical() != canonical:
        raise ValueError(f"refusing to record the {where}: it does not read back as written")
    return _Prepared(stored, canonical)


def _parse_row(row: RawRow) -> tuple[LedgerRecord, bytes]:
    """A stored row as a record, and its entry's canonical JSON.

    Raises:
        ValueError: The row does not parse as a record.
    """
    if len(row) != 5:
        raise ValueError(f"expected 5 columns, got {len(row)}")
    seq, text, prev_hash, digest, recorded_at_ms = row
    if not _is_int(seq):
        raise ValueError(f"seq is {seq!r}, not an integer")
    if not _is_hash(prev_hash) or not _is_hash(digest):
        raise ValueError("prev_hash or hash is not 64 lowercase hex digits")
    if not _is_int(recorded_at_ms):
        raise ValueError(f"recorded_at_ms is {recorded_at_ms!r}, not an integer")
    if not isinstance(text, str):
        raise ValueError(f"the entry is {type(text).__name__}, not JSON text")
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError("the entry's JSON nests too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("the entry's JSON is not an object")
    entry = LedgerEntry.from_dict(data)
    return LedgerRecord(seq, entry, prev_hash, digest, recorded_at_ms), entry.canonical()


@dataclass(frozen=True)
class _Failing:
    """A row whose MAC does not verify at its place: edited, or moved from elsewhere."""

    seq: int
    prev_hash: str
    hash: str
    recorded_at_ms: int
    canonical: bytes


def _origin(key: bytes, row: _Failing, slots: Sequence[_Failing], seqs: Sequence[int]) -> str:
    """Where ``row`` (or its entry) verifies instead, in words; empty when nowhere."""
    for slot in slots:
        if slot.seq == row.seq:
            continue
        # The whole record moved here from ``slot.seq``.
        if hmac.compare_digest(
            _record_mac(key, slot.seq, row.prev_hash, row.recorded_at_ms, row.canonical), row.hash
        ):
            return f"the record written as seq {slot.seq}"
        # Only the entry moved: it verifies in the place it was written for.
        if hmac.compare_digest(
            _record_mac(key, slot.seq, slot.prev_hash, slot.recorded_at_ms, row.canonical),
            slot.hash,
        ):
            return f"the entry written as seq {slot.seq}"
    for seq in seqs:
        if hmac.compare_digest(
            _record_mac(key, seq, row.prev_hash, row.recorded_at_ms, row.canonical), row.hash
        ):
            return f"the record written as seq {seq}"
    return ""


def _audit(key: bytes, head: RawHead | None, rows: Iterable[RawRow]) -> VerifyReport:
    """Check every stored row against the chain and the head (the whole of :meth:`verify`)."""
    problems: list[LedgerProblem] = []
    failing: list[_Failing] = []
    gap_seqs: list[int] = []
    count = last_seq = 0
    last_hash = GENESIS_HASH
    # The row before, when it is present and intact: the link and the clock are checked
    # against it only then (a problem there is reported once, where it is).
    before: LedgerRecord | None = None
    before_is_genesis = True
    for row in rows:
        count += 1
        seq = row[0]
        if not _is_int(seq) or seq <= last_seq:
            problems.append(
                LedgerProblem(
                    last_seq,
                    "reordered",
                    f"a row with seq {seq!r} follows seq {last_seq}: seqs must rise by one",
                )
            )
            continue
        if seq > last_seq + 1:
            first, last = last_seq + 1, seq - 1
            span = f"record {first} is" if first == last else f"records {first} to {last} are"
            problems.append(LedgerProblem(first, "missing", f"{span} missing (deleted)"))
            gap_seqs.extend(range(first, min(last, first + _MAX_ORIGIN_SEQS) + 1))
            before, before_is_genesis = None, False
        last_seq = seq
        last_hash = row[3] if _is_hash(row[3]) else ""
        try:
            record, canonical = _parse_row(row)
        except ValueError as exc:
            problems.append(LedgerProblem(seq, "unreadable", f"record {seq} does not parse: {exc}"))
            before, before_is_genesis = None, False
            continue
        expected = _record_mac(key, seq, record.prev_hash, record.recorded_at_ms, canonical)
        if not hmac.compare_digest(expected, record.hash):
            failing.append(
                _Failing(seq, record.prev_hash, record.hash, record.recorded_at_ms, canonical)
            )
            before, before_is_genesis = None, False
            continue
        if before is not None or before_is_genesis:
            link = GENESIS_HASH if before is None else before.hash
            if record.prev_hash != link:
                problems.append(
                    LedgerProblem(
                        seq,
                        "broken_link",
                        f"record {seq} is intact but does not follow record {seq - 1}: "
                        f"its prev_hash {record.prev_hash[:12]} is not {link[:12]}",
                    )
                )
            elif before is not None and record.recorded_at_ms < before.recorded_at_ms:
                problems.append(
                    LedgerProblem(
                        seq,
                        "reordered",
                        f"record {seq} was recorded at {record.recorded_at_ms}, before "
                        f"record {seq - 1} ({before.recorded_at_ms})",
                    )
                )
        before, before_is_genesis = record, False

    head_hash = last_hash
    tail_seqs: list[int] = []
    if head is None:
        problems.append(
            LedgerProblem(
                0, "truncated", "the head is missing: deleted records cannot be ruled out"
            )
        )
    elif not _head_parses(head):
        problems.append(
            LedgerProblem(0, "truncated", "the head does not parse: its count cannot be trusted")
        )
    else:
        n_records, head_hash, head_recorded_at_ms, mac = head
        if not hmac.compare_digest(_head_mac(key, n_records, head_hash, head_recorded_at_ms), mac):
            problems.append(
                LedgerProblem(
                    0,
                    "truncated",
                    f"the head ({n_records} records, hash {head_hash[:12]}) fails its MAC: it "
                    "was altered outside the ledger (or the ledger was written with another "
                    "signing key)",
                )
            )
        elif n_records > last_seq:
            first = last_seq + 1
            span = (
                f"record {first} is"
                if first == n_records
                else f"records {first} to {n_records} are"
            )
            problems.append(
                LedgerProblem(
                    first,
                    "truncated",
                    f"the head vouches for {n_records} records but the ledger ends at seq "
                    f"{last_seq}: {span} gone",
                )
            )
            tail_seqs = list(range(first, min(n_records, first + _MAX_ORIGIN_SEQS) + 1))
        elif n_records < last_seq:
            problems.append(
                LedgerProblem(
                    n_records + 1,
                    "truncated",
                    f"the head vouches for {n_records} records but the ledger holds seqs up to "
                    f"{last_seq}: the head was rolled back, or records were added around the "
                    "ledger",
                )
            )
        elif head_hash != last_hash:
            problems.append(
                LedgerProblem(
                    last_seq,
                    "truncated",
                    f"the head's hash {head_hash[:12]} is not record {last_seq}'s "
                    f"({last_hash[:12]}): the last record was replaced",
                )
            )

    origins = gap_seqs + tail_seqs
    trials = len(failing) * (2 * len(failing) + len(origins))
    if trials > _MAX_REORDER_TRIALS:
        logger.warning(
            "%d records fail their MAC: not looking for where they came from", len(failing)
        )
    for moved in failing:
        origin = "" if trials > _MAX_REORDER_TRIALS else _origin(key, moved, failing, origins)
        if origin:
            problems.append(
                LedgerProblem(moved.seq, "reordered", f"seq {moved.seq} holds {origin}")
            )
        else:
            problems.append(
                LedgerProblem(
                    moved.seq,
                    "edited",
                    f"record {moved.seq} does not match its hash: its entry, time or link was "
                    "changed",
                )
            )
    problems.sort(key=lambda p: p.seq)
    return VerifyReport(not problems, count, head_hash, problems)


class Ledger(abc.ABC):
    """An append-only, hash-chained store of :class:`LedgerEntry`; see the module docstring.

    Subclasses supply the storage (a connection, its transactions and the SQL's
    placeholder); the chain, the checks and :meth:`verify` are the same for all.

    Args:
        key: The signing key the chain's MAC key derives from; default
            :func:`qabuse_dagster.settings.signing_key`.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = chain_key(settings.signing_key() if key is None else key)
        # Re-entrant: verify holds it across its snapshot, whose reads take it again.
        self._lock = threading.RLock()

    # The storage, per backend.

    @abc.abstractmethod
    def _write(self, prepared: Sequence[_Prepared]) -> list[LedgerRecord]:
        """Lock the head, :meth:`_extend` the chain with ``prepared``, store it, commit."""

    @abc.abstractmethod
    def _page(self, after_seq: int, limit: int) -> list[RawRow]:
        """Up to ``limit`` stored rows with seq above ``after_seq``, in seq order."""

    @abc.abstractmethod
    def _read_head(self) -> RawHead | None:
        """The stored head, or None when there is none."""

    @abc.abstractmethod
    def _snapshot(self) -> contextlib.AbstractContextManager[None]:
        """A read transaction: every read inside it sees the same committed state."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Close the connection."""

    # The chain.

    def _genesis_head(self) -> tuple[str, str]:
        """``last_hash`` and ``mac`` of the head of an empty ledger."""
        return GENESIS_HASH, _head_mac(self._key, 0, GENESIS_HASH, 0)

    def _trusted_head(self, head: RawHead | None) -> tuple[int, str, int]:
        """The head's count, last hash and time, once its MAC verifies.

        Raises:
            LedgerError: The head is missing or fails its MAC.
        """
        if head is None:
            raise LedgerError("the ledger has no head: run `qabuse audit verify`")
        if not _head_parses(head):
            raise LedgerError("the ledger's head does not parse: run `qabuse audit verify`")
        n_records, last_hash, last_recorded_at_ms, mac = head
        expected = _head_mac(self._key, n_records, last_hash, last_recorded_at_ms)
        if not hmac.compare_digest(expected, mac):
            raise LedgerError(
                "the ledger's head fails its MAC (altered, or another signing key): run "
                "`qabuse audit verify`"
            )
        return n_records, last_hash, last_recorded_at_ms

    def _extend(
        self, head: RawHead | None, prepared: Sequence[_Prepared]
    ) -> tuple[list[LedgerRecord], list[RawRow], RawHead]:
        """Chain ``prepared`` onto ``head``: the records, their rows and the new head.

        Raises:
            LedgerError: The head is missing or fails its MAC: the ledger is not extended.
        """
        seq, last_hash, last_recorded_at_ms = self._trusted_head(head)
        # Never earlier than the record before, so that a clock stepped back (NTP) does
        # not read as reordering; taken under the lock, so appends are stamped in order.
        now_ms = max(time.time_ns() // 1_000_000, last_recorded_at_ms)
        records: list[LedgerRecord] = []
        rows: list[RawRow] = []
        for item in prepared:
            seq += 1
            digest = _record_mac(self._key, seq, last_hash, now_ms, item.canonical)
            records.append(LedgerRecord(seq, item.entry, last_hash, digest, now_ms))
            rows.append((seq, item.canonical.decode(), last_hash, digest, now_ms))
            last_hash = digest
        new_head = (seq, last_hash, now_ms, _head_mac(self._key, seq, last_hash, now_ms))
        return records, rows, new_head

    # The interface.

    def append(self, entry: LedgerEntry) -> LedgerRecord:
        """Store ``entry`` as the next record; it is durable when this returns.

        Raises:
            ValueError: ``entry`` is not finite, plain JSON, or over :data:`MAX_ENTRY_BYTES`;
                nothing is written.
            LedgerError: The head is missing or fails its MAC; nothing is written.
        """
        return self.append_many([entry])[0]

    def append_many(self, entries: Iterable[LedgerEntry]) -> list[LedgerRecord]:
        """Store ``entries`` as consecutive records, in one transaction: all or none.

        Raises:
            ValueError: An entry is not finite, plain JSON, or is too large; nothing is
                written.
            LedgerError: The head is missing or fails its MAC; nothing is written.
        """
        prepared = [_prepare(entry) for entry in entries]
        if not prepared:
            return []
        with self._lock:
            records = self._write(prepared)
        logger.debug("recorded seqs %d-%d", records[0].seq, records[-1].seq)
        return records

    def _rows(self, since_seq: int) -> Iterator[RawRow]:
        after = since_seq
        while True:
            with self._lock:  # per page: an append waits for a page, not for the caller
                page = self._page(after, _PAGE_ROWS)
            yield from page
            if len(page) < _PAGE_ROWS:
                return
            after = page[-1][0]

    def records(self, since_seq: int = 0) -> Iterator[LedgerRecord]:
        """The records after ``since_seq`` (all by default), in seq order.

        Reads page by page, holding no lock in between: records appended meanwhile appear.
        It does not check the chain: :meth:`verify` does.

        Raises:
            LedgerError: A row does not parse (:meth:`verify` tells more).
        """
        for row in self._rows(since_seq):
            yield self._record(row)

    def get(self, seq: int) -> LedgerRecord | None:
        """The record at ``seq``, or None when there is none.

        Raises:
            LedgerError: The row does not parse.
        """
        with self._lock:
            page = self._page(seq - 1, 1)
        return self._record(page[0]) if page and page[0][0] == seq else None

    @staticmethod
    def _record(row: RawRow) -> LedgerRecord:
        try:
            return _parse_row(row)[0]
        except ValueError as exc:
            raise LedgerError(
                f"record {row[0]} does not parse ({exc}): run `qabuse audit verify`"
            ) from None

    def head(self) -> tuple[int, str]:
        """The number of records and the last record's hash (64 zeros when empty).

        Publish it somewhere the ledger's database cannot reach to anchor the chain.

        Raises:
            LedgerError: The head is missing or fails its MAC.
        """
        with self._lock:
            stored = self._read_head()
        n_records, last_hash, _ = self._trusted_head(stored)
        return n_records, last_hash

    def verify(self) -> VerifyReport:
        """Recompute the whole chain and compare it with the head, in one consistent read.

        Appends from this object's other threads wait until it is done; other processes'
        appends do not, and are not seen.
        """
        with self._lock, self._snapshot():
            report = _audit(self._key, self._read_head(), self._rows(0))
        if not report.ok:
            logger.warning(
                "decision ledger: %d problem(s) in %d records", len(report.problems), report.count
            )
        return report

    def close(self) -> None:
        """Close the connection. The ledger cannot be used afterwards."""
        with self._lock:
            self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class SqliteLedger(Ledger):
    """The embedded ledger: one SQLite file, safe to append to from several processes.

    Args:
        path: The database file (created with its folder unless ``create`` is False), or
            ``:memory:``.
        key: The signing key; default :func:`qabuse_dagster.settings.signing_key`.
        create: Create the file and tables when missing; False raises instead.
        busy_timeout_s: How long an append waits for another process's append.

    Raises:
        LedgerError: ``create`` is False and there is no ledger at ``path``.
    """

    def __init__(
        self,
        path: str | Path,
        key: bytes | None = None,
        *,
        create: bool = True,
        busy_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(key)
        self.path = path if str(path) == ":memory:" else Path(path)
        # isolation_level=None: the transactions below are explicit (BEGIN IMMEDIATE).
        if not create:
            uri = f"{Path(path).resolve().as_uri()}?mode=rw"
            try:
                self._conn = sqlite3.connect(
                    uri,
                    uri=True,
                    isolation_level=None,
                    timeout=busy_timeout_s,
                    check_same_thread=False,  # the lock serialises the threads
                )
            except sqlite3.OperationalError:
                raise LedgerError(f"no ledger at {path}") from None
            if not self._has_tables():
                self._conn.close()
                raise LedgerError(f"{path} holds no decision ledger")
            return
        if isinstance(self.path, Path):
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False
        )
        # WAL: readers never block the appender. FULL: the WAL is fsynced at every commit,
        # so an append that returned survives a power cut (NORMAL would only keep the file
        # consistent).
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._transaction("BEGIN IMMEDIATE"):
            for statement in _SCHEMA:
                self._conn.execute(statement.format(seq_type="INTEGER"))
            self._conn.execute(_INSERT_GENESIS_HEAD.format(p="?"), self._genesis_head())

    def _has_tables(self) -> bool:
        names = {
            name
            for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        return {"ledger_records", "ledger_head"} <= names

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[None]:
        self._conn.execute(begin)
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _write(self, prepared: Sequence[_Prepared]) -> list[LedgerRecord]:
        # IMMEDIATE takes the write lock before reading the head: two processes cannot
        # both read head N and both write N + 1.
        with self._transaction("BEGIN IMMEDIATE"):
            records, rows, head = self._extend(self._read_head(), prepared)
            try:
                self._conn.executemany(_INSERT_RECORD.format(p="?"), rows)
            except sqlite3.IntegrityError:
                raise LedgerError(
                    f"seq {rows[0][0]} already exists: the head is behind the records; run "
                    "`qabuse audit verify`"
                ) from None
            self._conn.execute(_UPDATE_HEAD.format(p="?"), head)
        return records

    def _page(self, after_seq: int, limit: int) -> list[RawRow]:
        query = f"{_SELECT_ROWS} WHERE seq > ? ORDER BY seq LIMIT ?"
        return list(self._conn.execute(query, (after_seq, limit)))

    def _read_head(self) -> RawHead | None:
        row: RawHead | None = self._conn.execute(_SELECT_HEAD).fetchone()
        return row

    def _snapshot(self) -> contextlib.AbstractContextManager[None]:
        # A deferred transaction: in WAL mode its first read pins a snapshot for the rest.
        return self._transaction("BEGIN")

    def _close(self) -> None:
        self._conn.close()


class PostgresLedger(Ledger):
    """The ledger in PostgreSQL: for a deployment with more than one host.

    A connection the server dropped (a restart, a failover) fails the call that finds it
    gone; the next call connects again.

    Args:
        url: A libpq connection URL (``postgresql://user@host:port/dbname``).
        key: The signing key; default :func:`qabuse_dagster.settings.signing_key`.
        create: Create the tables when missing; False raises instead.
        connect_timeout_s: How long to wait for the server.

    Raises:
        LedgerError: The server cannot be reached, or ``create`` is False and the
            database holds no ledger.
    """

    def __init__(
        self,
        url: str,
        key: bytes | None = None,
        *,
        create: bool = True,
        connect_timeout_s: int = 10,
    ) -> None:
        super().__init__(key)
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self._closed = False
        self._conn = self._connect()
        if not create:
            found = self._conn.execute(
                "SELECT to_regclass('ledger_records') IS NOT NULL "
                "AND to_regclass('ledger_head') IS NOT NULL"
            ).fetchone()
            if not (found and found[0]):
                self._conn.close()
                raise LedgerError("the PostgreSQL database holds no decision ledger")
            return
        with self._conn.transaction():
            # CREATE TABLE IF NOT EXISTS races with itself in PostgreSQL.
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                self._conn.execute(statement.format(seq_type="BIGINT"))
            self._conn.execute(_INSERT_GENESIS_HEAD.format(p="%s"), self._genesis_head())

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        try:
            # autocommit: every transaction here is explicit (conn.transaction()).
            return psycopg.connect(
                self._url, autocommit=True, connect_timeout=self._connect_timeout_s
            )
        except psycopg.OperationalError as exc:
            raise LedgerError(f"cannot reach the ledger's PostgreSQL server: {exc}") from None

    def _live(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The connection, made again if the server dropped it."""
        if self._conn.closed and not self._closed:
            logger.warning("the ledger's PostgreSQL connection was lost: connecting again")
            self._conn = self._connect()
        return self._conn

    def _write(self, prepared: Sequence[_Prepared]) -> list[LedgerRecord]:
        import psycopg

        conn = self._live()
        try:
            with conn.transaction():
                # The row lock on the head serialises appends across connections and hosts;
                # under READ COMMITTED a waiter reads the head its predecessor committed.
                head = conn.execute(f"{_SELECT_HEAD} FOR UPDATE").fetchone()
                records, rows, new_head = self._extend(head, prepared)
                with conn.cursor() as cursor:
                    cursor.executemany(_INSERT_RECORD.format(p="%s"), rows)
                conn.execute(_UPDATE_HEAD.format(p="%s"), new_head)
        except psycopg.errors.UniqueViolation:
            raise LedgerError(
                "a record with the next seq already exists: the head is behind the records; "
                "run `qabuse audit verify`"
            ) from None
        return records

    def _page(self, after_seq: int, limit: int) -> list[RawRow]:
        query = f"{_SELECT_ROWS} WHERE seq > %s ORDER BY seq LIMIT %s"
        return self._live().execute(query, (after_seq, limit)).fetchall()

    def _read_head(self) -> RawHead | None:
        return self._live().execute(_SELECT_HEAD).fetchone()

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        conn = self._live()
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield

    def _close(self) -> None:
        self._closed = True
        self._conn.close()


def open_ledger(url: str | None = None, key: bytes | None = None, *, create: bool = True) -> Ledger:
    """The ledger at ``url``: ``sqlite:///PATH`` or ``postgresql://...``.

    Args:
        url: Where it lives; default :func:`qabuse_dagster.settings.ledger_url`. As in
            SQLAlchemy, ``sqlite:///rel/path.db`` is relative and ``sqlite:////abs.db``
            absolute.
        key: The signing key; default :func:`qabuse_dagster.settings.signing_key`.
        create: Create the ledger when missing; False raises :class:`LedgerError` instead.

    Raises:
        ValueError: The URL's scheme is neither.
        LedgerError: The ledger cannot be opened.
    """
    url = settings.ledger_url() if url is None else url
    scheme, sep, rest = url.partition("://")
    if sep and scheme == "sqlite" and rest.startswith("/") and len(rest) > 1:
        return SqliteLedger(rest[1:], key, create=create)
    if sep and scheme.split("+")[0] in ("postgresql", "postgres"):
        # postgresql+psycopg:// (SQLAlchemy's spelling) is the same server to libpq.
        return PostgresLedger(f"postgresql://{rest}", key, create=create)
    raise ValueError(
        f"unsupported ledger URL {url.split('@')[-1]!r}: expected sqlite:///PATH or "
        f"postgresql://... ({settings.LEDGER_URL_ENV})"
    )


def verify_ledger(url: str | None = None, key: bytes | None = None) -> VerifyReport:
    """Verify the existing ledger at ``url`` (default: the deployment's) and close it.

    Raises:
        ValueError: The URL's scheme is neither ``sqlite`` nor ``postgresql``.
        LedgerError: There is no ledger there, or it cannot be reached.
    """
    with open_ledger(url, key, create=False) as ledger:
        return ledger.verify()
