"""Slow and idle clients cannot starve the real collector of connections or file descriptors.

Each test starts ``qabuse collector`` as a subprocess and talks to it over raw sockets:
half-sent requests by the thousand, a header trickled a byte a second, a body that stalls,
an unauthenticated request that announces a large body.
"""

from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from support.collector_server import CollectorServer
from support.records import record_dict

from qabuse_dagster.ingest import collector
from qabuse_dagster.ingest.http_limits import DEFAULT_FD_RESERVE, ConnectionGuard, ConnectionLimits
from qabuse_dagster.ingest.spool import CompactReport
from qabuse_dagster.settings import Paths

pytestmark = pytest.mark.fuzz  # a hostile-input suite: `make fuzz` runs it

H0 = datetime(2026, 3, 2, 13, 0, tzinfo=UTC)
TOKEN = "limits-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: An unauthenticated request cut off in its headers.
HALF_SENT = (
    b"POST /v1/telemetry HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Le"
)
FLOOD = 1100
SERVER_OPEN_FILES = 1024


def recs(n: int, prefix: str) -> list[dict[str, Any]]:
    return [record_dict(f"{prefix}-{i}", H0 + timedelta(seconds=i)) for i in range(n)]


@pytest.fixture
def many_open_files() -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE for the flood's sockets, and restore it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FLOOD + 512
    raised_hard = hard
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:  # root (CI, this machine kind) may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted))
            raised_hard = wanted
        except (ValueError, OSError):
            why = f"the hard open-files limit ({hard}) is below the {wanted} the flood needs"
            if os.environ.get("CI"):
                pytest.fail(why)  # under CI the suite must run, never skip
            pytest.skip(why)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), raised_hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, raised_hard))
    if raised_hard != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Flood:
    """``size`` half-sent unauthenticated requests held open; each the server closes is
    opened again, so the pressure lasts whatever deadlines or shedding the server applies."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.reopened = 0
        self.refused = 0
        self._selector = selectors.DefaultSelector()  # epoll: fds beyond 1024 are fine
        self._stop = threading.Event()
        for _ in range(size):
            self._open()
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self._thread.start()

    def _open(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(HALF_SENT)
        except OSError:
            self.refused += 1
            return
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ)

    def _keep(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                self._selector.unregister(sock)
                sock.close()  # the server answered (408, 503) or closed: open another
                self.reopened += 1
                self._open()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for key in list(self._selector.get_map().values()):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sock.close()
        self._selector.close()


def landed_job_ids(paths: Paths) -> set[str]:
    ids: set[str] = set()
    for path in paths.landing.glob("date=*/hour=*/batch-*.parquet"):
        ids.update(pq.read_table(path, columns=["job_id"])["job_id"].to_pylist())
    return ids


@pytest.mark.integration
def test_a_flood_of_half_open_connections_starves_no_one(
    tmp_path: Path, many_open_files: None
) -> None:
    home = tmp_path / "home"
    server = CollectorServer(home, TOKEN, "--compact-every", "0.5", open_files=SERVER_OPEN_FILES)
    url = server.url + "/v1/telemetry"
    sent: set[str] = set()
    flood = Flood(server.port, FLOOD)
    try:
        for round_ in range(5):
            batch = recs(20, prefix=f"round{round_}")
            try:
                answer = httpx.post(url, json=batch, headers=AUTH, timeout=10)
                health = httpx.get(server.url + "/healthz", timeout=10)
            except httpx.HTTPError as exc:
                pytest.fail(f"request {round_} during the flood failed: {exc!r}")
            assert answer.status_code == 200, answer.text
            assert answer.json()["accepted"] == 20
            assert health.status_code == 200
            sent |= {r["job_id"] for r in batch}
            time.sleep(0.5)
        # Compaction runs every 0.5 s, under the same descriptor pressure.
        deadline = time.monotonic() + 20
        while not sent <= landed_job_ids(Paths(home)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sent <= landed_job_ids(Paths(home)), "records posted during the flood never landed"
    finally:
        flood.stop()
        server.stop()
    log = server.log_text()
    assert "Too many open files" not in log, log[-2000:]


def read_until_closed(sock: socket.socket, within_s: float) -> tuple[bytes, bool]:
    """What the server sends until it closes, and whether it closed within ``within_s``."""
    sock.settimeout(within_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return received, False
    except ConnectionResetError:
        pass
    return received, True


@pytest.mark.integration
def test_an_unauthenticated_request_is_answered_401_and_closed_unread(tmp_path: Path) -> None:
    server = CollectorServer(tmp_path / "home", TOKEN)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            # A body of 5 MB is announced and never sent: the collector must not wait for it.
            sock.sendall(
                b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5000000\r\n\r\n"
            )
            # Within 2 s: uvicorn's keep-alive timeout (5 s) would close it too, later.
            received, closed = read_until_closed(sock, within_s=2)
        assert received.startswith(b"HTTP/1.1 401"), received[:200]
        assert closed, "the collector kept the connection open to read the body"
    finally:
        server.stop()


@pytest.mark.integration
def test_a_slowloris_is_cut_at_the_header_deadline(tmp_path: Path) -> None:
    # The default header deadline (10 s) is for the whole header, not reset by each byte.
    server = CollectorServer(tmp_path / "home", TOKEN)
    request = (
        f"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "X-Padding: " + "p" * 100 + "\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            started = time.monotonic()
            received, closed = b"", False
            for byte in request:
                if time.monotonic() - started > 16:
                    break
                try:
                    sock.sendall(bytes([byte]))
                except OSError:  # closed while we wrote
                    closed = True
                    break
                received, closed = read_until_closed(sock, within_s=1.0)
                if closed or received:
                    closed = closed or read_until_closed(sock, within_s=2)[1]
                    break
            elapsed = time.monotonic() - started
        assert closed, "a header trickled one byte a second was never cut"
        assert 8 <= elapsed <= 14, elapsed
        assert received == b"" or received.startswith(b"HTTP/1.1 408"), received[:200]
    finally:
        server.stop()


@pytest.mark.integration
def test_a_stalled_body_is_cut_at_the_body_deadline(tmp_path: Path) -> None:
    server = CollectorServer(tmp_path / "home", TOKEN, "--body-timeout", "2")
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                f"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n[".encode()
            )
            started = time.monotonic()
            received, closed = read_until_closed(sock, within_s=8)
            elapsed = time.monotonic() - started
        assert closed, "a body that stalled was never cut"
        assert 1.5 <= elapsed <= 6, elapsed
        assert received.startswith(b"HTTP/1.1 408"), received[:200]
        # The server goes on serving, and the cut was no server error.
        assert httpx.post(server.url + "/v1/telemetry", json=[], headers=AUTH).status_code == 200
    finally:
        server.stop()
    assert "Exception in ASGI application" not in server.log_text()


# -- the parts, in process -------------------------------------------------------------------


class FakeConnection:
    def __init__(self) -> None:
        self.was_shed = False

    def shed(self) -> None:
        self.was_shed = True


def test_the_guard_sheds_the_oldest_connection_still_waiting_for_headers() -> None:
    guard = ConnectionGuard(ConnectionLimits(max_connections=3))
    first, second, third = FakeConnection(), FakeConnection(), FakeConnection()
    for connection in (first, second, third):
        assert guard.admit(connection)
        guard.waiting(connection)
    guard.working(first)  # its headers are in: not to be shed

    newcomer = FakeConnection()
    assert guard.admit(newcomer)

    assert (first.was_shed, second.was_shed, third.was_shed) == (False, True, False)
    assert guard.open_connections == 3
    # With every connection inside a request, nothing can make room: the newcomer is refused.
    for connection in (third, newcomer):
        guard.working(connection)
    late = FakeConnection()
    assert not guard.admit(late)
    assert not any(c.was_shed for c in (first, third, newcomer))


def test_the_connection_cap_leaves_a_reserve_of_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:  # give the process a finite limit to derive from
        soft = 4096
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    room = soft - DEFAULT_FD_RESERVE
    assert ConnectionLimits().connection_cap() == room
    assert ConnectionLimits(max_connections=10 * soft).connection_cap() == room
    assert ConnectionLimits(max_connections=7).connection_cap() == 7
    with pytest.raises(ValueError, match="positive"):
        ConnectionLimits(header_timeout_s=0)


def test_compaction_that_runs_out_of_descriptors_is_retried_at_the_next_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths(tmp_path / "home")
    real_compact = collector.compact
    failures = [0]

    def compact_after_two_failures(at: Paths) -> CompactReport:
        if failures[0] < 2:
            failures[0] += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real_compact(at)

    monkeypatch.setattr(collector, "compact", compact_after_two_failures)
    app = collector.create_app(paths, {TOKEN: "ci"}, compact_every_s=0.05)
    with TestClient(app) as client:
        assert client.post("/v1/telemetry", json=recs(5, "emfile"), headers=AUTH).status_code == 200
        deadline = time.monotonic() + 10
        while len(landed_job_ids(paths)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures[0] == 2
        assert landed_job_ids(paths) == {f"emfile-{i}" for i in range(5)}
