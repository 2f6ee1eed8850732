"""`HttpSink`: records to the collector's ``POST /v1/telemetry``, spooled to disk when it is away.

The collector takes a JSON array of contract records with ``Authorization: Bearer <token>``
and answers 200 with ``{"accepted": n, "duplicates": n, "rejected": [{"index": i, "errors":
[...]}]}``, 413 when the body is too large, 429 (with ``Retry-After``) when rate limited, 401
on a bad token and 5xx on server trouble. How the sink answers each:

* **2xx**: done; records listed in ``rejected`` are logged and counted, never resent.
* **413**: the batch is halved and each half sent again, down to one record; a single
  record that is still too large is counted as rejected.
* **429**: wait ``Retry-After`` (at most ``max_retry_after_s``) and try again.
* **5xx, 408, refused connections, timeouts**: try again after an exponential backoff with
  jitter, ``max_retries`` times; then the batch goes to the **spool**.
* **401, 403 and any other answer**: logged as an error and counted as rejected (a bad
  token would never heal by itself, so those records are not spooled).

The spool is a folder of append-only files ``spool-<ns>-<pid>-<rand>.jsonl``, one batch (a
JSON array) per line, every line fsynced. At the start of each `HttpSink.write` and in
`HttpSink.flush`, spooled batches are replayed oldest file first; a file is deleted only once
all its batches were answered. How far a file was answered is kept, fsynced, in a sidecar
``<file>.acked`` (a byte offset), so a replay cut short (collector gone again, process killed)
resumes at the first unanswered batch. Delivery is **at least once**: a batch answered just
before a crash, before its offset was saved, is sent again; the collector deduplicates on
``(job_id, status)``. Files are locked (``flock``) while written or replayed, so processes
sharing a spool folder never replay a file another is still writing. The spool stops growing
at ``max_spool_bytes``: further batches are counted as ``dropped`` (the oldest records, already
on disk, are kept) and the overflow is logged once.

While the collector is away one `write` costs at most one retry cycle: when the replay at its
start fails, or one of its batches exhausts its retries, the rest of its batches go straight
to the spool.

Example::

    sink = HttpSink("https://collector.example", token, spool_dir="~/.cache/qabuse/spool")
    handle = instrument("qiskit", sink, user_id, api_key_id)
    ...
    handle.uninstrument()
    sink.close()
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import logging
import os
import random
import secrets
import sys
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

if sys.platform != "win32":
    import fcntl

logger = logging.getLogger(__name__)

__all__ = ["HttpSink"]

#: Path the collector takes batches on, appended to the sink's base url.
ENDPOINT = "/v1/telemetry"
_SPOOL_GLOB = "spool-*.jsonl"
_ACKED_SUFFIX = ".acked"


def _lock(file: IO[bytes], *, wait: bool) -> bool:
    """Take an exclusive advisory lock on ``file``; False if another holder has it."""
    if sys.platform == "win32":  # no flock: one process per spool folder there
        return True
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _retry_after_s(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or HTTP-date); None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _Unavailable(Exception):
    """The collector did not answer a batch within its retries."""


class HttpSink:
    """Sends record batches to the collector; spools what it cannot deliver and replays it.

    Safe to share between the emitter thread (`write`) and the user's thread (`flush`,
    `close`): calls are serialised. `write` raises only on programming errors (a closed
    sink, a record that is not JSON-serialisable); every network or disk failure is
    handled, logged and counted.

    Counters (records): ``sent`` delivered by `write`; ``replayed`` delivered from the
    spool; ``rejected`` refused by the collector (invalid, too large, bad token...);
    ``spooled`` written to the spool by `write`; ``dropped`` lost (spool full or unwritable,
    unreadable spool lines); ``duplicates`` the collector reported as already seen (they
    are also in ``sent`` or ``replayed``).

    Args:
        url: Collector base url (``http`` or ``https``); batches go to ``{url}/v1/telemetry``.
        token: Bearer token for the ``Authorization`` header; never logged.
        spool_dir: Folder of the spool; created if missing.
        batch_size: Records per request at most.
        timeout_s: Socket timeout of each connect and read.
        max_retries: Retries after the first attempt before a batch is spooled.
        backoff_s: First backoff; doubled each retry, jittered to 50-100 %.
        max_backoff_s: Cap of one backoff.
        max_retry_after_s: Cap of one ``Retry-After`` wait.
        max_spool_bytes: Spool size past which new batches are dropped.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        spool_dir: str | os.PathLike[str],
        batch_size: int = 500,
        timeout_s: float = 5.0,
        max_retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        max_retry_after_s: float = 30.0,
        max_spool_bytes: int = 256 << 20,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"collector url must be http(s)://host[:port][/path], got {url!r}")
        if batch_size <= 0 or timeout_s <= 0 or max_retries < 0 or max_spool_bytes <= 0:
            raise ValueError(
                "batch_size, timeout_s and max_spool_bytes must be positive, "
                "max_retries not negative"
            )
        if backoff_s < 0 or max_backoff_s < 0 or max_retry_after_s < 0:
            raise ValueError("backoff and wait caps must not be negative")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path.rstrip("/") + ENDPOINT
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self.spool_dir = Path(spool_dir).expanduser()
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.max_spool_bytes = max_spool_bytes

        self.sent = 0
        self.replayed = 0
        self.rejected = 0
        self.spooled = 0
        self.dropped = 0
        self.duplicates = 0

        self._lock = threading.RLock()
        self._closed = False
        self._spool_file: IO[bytes] | None = None
        self._overflow_logged = False
        self._logged_errors: set[str] = set()
        self._random = random.Random()

    @property
    def stats(self) -> dict[str, int]:
        """The counters, by name."""
        return {
            "sent": self.sent,
            "replayed": self.replayed,
            "rejected": self.rejected,
            "spooled": self.spooled,
            "dropped": self.dropped,
            "duplicates": self.duplicates,
        }

    # -- the Sink protocol -------------------------------------------------------------

    def write(self, records: list[dict[str, Any]]) -> None:
        """Replay the spool, then deliver ``records`` in batches, spooling what fails."""
        with self._lock:
            if self._closed:
                raise ValueError("write to a closed HttpSink")
            if not records:
                return
            away = self._has_spool() and not self._replay()
            for start in range(0, len(records), self.batch_size):
                batch = records[start : start + self.batch_size]
                left = batch if away else self._deliver(batch, replay=False)
                if left:
                    self._spool(left)
                    away = True

    def flush(self) -> None:
        """Replay the spool, as far as the collector answers. Never raises for I/O."""
        with self._lock:
            if not self._closed and self._has_spool():
                self._replay()

    def close(self) -> None:
        """Flush, then release the spool file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._close_spool_file()
            self._closed = True

    # -- delivery ----------------------------------------------------------------------

    def _deliver(self, batch: list[dict[str, Any]], *, replay: bool) -> list[dict[str, Any]]:
        """Send ``batch``, halving on 413; return the records left undelivered (a suffix)."""
        try:
            status = self._post(batch, replay=replay)
        except _Unavailable:
            return batch
        if status != 413:
            return []
        if len(batch) == 1:
            self.rejected += 1
            self._log_error("413", "collector refused a single record as too large (413)")
            return []
        mid = len(batch) // 2
        left = self._deliver(batch[:mid], replay=replay)
        if left:
            return left + batch[mid:]
        return self._deliver(batch[mid:], replay=replay)

    def _post(self, batch: list[dict[str, Any]], *, replay: bool) -> int:
        """POST one batch with retries; return the final status, raise `_Unavailable`."""
        body = json.dumps(batch, separators=(",", ":")).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            try:
                status, retry_after, answer = self._request(body)
            except (OSError, http.client.HTTPException) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= status < 300:
                    self._settle(batch, answer, replay=replay)
                    return status
                if status == 413:
                    return status
                if status == 429:
                    reason = "429 rate limited"
                    after = _retry_after_s(retry_after)
                    if after is not None:
                        wait = min(after, self.max_retry_after_s)
                elif status == 408 or 500 <= status < 600:
                    reason = f"HTTP {status}"
                else:
                    self.rejected += len(batch)
                    self._log_error(
                        str(status),
                        f"collector refused a batch with HTTP {status}"
                        + (" (check the token)" if status in (401, 403) else "")
                        + "; its records are counted as rejected",
                    )
                    return status
            if attempt == self.max_retries:
                logger.warning(
                    "collector did not take a batch of %d after %d attempts (%s)",
                    len(batch),
                    attempt + 1,
                    reason,
                )
                break
            if wait is None:
                cap = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                wait = cap * self._random.uniform(0.5, 1.0)
            logger.debug("collector: %s; retrying in %.2f s", reason, wait)
            time.sleep(wait)
        raise _Unavailable

    def _request(self, body: bytes) -> tuple[int, str | None, bytes]:
        """One POST on a fresh connection: (status, Retry-After header, body)."""
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request("POST", self._path, body=body, headers=self._headers)
            response = conn.getresponse()
            return response.status, response.getheader("Retry-After"), response.read()
        finally:
            conn.close()

    def _settle(self, batch: list[dict[str, Any]], answer: bytes, *, replay: bool) -> None:
        """Count a 2xx answer: records it rejected, duplicates, the rest delivered."""
        try:
            parsed = json.loads(answer) if answer else {}
        except ValueError:
            parsed = {}
        if not isinstance(parsed, dict):
            parsed = {}
        refused = parsed.get("rejected")
        refused = refused if isinstance(refused, list) else []
        # The collector details the first rejections only; rejected_total counts them all.
        total = parsed.get("rejected_total")
        counted = total if isinstance(total, int) and total >= len(refused) else len(refused)
        n_refused = min(counted, len(batch))
        if n_refused:
            first = refused[0] if isinstance(refused[0], dict) else {}
            logger.warning(
                "collector rejected %d of %d records (first: index %s: %s)",
                n_refused,
                len(batch),
                first.get("index"),
                first.get("errors"),
            )
        duplicates = parsed.get("duplicates")
        if isinstance(duplicates, int) and duplicates > 0:
            self.duplicates += duplicates
        self.rejected += n_refused
        if replay:
            self.replayed += len(batch) - n_refused
        else:
            self.sent += len(batch) - n_refused
        self._logged_errors.clear()

    def _log_error(self, key: str, message: str) -> None:
        """Log ``message`` as an error once until the collector next takes a batch."""
        if key not in self._logged_errors:
            self._logged_errors.add(key)
            logger.error(message)

    # -- the spool -----------------------------------------------------------------------

    def _spool_paths(self) -> list[Path]:
        return sorted(self.spool_dir.glob(_SPOOL_GLOB))

    def _has_spool(self) -> bool:
        return any(True for _ in self.spool_dir.glob(_SPOOL_GLOB))

    def _spool_bytes(self) -> int:
        total = 0
        for path in self._spool_paths():
            with contextlib.suppress(FileNotFoundError):  # replayed elsewhere meanwhile
                total += path.stat().st_size
        return total

    def _spool(self, batch: list[dict[str, Any]], *, count: bool = True) -> None:
        """Append ``batch`` as one fsynced line; over the size cap (when counting) drop it."""
        line = (json.dumps(batch, separators=(",", ":")) + "\n").encode("utf-8")
        if count and self._spool_bytes() + len(line) > self.max_spool_bytes:
            self.dropped += len(batch)
            if not self._overflow_logged:
                self._overflow_logged = True
                logger.warning(
                    "telemetry spool %s is full (%d bytes max): new records are dropped "
                    "until the collector answers",
                    self.spool_dir,
                    self.max_spool_bytes,
                )
            return
        try:
            file = self._open_spool_file()
            file.write(line)
            file.flush()
            os.fsync(file.fileno())
        except OSError:
            # A half-written line must not be followed by more: start a new file next time.
            self._close_spool_file()
            self.dropped += len(batch)
            logger.warning("could not spool %d telemetry records", len(batch), exc_info=True)
            return
        if count:
            self.spooled += len(batch)

    def _open_spool_file(self) -> IO[bytes]:
        while self._spool_file is None:
            name = f"spool-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
            file = (self.spool_dir / name).open("xb")
            _lock(file, wait=True)
            if os.fstat(file.fileno()).st_nlink == 0:
                # Another process replayed (and deleted) it, still empty, before we locked it.
                file.close()
                continue
            self._spool_file = file
            self._fsync_dir()
        return self._spool_file

    def _close_spool_file(self) -> None:
        if self._spool_file is not None:
            try:
                self._spool_file.close()
            except OSError:
                logger.warning("could not close the telemetry spool file", exc_info=True)
            self._spool_file = None

    def _fsync_dir(self) -> None:
        """Make a new spool file's name durable too (POSIX; best effort)."""
        if sys.platform == "win32":
            return
        try:
            fd = os.open(self.spool_dir, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _replay(self) -> bool:
        """Replay every spool file not locked by another writer; False if one fell short."""
        self._close_spool_file()  # our own file becomes replayable; new spooling starts anew
        for path in self._spool_paths():
            if not self._replay_file(path):
                return False
        self._remove_orphans()
        self._overflow_logged = False
        return True

    def _replay_file(self, path: Path) -> bool:
        acked_path = path.with_name(path.name + _ACKED_SUFFIX)
        try:
            file = path.open("rb")
        except FileNotFoundError:  # another process drained it
            return True
        with file:
            if not _lock(file, wait=False) or os.fstat(file.fileno()).st_nlink == 0:
                return True  # being written or replayed elsewhere, or just deleted
            offset = self._read_acked(acked_path)
            file.seek(offset)
            for raw in file:
                end = offset + len(raw)
                batch = self._parse_line(path, raw)
                if batch:
                    left = self._deliver(batch, replay=True)
                    if len(left) == len(batch):
                        return False
                    if left:  # answered in part (a 413 split): keep the rest, move on
                        self._spool(left, count=False)
                        self._write_acked(acked_path, end)
                        return False
                offset = end
                self._write_acked(acked_path, offset)
            path.unlink()
        acked_path.unlink(missing_ok=True)
        return True

    def _parse_line(self, path: Path, raw: bytes) -> list[dict[str, Any]] | None:
        """A spooled batch, or None (logged) for a torn or corrupt line."""
        if not raw.endswith(b"\n"):
            logger.warning("discarding a torn last line (%d bytes) of %s", len(raw), path)
            return None
        try:
            batch = json.loads(raw)
        except ValueError:
            batch = None
        if not isinstance(batch, list) or not all(isinstance(r, dict) for r in batch):
            logger.warning("discarding an unreadable line (%d bytes) of %s", len(raw), path)
            return None
        return batch

    @staticmethod
    def _read_acked(acked_path: Path) -> int:
        try:
            return max(0, int(acked_path.read_text(encoding="ascii").strip()))
        except (FileNotFoundError, ValueError):
            return 0

    def _write_acked(self, acked_path: Path, offset: int) -> None:
        """Save, atomically and fsynced, how far a spool file was answered."""
        tmp = acked_path.with_name(acked_path.name + ".tmp")
        try:
            with tmp.open("w", encoding="ascii") as file:
                file.write(str(offset))
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, acked_path)
        except OSError:
            # Only costs duplicates: the batches are sent again at the next replay.
            logger.warning("could not save replay progress of %s", acked_path, exc_info=True)

    def _remove_orphans(self) -> None:
        """Delete progress files whose spool file is gone (a crash between the two unlinks)."""
        for pattern in (f"{_SPOOL_GLOB}{_ACKED_SUFFIX}", f"{_SPOOL_GLOB}{_ACKED_SUFFIX}.tmp"):
            for path in self.spool_dir.glob(pattern):
                spool = path.with_name(path.name.split(_ACKED_SUFFIX)[0])
                if not spool.exists():
                    path.unlink(missing_ok=True)
