"""The telemetry collector: ``POST /v1/telemetry`` over HTTP, as `HttpSink` expects it.

A request carries a JSON array of contract records, or NDJSON (``Content-Type:
application/x-ndjson``, one record per line), with ``Authorization: Bearer <token>``.
Answers:

* **200** ``{"accepted": n, "duplicates": n, "rejected": [{"index": i, "errors": [[field,
  message], ...]}], "rejected_total": n, "rejections_truncated": bool, "reasons": [{"reason":
  text, "count": n, "first_index": i}], "not_quarantined": n}``. ``index`` is the record's
  0-based position in the array, or its 0-based line number in NDJSON. Accepted records
  are committed to the spool (see `qabuse_dagster.ingest.spool`) before the answer is
  sent; a record whose (job_id, status) the same tenant sent before counts as a duplicate.
  Valid records of a batch are kept whatever else the batch holds. A valid record is
  rejected all the same when its timestamp lies outside the accepted time range
  (`qabuse_dagster.ingest.time_range`), or when its API key is another tenant's (see
  `qabuse_dagster.ingest.spool`); the error names the field and says why.

  A rejection costs about what the rejected input did, never a multiple of it:
  ``rejected`` details the first `MAX_DETAILED_REJECTIONS` rejected records (at most
  `MAX_ERRORS_SHOWN` errors each, every path and message cut to `MAX_ERROR_CHARS`);
  ``rejected_total`` counts them all and ``rejections_truncated`` says whether some went
  undetailed; ``reasons`` counts rejections by their first error (``"field: message
  (and n more)"``), up to `MAX_REASONS` reasons, then under ``"(other reasons)"``. Each
  rejected record goes to the quarantine as one line in the format ``qabuse ingest``
  writes (``source``, 1-based ``line``, that short ``reason``, and ``raw``: the record's
  text as received, cut to `QUARANTINE_RAW_BYTES`), within two bounds: per request,
  `QUARANTINE_PER_BODY_BYTE` times the body plus `QUARANTINE_SLACK_BYTES`; per token, a
  budget of bytes an hour shared by the worker processes. ``not_quarantined`` counts the
  rejected records left out of the quarantine by either bound (also logged).
* **400** the body as a whole is unreadable: not UTF-8, not JSON (with the position), not
  an array, nested too deeply. In NDJSON such a line is one rejected record instead. An
  integer too long for Python (over 4,300 digits) is no such case: the contract refuses
  its record alone, as it does any integer beyond the largest storable one.
* **401** missing or unknown bearer token; the connection is closed without reading the
  body. **413** body over ``max_body_bytes``, or more than ``max_records`` records (refused
  before any is validated). **415** another content type. **429** the tenant's rate is
  spent, or its budget of rejected records for the minute (`RejectionBudget`);
  ``Retry-After`` says how many seconds to wait.
* **408** and **503**, from the server (`qabuse_dagster.ingest.http_limits`): the request
  line and headers, or the body, took longer than their deadline; or the process holds as
  many connections as its descriptors allow, and none waiting for headers could make
  room. The connection is closed.

Run it with ``qabuse collector`` (tokens from ``QABUSE_COLLECTOR_TOKENS``, ``tenant:token``
pairs separated by commas), or `serve`. The spool is compacted into the landing area every
few seconds while it runs. With a bus (``bus_url``), what the spool accepts is published to
NATS JetStream for sharded stream workers, after the commit, by a `BusPublisher` that
follows the spool with its own cursor (`qabuse_dagster.ingest.bus`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from qabuse_dagster.ingest.bus import BusPublisher
from qabuse_dagster.ingest.files import INT64_MAX, MAX_LINE_BYTES, Rejection, _beyond_int64
from qabuse_dagster.ingest.http_limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    GUARD_STATE_KEY,
    LISTEN_BACKLOG,
    ConnectionGuard,
    ConnectionLimits,
    LimitedHttpProtocol,
)
from qabuse_dagster.ingest.spool import BUSY_TIMEOUT_MS, Spool, compact, spool_path, transaction
from qabuse_dagster.ingest.time_range import AcceptedRange, Bounds
from qabuse_dagster.ingest.wire import (
    SpoolRow,
    array_to_spool_rows,
    decode_json_line,
    load_json,
    split_array,
    spool_row_of,
    to_spool_row,
)
from qabuse_dagster.processes import exit_with_parent
from qabuse_dagster.settings import Paths
from qabuse_dagster.telemetry.contract import ContractViolation, TelemetryRecord, validate_record

logger = logging.getLogger(__name__)

TOKENS_ENV = "QABUSE_COLLECTOR_TOKENS"
ENDPOINT = "/v1/telemetry"
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson")
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
#: A body over the limit is read and discarded up to this many times the limit, so that a
#: client still sending it can read the 413 (a socket closed on unread data resets the
#: connection, and the client would see a reset instead); beyond, the connection is cut.
DRAIN_FACTOR = 4
DEFAULT_RATE_PER_S = 50.0
DEFAULT_BURST = 100
DEFAULT_COMPACT_EVERY_S = 5.0
#: Records one request may hold: valid records are over 200 bytes, so 8 MiB holds fewer
#: than 50,000; 8 MiB of ``{}`` lines would be 2.8 million verdicts to reach.
DEFAULT_MAX_RECORDS = 100_000
#: Rejected records answered in detail; the others are counted (``rejected_total``,
#: ``reasons``).
MAX_DETAILED_REJECTIONS = 100
#: Errors shown per detailed rejection, and characters per field path or message.
MAX_ERRORS_SHOWN = 20
MAX_ERROR_CHARS = 200
#: Distinct reasons counted one by one; the rest are counted under `OTHER_REASONS`.
MAX_REASONS = 100
OTHER_REASONS = "(other reasons)"
#: Quarantine bytes one request may write: this many per body byte, plus the slack. A
#: rejected record's line holds its raw text (JSON-escaped: up to twice as long) and a
#: reason of at most about 250 bytes, so any record-shaped input fits; only junk smaller
#: than a record (``{}``) is cut short.
QUARANTINE_PER_BODY_BYTE = 3
QUARANTINE_SLACK_BYTES = 64 * 1024
#: Bytes of a rejected record's raw text kept in its quarantine line.
QUARANTINE_RAW_BYTES = 8 * 1024
#: Quarantine bytes per token and hour, across the worker processes.
DEFAULT_QUARANTINE_BYTES_PER_HOUR = 64 * 1024 * 1024
#: Rejected records per tenant and minute, across the worker processes: at the slow
#: path's cost of about 30 µs a junk record, about 1.5 s of CPU a minute per tenant.
DEFAULT_REJECTIONS_PER_MINUTE = 50_000
#: Slow-path verdicts remembered per request, for records of at most this many bytes:
#: a body that repeats one bad record pays for one validation.
_VERDICTS_KEPT = 4096
_VERDICT_KEY_BYTES = 1024
_SCHEMA_FILE = (
    Path(__file__).resolve().parent.parent / "telemetry/schemas/telemetry-record.v1.schema.json"
)


class RejectedRecord(BaseModel):
    """One record the contract refused."""

    index: int = Field(description="0-based position in the array, or line in NDJSON")
    errors: list[tuple[str, str]] = Field(
        description=f"(field, message) pairs; the first {MAX_ERRORS_SHOWN} of them"
    )


class RejectionReason(BaseModel):
    """How many records were refused for one reason."""

    reason: str = Field(description='first error, "field: message", and how many more')
    count: int
    first_index: int = Field(description="index of the first record refused for it")


class TelemetryAnswer(BaseModel):
    """The answer to a batch that was read."""

    accepted: int
    duplicates: int
    rejected: list[RejectedRecord] = Field(
        description=f"the first {MAX_DETAILED_REJECTIONS} rejected records, in detail"
    )
    rejected_total: int = Field(0, description="every rejected record")
    rejections_truncated: bool = Field(
        False, description="whether some rejected records are not in `rejected`"
    )
    reasons: list[RejectionReason] = Field(
        default_factory=list, description="rejected records counted by reason"
    )
    not_quarantined: int = Field(
        0, description="rejected records not written to the quarantine: its budget was spent"
    )


class ErrorAnswer(BaseModel):
    """Why a request was refused as a whole."""

    detail: str


def parse_tokens(text: str) -> dict[str, str]:
    """``tenant:token,tenant:token`` (from `TOKENS_ENV`) as token -> tenant.

    Raises:
        ValueError: an entry lacks its name or token, or a token is given twice.
    """
    tokens: dict[str, str] = {}
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, token = entry.partition(":")
        if not sep or not name.strip() or not token.strip():
            raise ValueError(f"{TOKENS_ENV}: expected tenant:token, got an entry {entry[:20]!r}...")
        if token.strip() in tokens:
            raise ValueError(f"{TOKENS_ENV}: the token of {name.strip()!r} is given twice")
        tokens[token.strip()] = name.strip()
    return tokens


class TokenBucket:
    """Requests per second per client: ``rate`` refilled continuously, up to ``burst``.

    The buckets live in SQLite beside the spool, so every collector process serving the
    same spool (``--workers``) draws on the same ones. Not fsynced: a power loss at worst
    hands clients a full bucket again.
    """

    def __init__(self, database: Path, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._conn = _limits_database(database)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS buckets"
            " (client TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL)"
        )
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Spend one request of ``client``; 0 if allowed, else the seconds until one is due."""
        with self._lock, transaction(self._conn):
            now = time.time()
            row = self._conn.execute(
                "SELECT tokens, updated FROM buckets WHERE client = ?", (client,)
            ).fetchone()
            tokens, then = row if row is not None else (float(self.burst), now)
            # max(): a clock stepped back never drains the bucket.
            tokens = min(float(self.burst), tokens + max(0.0, now - then) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._conn.execute(
                "INSERT OR REPLACE INTO buckets (client, tokens, updated) VALUES (?, ?, ?)",
                (client, tokens - 1 if wait == 0 else tokens, now),
            )
        return wait

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _limits_database(database: Path) -> sqlite3.Connection:
    """The SQLite database of per-client limits beside the spool, shared by the workers.

    Not fsynced: a power loss at worst hands clients a fresh allowance again.
    """
    database.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        database, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    return conn


class QuarantineBudget:
    """Quarantine bytes per client and UTC hour, kept beside the rate-limit buckets so that
    every collector process serving the same spool draws on the same budget."""

    def __init__(self, database: Path, bytes_per_hour: int) -> None:
        if bytes_per_hour < 0:
            raise ValueError("the quarantine budget must not be negative")
        self.bytes_per_hour = bytes_per_hour
        self._conn = _limits_database(database)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS quarantine_budget (client TEXT NOT NULL,"
            " hour INTEGER NOT NULL, bytes INTEGER NOT NULL, refused INTEGER NOT NULL,"
            " PRIMARY KEY (client, hour))"
        )
        self._lock = threading.Lock()

    def spend(self, client: str, sizes: Sequence[int]) -> int:
        """Take the lines of ``sizes`` bytes, in order, while they fit ``client``'s hour.

        Returns:
            How many of the first lines fit; the rest are refused (and counted).
        """
        if not sizes:
            return 0
        with self._lock, transaction(self._conn):
            hour = int(time.time() // 3600)
            row = self._conn.execute(
                "SELECT bytes, refused FROM quarantine_budget WHERE client = ? AND hour = ?",
                (client, hour),
            ).fetchone()
            used, refused = row if row is not None else (0, 0)
            kept = 0
            for size in sizes:
                if used + size > self.bytes_per_hour:
                    break
                used += size
                kept += 1
            self._conn.execute(
                "INSERT OR REPLACE INTO quarantine_budget (client, hour, bytes, refused)"
                " VALUES (?, ?, ?, ?)",
                (client, hour, used, refused + len(sizes) - kept),
            )
            self._conn.execute("DELETE FROM quarantine_budget WHERE hour < ?", (hour,))
        if kept < len(sizes) and refused == 0:  # once per client and hour, across workers
            logger.warning(
                "%s: quarantine budget of %d bytes this hour spent; its rejected records are"
                " answered and counted, not quarantined, until the hour is over",
                client,
                self.bytes_per_hour,
            )
        return kept

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class RejectionBudget:
    """Rejected records per client and UTC minute, shared by the collector processes.

    Judging a record the contract refuses costs the slow path (tens of microseconds, against
    about two for a valid record on the fast path), so a client sending junk could spend
    the collector's CPU at will, within every byte and record cap. Past its budget, a
    client's requests are answered 429 until the minute is over; the request that crosses
    it is still answered in full.
    """

    def __init__(self, database: Path, per_minute: int) -> None:
        if per_minute < 1:
            raise ValueError("the rejection budget must be at least 1 a minute")
        self.per_minute = per_minute
        self._conn = _limits_database(database)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS rejection_budget (client TEXT NOT NULL,"
            " minute INTEGER NOT NULL, rejected INTEGER NOT NULL, PRIMARY KEY (client, minute))"
        )
        self._lock = threading.Lock()

    def wait(self, client: str) -> float:
        """0 if ``client`` may send, else the seconds until its budget is renewed."""
        now = time.time()
        minute = int(now // 60)
        with self._lock:
            row = self._conn.execute(
                "SELECT rejected FROM rejection_budget WHERE client = ? AND minute = ?",
                (client, minute),
            ).fetchone()
        if row is None or row[0] < self.per_minute:
            return 0.0
        return (minute + 1) * 60 - now

    def charge(self, client: str, rejected: int) -> None:
        """Count ``rejected`` records against ``client``'s minute."""
        if rejected <= 0:
            return
        minute = int(time.time() // 60)
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "INSERT INTO rejection_budget (client, minute, rejected) VALUES (?, ?, ?)"
                " ON CONFLICT (client, minute)"
                " DO UPDATE SET rejected = rejected + excluded.rejected",
                (client, minute, rejected),
            )
            self._conn.execute("DELETE FROM rejection_budget WHERE minute < ?", (minute,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Quarantine:
    """Rejected records of this collector process, appended to one file per UTC day."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._day = ""
        self._file: IO[str] | None = None
        self._started = datetime.now(UTC).strftime("%H%M%S%f")

    def write(self, lines: Sequence[str]) -> None:
        """Append quarantine lines (each ending in a newline) and fsync them."""
        if not lines:
            return
        with self._lock:
            day = datetime.now(UTC).strftime("%Y%m%d")
            if self._file is None or day != self._day:
                self.close_file()
                self.root.mkdir(parents=True, exist_ok=True)
                # One name per process and day; same line format as `qabuse ingest` writes.
                name = f"rejected-{day}T{self._started}Z-collector-{os.getpid()}.jsonl"
                self._file = (self.root / name).open("a", encoding="utf-8")
                self._day = day
            self._file.write("".join(lines))
            self._file.flush()
            # Durable before the answer names the rejections, as accepted records are.
            os.fsync(self._file.fileno())

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class BodyError(ValueError):
    """The body as a whole cannot be read as a batch (answered 400)."""


class TooManyRecords(ValueError):
    """The body holds more records than one request may (answered 413)."""


def _check(obj: object) -> TelemetryRecord:
    """`validate_record`, plus the int64 limit that ``qabuse ingest`` applies."""
    record = validate_record(obj)
    too_large = _beyond_int64(record)
    if too_large:
        raise ContractViolation(
            [(name, f"exceeds the largest storable integer {INT64_MAX}") for name in too_large]
        )
    return record


def _cut(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_reason(errors: Sequence[tuple[str, str]]) -> str:
    """The first error as ``field: message``, bounded, and how many more there are."""
    if not errors:
        return "<record>: rejected"
    path, message = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{_cut(path)}: {_cut(message)}{more}"


def _shown_errors(errors: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    shown = [(_cut(path), _cut(message)) for path, message in errors[:MAX_ERRORS_SHOWN]]
    if len(errors) > MAX_ERRORS_SHOWN:
        shown.append(("<record>", f"and {len(errors) - MAX_ERRORS_SHOWN} more errors"))
    return shown


def _as_received(record: bytes | object) -> str:
    """A rejected record's text for the quarantine, bounded: its bytes as received, or
    (where the body was only readable as a whole) its decoded value as JSON."""
    if isinstance(record, bytes):
        return record[:QUARANTINE_RAW_BYTES].decode("utf-8", errors="replace")
    try:
        text = json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError):  # an int too long to print
        text = repr(type(record))
    return text[:QUARANTINE_RAW_BYTES]


Verdict = SpoolRow | ContractViolation


@dataclass
class _Batch:
    """The records of one request as they are judged: the rows to store, and the
    rejections as answered (detailed, then counted by reason) and as quarantined (one
    line each, up to the request's quarantine bound), each bounded whatever the body.

    Two batches are equal when their verdicts and answers are: the quarantine lines hold
    the text as received, which a body read only as a whole no longer has.
    """

    source: str
    quarantine_room: int = field(compare=False)
    #: The accepted time range: a valid record outside it is rejected (None: no check).
    bounds: Bounds | None = field(default=None, compare=False)
    rows: list[SpoolRow] = field(default_factory=list)
    #: Each row's index in the request.
    row_indices: list[int] = field(default_factory=list, compare=False)
    rejected: list[RejectedRecord] = field(default_factory=list)
    rejected_total: int = 0
    #: reason -> [count, index of the first record refused for it]
    reasons: dict[str, list[int]] = field(default_factory=dict)
    quarantine_lines: list[str] = field(default_factory=list, compare=False)
    quarantine_sizes: list[int] = field(default_factory=list, compare=False)
    #: Rejected records past the request's quarantine bound.
    unquarantined: int = field(default=0, compare=False)
    _verdicts: dict[bytes, Verdict] = field(default_factory=dict, compare=False, repr=False)

    def judge(self, raw: bytes, slow: Callable[[bytes], Verdict]) -> Verdict:
        """``slow(raw)``, once per distinct short ``raw`` of the request."""
        if len(raw) > _VERDICT_KEY_BYTES:
            return slow(raw)
        verdict = self._verdicts.get(raw)
        if verdict is None:
            verdict = slow(raw)
            if len(self._verdicts) < _VERDICTS_KEPT:
                self._verdicts[raw] = verdict
        return verdict

    def take(self, index: int, verdict: Verdict, record: bytes | object) -> None:
        if isinstance(verdict, ContractViolation):
            self.reject(index, verdict, record)
        else:
            self.keep(index, verdict, record)

    def keep(self, index: int, row: SpoolRow, record: object = None) -> None:
        """Keep a valid record, unless its timestamp lies outside the accepted range.

        ``record``: its bytes as received or its decoded value, for the quarantine
        (default its canonical text).
        """
        outside = self.bounds.reason(row.timestamp) if self.bounds is not None else None
        if outside is not None:
            received = record if record is not None else row.text.encode()
            self.reject(index, ContractViolation([("timestamp", outside)]), received)
            return
        self.rows.append(row)
        self.row_indices.append(index)

    def reject(self, index: int, why: ContractViolation, record: bytes | object) -> None:
        """Count a rejected ``record`` (its bytes as received, or its decoded value)."""
        self.rejected_total += 1
        if len(self.rejected) < MAX_DETAILED_REJECTIONS:
            self.rejected.append(RejectedRecord(index=index, errors=_shown_errors(why.errors)))
        reason = _short_reason(why.errors)
        counted = self.reasons.get(reason)
        if counted is None:
            key = reason if len(self.reasons) < MAX_REASONS else OTHER_REASONS
            counted = self.reasons.setdefault(key, [0, index])
        counted[0] += 1
        if self.quarantine_room <= 0:
            self.unquarantined += 1
            return
        rejection = Rejection(self.source, index + 1, reason, _as_received(record))
        # ASCII, as `qabuse ingest` writes it: a lone surrogate in a value stays escaped.
        line = json.dumps(rejection.__dict__) + "\n"
        size = len(line)
        if size > self.quarantine_room:
            self.quarantine_room = 0
            self.unquarantined += 1
            return
        self.quarantine_room -= size
        self.quarantine_lines.append(line)
        self.quarantine_sizes.append(size)

    def answer(self, accepted: int, duplicates: int, not_quarantined: int) -> TelemetryAnswer:
        reasons = [
            RejectionReason(reason=reason, count=count, first_index=first)
            for reason, (count, first) in self.reasons.items()
            if reason != OTHER_REASONS
        ]
        if OTHER_REASONS in self.reasons:
            count, first = self.reasons[OTHER_REASONS]
            reasons.append(RejectionReason(reason=OTHER_REASONS, count=count, first_index=first))
        return TelemetryAnswer(
            accepted=accepted,
            duplicates=duplicates,
            rejected=self.rejected,
            rejected_total=self.rejected_total,
            rejections_truncated=self.rejected_total > len(self.rejected),
            reasons=reasons,
            not_quarantined=not_quarantined,
        )


def _too_many(count: int, max_records: int) -> TooManyRecords:
    return TooManyRecords(
        f"body holds {count} records, more than the {max_records} records one request may"
        " carry: split it"
    )


def _quarantine_bound(body: bytes) -> int:
    return QUARANTINE_PER_BODY_BYTE * len(body) + QUARANTINE_SLACK_BYTES


def read_array(
    body: bytes,
    source: str,
    *,
    max_records: int = DEFAULT_MAX_RECORDS,
    bounds: Bounds | None = None,
) -> _Batch:
    """Validate a JSON-array body record by record.

    Each element goes through the wire fast path (`qabuse_dagster.ingest.wire`) and, if
    that declines it, through the contract's validator; the outcome is the validator's.
    With ``bounds``, a valid record outside the accepted time range is rejected too.

    Raises:
        BodyError: the body is not UTF-8, not JSON, not an array, or nested too deeply.
        TooManyRecords: the array has more than ``max_records`` elements.
    """
    rows = array_to_spool_rows(body)
    if rows is not None:  # the common case: every record valid, in plain form
        if len(rows) > max_records:
            raise _too_many(len(rows), max_records)
        batch = _Batch(source, _quarantine_bound(body), bounds)
        for index, plain in enumerate(rows):
            batch.keep(index, plain)
        return batch
    elements = split_array(body)
    if elements is None:
        return _read_array_slowly(body, source, max_records=max_records, bounds=bounds)
    if len(elements) > max_records:
        raise _too_many(len(elements), max_records)
    batch = _Batch(source, _quarantine_bound(body), bounds)
    for index, element in enumerate(elements):
        row = to_spool_row(element)
        if row is not None:
            batch.keep(index, row, bytes(element))
            continue
        raw = bytes(element)
        try:
            verdict = batch.judge(raw, _judge_element)
        except (ValueError, RecursionError):
            # Something only the whole-body reader words (a bad byte): let it judge the
            # body, as it would have without the fast path.
            return _read_array_slowly(body, source, max_records=max_records, bounds=bounds)
        batch.take(index, verdict, raw)
    return batch


def _judge_element(raw: bytes) -> Verdict:
    """The contract's verdict on one array element (ValueError: not UTF-8 or not JSON)."""
    return _verdict(load_json(raw.decode("utf-8")))


def _verdict(obj: object) -> Verdict:
    try:
        return spool_row_of(_check(obj))
    except ContractViolation as exc:
        return exc


def _read_array_slowly(
    body: bytes,
    source: str,
    *,
    max_records: int = DEFAULT_MAX_RECORDS,
    bounds: Bounds | None = None,
) -> _Batch:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        records = load_json(text)
    except json.JSONDecodeError as exc:
        raise BodyError(
            f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})"
        ) from None
    except RecursionError:
        raise BodyError("body is nested too deeply to be telemetry") from None
    if not isinstance(records, list):
        raise BodyError(
            "body must be a JSON array of records (or NDJSON with Content-Type "
            "application/x-ndjson)"
        )
    if len(records) > max_records:
        raise _too_many(len(records), max_records)
    batch = _Batch(source, _quarantine_bound(body), bounds)
    for index, obj in enumerate(records):
        batch.take(index, _verdict(obj), obj)
    return batch


def _judge_line(raw: bytes) -> Verdict:
    try:
        return _verdict(decode_json_line(raw, MAX_LINE_BYTES))
    except ContractViolation as exc:
        return exc


def read_ndjson(
    body: bytes,
    source: str,
    *,
    max_records: int = DEFAULT_MAX_RECORDS,
    bounds: Bounds | None = None,
) -> _Batch:
    """Validate an NDJSON body line by line; a bad line is one rejected record.

    With ``bounds``, a valid record outside the accepted time range is rejected too.

    Raises:
        TooManyRecords: more than ``max_records`` lines hold something.
    """
    lines = body.split(b"\n")
    if len(lines) > max_records:
        count = sum(1 for raw in lines if raw.strip())
        if count > max_records:
            raise _too_many(count, max_records)
    batch = _Batch(source, _quarantine_bound(body), bounds)
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        row = to_spool_row(raw) if len(raw) <= MAX_LINE_BYTES else None
        if row is not None:
            batch.keep(index, row, raw)
            continue
        batch.take(index, batch.judge(raw, _judge_line), raw)
    return batch


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _request_body_spec() -> dict[str, Any]:
    try:
        schema = json.loads(_SCHEMA_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # never let the docs break the endpoint
        schema = {"type": "object"}
    for key in ("$schema", "$id"):
        schema.pop(key, None)
    return {
        "requestBody": {
            "required": True,
            "description": "Telemetry records (contract v1): a JSON array, or NDJSON.",
            "content": {
                "application/json": {"schema": {"type": "array", "items": schema}},
                "application/x-ndjson": {
                    "schema": {"type": "string", "description": "one JSON record per line"}
                },
            },
        }
    }


def create_app(
    paths: Paths,
    tokens: dict[str, str],
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    rate_per_s: float = DEFAULT_RATE_PER_S,
    burst: int = DEFAULT_BURST,
    compact_every_s: float | None = None,
    max_records: int = DEFAULT_MAX_RECORDS,
    quarantine_bytes_per_hour: int = DEFAULT_QUARANTINE_BYTES_PER_HOUR,
    rejections_per_minute: int = DEFAULT_REJECTIONS_PER_MINUTE,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    max_connections: int | None = None,
    trusted_tenants: Sequence[str] = (),
    accepted_range: AcceptedRange | None = None,
    bus_url: str | None = None,
    bus_shards: int = 1,
) -> FastAPI:
    """The collector as an ASGI app.

    Args:
        paths: where the spool, the quarantine and the landing area live.
        tokens: accepted bearer tokens -> their tenant. A tenant's records are
            deduplicated among its own, and it may report the API keys it reported
            first (no other tenant had), see `qabuse_dagster.ingest.spool`.
        max_body_bytes: larger bodies are answered 413.
        rate_per_s: requests per second each token may send, on average.
        burst: requests a token may send at once after a quiet spell.
        compact_every_s: if set, compact the spool into the landing area this often (and
            once at shutdown).
        max_records: bodies with more records are answered 413.
        quarantine_bytes_per_hour: quarantine each token may fill per UTC hour, across the
            processes sharing the spool; rejections past it are answered and counted only.
        rejections_per_minute: rejected records a tenant may send per UTC minute, across
            the processes; past it, its requests are answered 429 until the minute ends.
        header_timeout_s: seconds a client has for its request line and headers.
        body_timeout_s: seconds a client has for its body, once the headers are in.
        max_connections: open connections per process (default and ceiling: what
            RLIMIT_NOFILE leaves after a reserve for the collector's files).
        trusted_tenants: tenants trusted with every API key (a provider's own gateway):
            they claim none and are refused none.
        accepted_range: timestamps accepted (default from the settings,
            `qabuse_dagster.ingest.time_range`); a record outside is rejected.
        bus_url: if set, publish the accepted batches to the ingest bus at this NATS URL
            (`qabuse_dagster.ingest.bus`), in ``bus_shards`` shards.

    The last three apply where uvicorn serves the app with
    `qabuse_dagster.ingest.http_limits.LimitedHttpProtocol`, as `serve` does: the app's
    lifespan state carries them to it.
    """
    if not tokens:
        raise ValueError("the collector needs at least one token")
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    if max_records < 1:
        raise ValueError("max_records must be at least 1")
    limits = ConnectionLimits(header_timeout_s, body_timeout_s, max_connections)
    accepted = accepted_range or AcceptedRange.from_settings()
    unknown = set(trusted_tenants) - set(tokens.values())
    if unknown:
        raise ValueError(f"trusted tenants {sorted(unknown)} hold no token")
    trusted = frozenset(trusted_tenants)
    secrets_ = [(token.encode("utf-8"), name) for token, name in tokens.items()]
    limits_database = spool_path(paths).with_name("ratelimit.sqlite")
    bucket = TokenBucket(limits_database, rate_per_s, burst)
    budget = QuarantineBudget(limits_database, quarantine_bytes_per_hour)
    junk = RejectionBudget(limits_database, rejections_per_minute)
    quarantine = Quarantine(paths.quarantine)
    spool = Spool(spool_path(paths))
    publisher = BusPublisher(spool_path(paths), bus_url, shards=bus_shards) if bus_url else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        task = None
        if compact_every_s is not None:
            task = asyncio.create_task(_compact_forever(paths, compact_every_s))
        stop_publishing = asyncio.Event()
        publishing = asyncio.create_task(publisher.run(stop_publishing)) if publisher else None
        guard = ConnectionGuard(limits)
        try:
            yield {GUARD_STATE_KEY: guard}
        finally:
            if publishing is not None:
                stop_publishing.set()
                await publishing
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await asyncio.to_thread(compact, paths)
            quarantine.close_file()
            # The spool and the buckets stay open: an app may be started again (tests do),
            # and what they hold is committed already.

    app = FastAPI(
        title="qabuse telemetry collector",
        version="1",
        description=__doc__,
        lifespan=lifespan,
    )

    def client_of(request: Request) -> str | None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        candidate = given.strip().encode("utf-8", errors="replace")
        found = None
        for token, name in secrets_:  # no early exit: time does not tell which token matched
            if hmac.compare_digest(candidate, token):
                found = name
        return found

    def process(body: bytes, ndjson: bool, tenant: str) -> TelemetryAnswer:
        read = read_ndjson if ndjson else read_array
        batch = read(body, f"collector:{tenant}", max_records=max_records, bounds=accepted.at())
        stored = spool.add(batch.rows, tenant, any_key=tenant in trusted)
        for position, owner in stored.foreign.items():
            row = batch.rows[position]
            why = f"reported by tenant {owner!r}; tenant {tenant!r} may not report this key"
            batch.reject(
                batch.row_indices[position],
                ContractViolation([("api_key_id", why)]),
                row.text.encode(),
            )
        junk.charge(tenant, batch.rejected_total)
        kept = budget.spend(tenant, batch.quarantine_sizes)
        quarantine.write(batch.quarantine_lines[:kept])
        not_quarantined = batch.unquarantined + len(batch.quarantine_lines) - kept
        return batch.answer(stored.accepted, stored.duplicates, not_quarantined)

    @app.post(
        ENDPOINT,
        response_model=TelemetryAnswer,
        openapi_extra=_request_body_spec(),
        responses={
            400: {"model": ErrorAnswer, "description": "Body unreadable as a whole"},
            401: {"model": ErrorAnswer, "description": "Missing or unknown bearer token"},
            408: {"model": ErrorAnswer, "description": "Headers or body too slow; closed"},
            413: {"model": ErrorAnswer, "description": "Body too large, or too many records"},
            415: {"model": ErrorAnswer, "description": "Unsupported content type"},
            429: {"model": ErrorAnswer, "description": "Rate limited; see Retry-After"},
            503: {"model": ErrorAnswer, "description": "Too many open connections; closed"},
        },
        summary="Accept a batch of telemetry records",
    )
    async def telemetry(request: Request) -> Any:
        client = client_of(request)
        if client is None:
            # Closed after the answer: an unknown client's body is never read.
            return _error(
                401,
                "missing or unknown bearer token",
                {"WWW-Authenticate": "Bearer", "Connection": "close"},
            )
        wait = await run_in_threadpool(bucket.take, client)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            return _error(
                429, f"rate limit of {rate_per_s:g}/s spent", {"Retry-After": str(seconds)}
            )
        wait = await run_in_threadpool(junk.wait, client)
        if wait > 0:
            return _error(
                429,
                f"{rejections_per_minute} rejected records this minute: fix the records "
                "before sending more",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        media = request.headers.get("content-type", "application/json").split(";")[0]
        media = media.strip().lower()
        ndjson = media in NDJSON_TYPES
        if not ndjson and media not in ("application/json", ""):
            return _error(415, f"content type {media!r}: send application/json or NDJSON")
        try:
            body = await read_body(request)
        except BodyError as exc:
            return _error(400, str(exc))
        except ClientDisconnect:  # gone, or cut by the server's body deadline
            return _error(408, "request body not received")
        if body is None:
            return _error(413, f"body larger than {max_body_bytes} bytes")
        try:
            answer = await run_in_threadpool(process, body, ndjson, client)
        except BodyError as exc:
            return _error(400, str(exc))
        except TooManyRecords as exc:
            return _error(413, str(exc))
        if publisher is not None and answer.accepted:
            publisher.wake()
        if answer.rejected_total:
            logger.info(
                "%s: %d records rejected (%d not quarantined)",
                client,
                answer.rejected_total,
                answer.not_quarantined,
            )
        return answer

    async def read_body(request: Request) -> bytes | None:
        """The body, or None if it is over ``max_body_bytes`` (then drained, up to a bound).

        Raises:
            BodyError: Content-Length is no number.
            ClientDisconnect: the client went, or the server cut a stalled body.
        """
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise BodyError("bad Content-Length") from None
            if length > max_body_bytes:
                if length <= DRAIN_FACTOR * max_body_bytes:
                    async for _ in request.stream():
                        pass
                return None
        # Content-Length may be absent (chunked) or lie: cap what is kept while reading.
        chunks: list[bytes] = []
        size = 0
        stream = request.stream()
        async for chunk in stream:
            size += len(chunk)
            if size > max_body_bytes:
                async for rest in stream:
                    size += len(rest)
                    if size > DRAIN_FACTOR * max_body_bytes:
                        break
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/healthz", summary="Liveness: the spool database answers; pid of the worker")
    async def healthz() -> dict[str, str]:
        await run_in_threadpool(spool.ping)
        return {"status": "ok", "pid": str(os.getpid())}

    return app


async def _compact_forever(paths: Paths, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(compact, paths)
        except Exception:  # a failed round is retried at the next; the spool keeps the records
            logger.exception("compacting the collector spool failed")


def serve(
    host: str,
    port: int,
    *,
    paths: Paths,
    tokens: dict[str, str],
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    rate_per_s: float = DEFAULT_RATE_PER_S,
    burst: int = DEFAULT_BURST,
    compact_every_s: float = DEFAULT_COMPACT_EVERY_S,
    workers: int = 1,
    max_records: int = DEFAULT_MAX_RECORDS,
    quarantine_bytes_per_hour: int = DEFAULT_QUARANTINE_BYTES_PER_HOUR,
    rejections_per_minute: int = DEFAULT_REJECTIONS_PER_MINUTE,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    max_connections: int | None = None,
    trusted_tenants: Sequence[str] = (),
    bus_url: str | None = None,
    bus_shards: int = 1,
) -> None:
    """Run the collector with uvicorn until interrupted; the options are `create_app`'s.

    ``workers`` > 1 runs that many processes on the one port. They share the spool (SQLite
    serialises their commits and deduplicates across them), the rate-limit buckets, the
    quarantine budgets and the compaction (one at a time); each writes its own quarantine
    file and holds at most ``max_connections`` connections of its own.
    """
    import uvicorn

    options = {
        "home": str(paths.home),
        "tokens": tokens,
        "max_body_bytes": max_body_bytes,
        "rate_per_s": rate_per_s,
        "burst": burst,
        "compact_every_s": compact_every_s,
        "max_records": max_records,
        "quarantine_bytes_per_hour": quarantine_bytes_per_hour,
        "rejections_per_minute": rejections_per_minute,
        "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s,
        "max_connections": max_connections,
        "trusted_tenants": list(trusted_tenants),
        "bus_url": bus_url,
        "bus_shards": bus_shards,
    }
    if workers < 1:
        raise ValueError("workers must be at least 1")
    server: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": "warning",
        "access_log": False,
        # Our protocol: deadlines for slow clients, a cap on connections (http_limits).
        "http": LimitedHttpProtocol,
        "backlog": LISTEN_BACKLOG,
        "ws": "none",  # no WebSocket route; an upgrade would leave the protocol's guard
    }
    if workers == 1:
        uvicorn.run(_app_from_options(options), **server)
        return
    # Worker processes import the app by name and read their options from the environment.
    os.environ[_OPTIONS_ENV] = json.dumps(options)
    uvicorn.run(f"{__name__}:app_from_environment", factory=True, workers=workers, **server)


_OPTIONS_ENV = "QABUSE_COLLECTOR_OPTIONS"


def _app_from_options(options: dict[str, Any]) -> FastAPI:
    return create_app(
        Paths(Path(options["home"])),
        options["tokens"],
        max_body_bytes=options["max_body_bytes"],
        rate_per_s=options["rate_per_s"],
        burst=options["burst"],
        compact_every_s=options["compact_every_s"],
        max_records=options["max_records"],
        quarantine_bytes_per_hour=options["quarantine_bytes_per_hour"],
        rejections_per_minute=options["rejections_per_minute"],
        header_timeout_s=options["header_timeout_s"],
        body_timeout_s=options["body_timeout_s"],
        max_connections=options["max_connections"],
        trusted_tenants=options["trusted_tenants"],
        bus_url=options.get("bus_url"),
        bus_shards=options.get("bus_shards", 1),
    )


def app_from_environment() -> FastAPI:
    """The app of one ``serve(workers=N)`` worker process (uvicorn factory)."""
    # A SIGKILLed supervisor must not leave its workers answering on the port.
    exit_with_parent()
    return _app_from_options(json.loads(os.environ[_OPTIONS_ENV]))
