"""Connection limits for the collector's uvicorn: deadlines for slow clients, a connection cap.

uvicorn bounds neither the time a client may take over its request line and headers nor
over its body, and it holds every connection it accepts. A few hundred clients that send
half a request and wait use up the process's file descriptors; the collector can then
accept no valid client and open none of the files compaction writes. `LimitedHttpProtocol`
(uvicorn's httptools protocol, passed as ``http=``) adds:

* a **header deadline**, armed when a connection opens or goes idle between requests and
  not moved by the bytes that arrive: a client trickling its header a byte a second is
  answered 408 and closed when it passes;
* a **body deadline**, armed once the headers are in, until the body is: a stalled upload
  is answered 408 and closed (the app sees the client gone);
* a **cap on open connections** per process, RLIMIT_NOFILE less a reserve of descriptors
  for the spool, SQLite, compaction and the quarantine. A connection over the cap sheds
  the one that has made the least progress, the oldest still waiting for its headers
  (closed, with a 503 if the socket takes it), rather than the newcomer, so a valid client
  that connects during a flood is served. Room is made when uvicorn builds the new
  connection's protocol, right after ``accept``; the descriptors of the shed connections
  are freed at the event loop's next turn, so one turn's burst of accepts may overshoot
  the cap by as many connections as the listen queue holds: `LISTEN_BACKLOG` keeps that
  within the reserve. Only when every connection is inside a request is the newcomer
  refused (503).

The limits travel with the app: `qabuse_dagster.ingest.collector.create_app` puts a
`ConnectionGuard` into its lifespan state, which uvicorn hands to every protocol it
builds, so each worker process of ``serve(workers=N)`` guards its own connections. A
protocol without a guard in that state behaves as uvicorn's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

try:
    import resource
except ImportError:  # Windows: no RLIMIT_NOFILE to derive the cap from
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: Seconds for a request line and its headers, from connect (or the previous answer).
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: Seconds for a request body, from its headers: 8 MiB at about 280 KB/s.
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Descriptors kept free of connections: the spool and rate-limit databases (with their
#: WAL and shared-memory files), compaction's lock, database and Parquet files, the
#: quarantine, the event loop's own, and the reserve libuv holds for EMFILE.
DEFAULT_FD_RESERVE = 128
#: Connections the kernel queues for accept. The event loop accepts every queued one in a
#: single turn, before the descriptors of the connections shed for them are freed, so the
#: queue must fit in the reserve (uvicorn's default, 2048, would not).
LISTEN_BACKLOG = DEFAULT_FD_RESERVE // 2
#: The cap where RLIMIT_NOFILE is unlimited or unknown.
UNLIMITED_CONNECTIONS = 65_536
#: The key of the `ConnectionGuard` in the app's lifespan state.
GUARD_STATE_KEY = "qabuse_connection_guard"
#: Seconds between warnings about shed and refused connections.
_WARN_EVERY_S = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take, and how many connections a process holds.

    Attributes:
        header_timeout_s: for the request line and headers, in all.
        body_timeout_s: for the body, in all, once the headers are in.
        max_connections: open connections per process; ``None``: RLIMIT_NOFILE less
            ``fd_reserve``, and never more than that.
        fd_reserve: descriptors kept free of connections.
    """

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_connections: int | None = None
    fd_reserve: int = DEFAULT_FD_RESERVE

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("header and body timeouts must be positive")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.fd_reserve < 0:
            raise ValueError("fd_reserve must not be negative")

    def connection_cap(self) -> int:
        """Open connections this process may hold, from its RLIMIT_NOFILE now."""
        room = UNLIMITED_CONNECTIONS
        if resource is not None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft != resource.RLIM_INFINITY:
                room = max(1, soft - self.fd_reserve)
        if self.max_connections is None:
            return room
        if self.max_connections > room:
            logger.warning(
                "max_connections %d is over what %d open files leave after a reserve of %d:"
                " capped at %d",
                self.max_connections,
                room + self.fd_reserve,
                self.fd_reserve,
                room,
            )
        return min(self.max_connections, room)


