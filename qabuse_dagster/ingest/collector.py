"""The telemetry collector: ``POST /v1/telemetry`` over HTTP, as `HttpSink` expects it.

A request carries a JSON array of contract records, or NDJSON (``Content-Type:
application/x-ndjson``, one record per line), with ``Authorization: Bearer <token>``.
Answers:

* **200** ``{"accepted": n, "duplicates": n, "rejected": [{"index": i, "errors": [[field,
  message], ...]}]}``. ``index`` is the record's 0-based position in the array, or its
  0-based line number in NDJSON. Accepted records are committed to the spool (see
  `qabuse_dagster.ingest.spool`) before the answer is sent; a record whose (job_id, status)
  was ever accepted before counts as a duplicate; rejected records go to the quarantine
  with their reasons, in the format ``qabuse ingest`` writes. Valid records of a batch are
  kept whatever else the batch holds.
* **400** the body as a whole is unreadable: not UTF-8, not JSON (with the position), not
  an array, nested too deeply. In NDJSON such a line is one rejected record instead.
* **401** missing or unknown bearer token. **413** body over ``max_body_bytes``.
  **415** another content type. **429** the token's rate is spent; ``Retry-After`` says how
  many seconds to wait.

Run it with ``qabuse collector`` (tokens from ``QABUSE_COLLECTOR_TOKENS``, ``name:token``
pairs separated by commas), or `serve`. The spool is compacted into the landing area every
few seconds while it runs.
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
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from qabuse_dagster.ingest.files import (
    INT64_MAX,
    MAX_LINE_BYTES,
    Rejection,
    _beyond_int64,
    parse_line,
)
from qabuse_dagster.ingest.spool import BUSY_TIMEOUT_MS, Spool, compact, spool_path, transaction
from qabuse_dagster.ingest.wire import (
    SpoolRow,
    array_to_spool_rows,
    split_array,
    spool_row_of,
    to_spool_row,
)
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
_SCHEMA_FILE = (
    Path(__file__).resolve().parent.parent / "telemetry/schemas/telemetry-record.v1.schema.json"
)


class RejectedRecord(BaseModel):
    """One record the contract refused."""

    index: int
    errors: list[tuple[str, str]]


class TelemetryAnswer(BaseModel):
    """The answer to a batch that was read."""

    accepted: int
    duplicates: int
    rejected: list[RejectedRecord]


class ErrorAnswer(BaseModel):
    """Why a request was refused as a whole."""

    detail: str


def parse_tokens(text: str) -> dict[str, str]:
    """``name:token,name:token`` (from `TOKENS_ENV`) as token -> client name.

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
            raise ValueError(f"{TOKENS_ENV}: expected name:token, got an entry {entry[:20]!r}...")
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
        database.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            database, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=OFF")
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


class Quarantine:
    """Rejected records of this collector process, appended to one file per UTC day."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._day = ""
        self._file: IO[str] | None = None
        self._started = datetime.now(UTC).strftime("%H%M%S%f")

    def write(self, rejections: Iterable[Rejection]) -> None:
        lines = "".join(json.dumps(r.__dict__) + "\n" for r in rejections)
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
            self._file.write(lines)
            self._file.flush()
            # Durable before the answer names the rejections, as accepted records are.
            os.fsync(self._file.fileno())

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class _Outcome:
    rows: list[SpoolRow]
    rejected: list[RejectedRecord]
    rejections: list[Rejection]

    def reject(self, index: int, why: ContractViolation, shown: str, source: str) -> None:
        self.rejected.append(RejectedRecord(index=index, errors=why.errors))
        self.rejections.append(Rejection(source, index + 1, str(why), shown))


class BodyError(ValueError):
    """The body as a whole cannot be read as a batch (answered 400)."""


def _check(obj: object) -> TelemetryRecord:
    """`validate_record`, plus the int64 limit that ``qabuse ingest`` applies."""
    record = validate_record(obj)
    too_large = _beyond_int64(record)
    if too_large:
        raise ContractViolation(
            [(name, f"exceeds the largest storable integer {INT64_MAX}") for name in too_large]
        )
    return record


def _shown(obj: object) -> str:
    try:
        text = json.dumps(obj, ensure_ascii=False)
    except (TypeError, ValueError):  # an int too long to print
        text = repr(type(obj))
    return text[:MAX_LINE_BYTES]


def read_array(body: bytes, source: str) -> _Outcome:
    """Validate a JSON-array body record by record.

    Each element goes through the wire fast path (`qabuse_dagster.ingest.wire`) and, if
    that declines it, through the contract's validator; the outcome is the validator's.

    Raises:
        BodyError: the body is not UTF-8, not JSON, not an array, or nested too deeply.
    """
    rows = array_to_spool_rows(body)
    if rows is not None:  # the common case: every record valid, in plain form
        return _Outcome(rows, [], [])
    elements = split_array(body)
    if elements is None:
        return _read_array_slowly(body, source)
    outcome = _Outcome([], [], [])
    for index, element in enumerate(elements):
        row = to_spool_row(element)
        if row is not None:
            outcome.rows.append(row)
            continue
        try:
            obj = json.loads(bytes(element).decode("utf-8"))
        except (ValueError, RecursionError):
            # Something only the whole-body reader words (a bad byte, an integer of 5,000
            # digits): let it judge the body, as it would have without the fast path.
            return _read_array_slowly(body, source)
        _judge(obj, index, source, outcome)
    return outcome


def _judge(obj: object, index: int, source: str, outcome: _Outcome) -> None:
    try:
        outcome.rows.append(spool_row_of(_check(obj)))
    except ContractViolation as exc:
        outcome.reject(index, exc, _shown(obj), source)


def _read_array_slowly(body: bytes, source: str) -> _Outcome:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        batch = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BodyError(
            f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})"
        ) from None
    except RecursionError:
        raise BodyError("body is nested too deeply to be telemetry") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise BodyError(f"body is not parseable: {exc}") from None
    if not isinstance(batch, list):
        raise BodyError(
            "body must be a JSON array of records (or NDJSON with Content-Type "
            "application/x-ndjson)"
        )
    outcome = _Outcome([], [], [])
    for index, obj in enumerate(batch):
        _judge(obj, index, source, outcome)
    return outcome


def _check_utf8(raw: bytes) -> None:
    # json.loads guesses UTF-16 and UTF-32 from bytes; the contract's wire format is UTF-8.
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractViolation(
            [("<line>", f"not UTF-8 ({exc.reason} at byte {exc.start})")]
        ) from None


def read_ndjson(body: bytes, source: str) -> _Outcome:
    """Validate an NDJSON body line by line; a bad line is one rejected record."""
    outcome = _Outcome([], [], [])
    for index, raw in enumerate(body.split(b"\n")):
        if not raw.strip():
            continue
        row = to_spool_row(raw) if len(raw) <= MAX_LINE_BYTES else None
        if row is not None:
            outcome.rows.append(row)
            continue
        try:
            _check_utf8(raw)
            outcome.rows.append(spool_row_of(parse_line(raw)))
        except ContractViolation as exc:
            shown = raw[:MAX_LINE_BYTES].decode(errors="replace")
            outcome.reject(index, exc, shown, source)
    return outcome


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
) -> FastAPI:
    """The collector as an ASGI app.

    Args:
        paths: where the spool, the quarantine and the landing area live.
        tokens: accepted bearer tokens -> client name (used in logs and the quarantine).
        max_body_bytes: larger bodies are answered 413.
        rate_per_s: requests per second each token may send, on average.
        burst: requests a token may send at once after a quiet spell.
        compact_every_s: if set, compact the spool into the landing area this often (and
            once at shutdown).
    """
    if not tokens:
        raise ValueError("the collector needs at least one token")
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    secrets_ = [(token.encode("utf-8"), name) for token, name in tokens.items()]
    bucket = TokenBucket(spool_path(paths).with_name("ratelimit.sqlite"), rate_per_s, burst)
    quarantine = Quarantine(paths.quarantine)
    spool = Spool(spool_path(paths))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = None
        if compact_every_s is not None:
            task = asyncio.create_task(_compact_forever(paths, compact_every_s))
        try:
            yield
        finally:
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

    def process(body: bytes, ndjson: bool, source: str) -> TelemetryAnswer:
        outcome = read_ndjson(body, source) if ndjson else read_array(body, source)
        quarantine.write(outcome.rejections)
        stored = spool.add(outcome.rows)
        return TelemetryAnswer(
            accepted=stored.accepted, duplicates=stored.duplicates, rejected=outcome.rejected
        )

    @app.post(
        ENDPOINT,
        response_model=TelemetryAnswer,
        openapi_extra=_request_body_spec(),
        responses={
            400: {"model": ErrorAnswer, "description": "Body unreadable as a whole"},
            401: {"model": ErrorAnswer, "description": "Missing or unknown bearer token"},
            413: {"model": ErrorAnswer, "description": "Body too large"},
            415: {"model": ErrorAnswer, "description": "Unsupported content type"},
            429: {"model": ErrorAnswer, "description": "Rate limited; see Retry-After"},
        },
        summary="Accept a batch of telemetry records",
    )
    async def telemetry(request: Request) -> Any:
        client = client_of(request)
        if client is None:
            return _error(401, "missing or unknown bearer token", {"WWW-Authenticate": "Bearer"})
        wait = await run_in_threadpool(bucket.take, client)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            return _error(
                429, f"rate limit of {rate_per_s:g}/s spent", {"Retry-After": str(seconds)}
            )
        media = request.headers.get("content-type", "application/json").split(";")[0]
        media = media.strip().lower()
        ndjson = media in NDJSON_TYPES
        if not ndjson and media not in ("application/json", ""):
            return _error(415, f"content type {media!r}: send application/json or NDJSON")
        too_large = _error(413, f"body larger than {max_body_bytes} bytes")
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return _error(400, "bad Content-Length")
            if length > max_body_bytes:
                if length <= DRAIN_FACTOR * max_body_bytes:
                    async for _ in request.stream():
                        pass
                return too_large
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
                return too_large
            chunks.append(chunk)
        try:
            answer = await run_in_threadpool(
                process, b"".join(chunks), ndjson, f"collector:{client}"
            )
        except BodyError as exc:
            return _error(400, str(exc))
        if answer.rejected:
            logger.info("%s: %d records rejected", client, len(answer.rejected))
        return answer

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
) -> None:
    """Run the collector with uvicorn until interrupted.

    ``workers`` > 1 runs that many processes on the one port. They share the spool (SQLite
    serialises their commits and deduplicates across them), the rate-limit buckets and
    the compaction (one at a time); each writes its own quarantine file.
    """
    import uvicorn

    options = {
        "home": str(paths.home),
        "tokens": tokens,
        "max_body_bytes": max_body_bytes,
        "rate_per_s": rate_per_s,
        "burst": burst,
        "compact_every_s": compact_every_s,
    }
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if workers == 1:
        uvicorn.run(
            _app_from_options(options), host=host, port=port, log_level="warning", access_log=False
        )
        return
    # Worker processes import the app by name and read their options from the environment.
    os.environ[_OPTIONS_ENV] = json.dumps(options)
    uvicorn.run(
        f"{__name__}:app_from_environment",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
    )


_OPTIONS_ENV = "QABUSE_COLLECTOR_OPTIONS"


def _app_from_options(options: dict[str, Any]) -> FastAPI:
    return create_app(
        Paths(Path(options["home"])),
        options["tokens"],
        max_body_bytes=options["max_body_bytes"],
        rate_per_s=options["rate_per_s"],
        burst=options["burst"],
        compact_every_s=options["compact_every_s"],
    )


def app_from_environment() -> FastAPI:
    """The app of one ``serve(workers=N)`` worker process (uvicorn factory)."""
    return _app_from_options(json.loads(os.environ[_OPTIONS_ENV]))