class ConnectionGuard:
    """The open connections of one server process, and which of them wait for headers.

    Only the event loop's thread calls it (protocol callbacks), so it takes no lock.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.cap = limits.connection_cap()
        # Weak: a protocol whose connection never came up (accept failed) drops out alone.
        self._open: weakref.WeakSet[LimitedHttpProtocol] = weakref.WeakSet()
        # Insertion order is the order they started waiting: the first made least progress.
        self._waiting: dict[LimitedHttpProtocol, None] = {}
        self.shed = 0
        self.refused = 0
        self._warned_at = 0.0
        self._warned = (0, 0)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def admit(self, connection: LimitedHttpProtocol) -> bool:
        """Count a connection just accepted; over the cap, shed another to make room.

        Returns:
            False if nothing could be shed: the caller refuses ``connection``.
        """
        self._open.add(connection)
        if len(self._open) <= self.cap:
            return True
        victim = next(iter(self._waiting), None)
        if victim is None:
            self.refused += 1
            self._warn()
            return False
        self.release(victim)
        victim.shed()
        self.shed += 1
        self._warn()
        return True

    def waiting(self, connection: LimitedHttpProtocol) -> None:
        self._waiting.pop(connection, None)
        self._waiting[connection] = None

    def working(self, connection: LimitedHttpProtocol) -> None:
        self._waiting.pop(connection, None)

    def release(self, connection: LimitedHttpProtocol) -> None:
        self._open.discard(connection)
        self._waiting.pop(connection, None)

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._warned_at < _WARN_EVERY_S:
            return
        logger.warning(
            "over the cap of %d open connections: shed %d waiting for headers, refused %d"
            " since the last warning",
            self.cap,
            self.shed - self._warned[0],
            self.refused - self._warned[1],
        )
        self._warned_at = now
        self._warned = (self.shed, self.refused)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and the cap of a `ConnectionGuard`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        guard = app_state.get(GUARD_STATE_KEY)
        self._guard: ConnectionGuard | None = guard if isinstance(guard, ConnectionGuard) else None
        self._deadline: asyncio.TimerHandle | None = None
        # uvicorn builds the protocol right after accept: the descriptor exists already.
        self._admitted = self._guard.admit(self) if self._guard is not None else True

    # -- connection events -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self._guard is None:
            return
        if not self._admitted:
            self._answer_and_close(503, "too many open connections; retry")
            return
        self._wait_for_headers(self._guard)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._guard is not None:
            self._guard.release(self)
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        if self._guard is not None:
            self._guard.working(self)
            self._arm(self._guard.limits.body_timeout_s, self._body_too_slow)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        if self._guard is not None and self.cycle.response_complete:
            self._idle(self._guard)  # answered before its body was in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if self._guard is not None and cycle.response_complete and not cycle.more_body:
            self._idle(self._guard)

    def shed(self) -> None:
        """Close now (another connection needs the descriptor), with a 503 if it fits."""
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_answer(503, "too many open connections; retry"))
        # abort, not close: close would wait to flush what a stalled client does not read.
        self.transport.abort()

    # -- deadlines -------------------------------------------------------------------------

    def _wait_for_headers(self, guard: ConnectionGuard) -> None:
        guard.waiting(self)
        self._arm(guard.limits.header_timeout_s, self._headers_too_slow)

    def _idle(self, guard: ConnectionGuard) -> None:
        if not self.transport.is_closing():
            self._wait_for_headers(guard)

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            assert self._guard is not None
            seconds = self._guard.limits.header_timeout_s
            self._answer_and_close(408, f"request headers not complete within {seconds:g} s")

    def _body_too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            # Reading is paused on the server's side (the app has not taken what came, or
            # a pipelined request waits its turn): not the client's delay.
            self._arm(1.0, self._body_too_slow)
            return
        assert self._guard is not None
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            seconds = self._guard.limits.body_timeout_s
            self._answer_and_close(408, f"request body not complete within {seconds:g} s")
            # The app, waiting for more body, learns that the client is gone.
            cycle.disconnected = True
            cycle.message_event.set()
        else:
            self.transport.close()

    def _arm(self, seconds: float, expired: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _answer_and_close(self, status: int, detail: str) -> None:
        self.transport.write(_answer(status, detail))
        self.transport.close()


def _answer(status: int, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )
