"""A throwaway ``nats-server -js`` on 127.0.0.1 for the ingest bus's tests.

JetStream keeps its file store in a fresh temporary folder, removed when the context
exits, so no test ever sees another run's streams. The server is the one Debian ships
(``apt-get install nats-server``); no client library is needed to know it is up: it
greets every connection with an ``INFO`` line.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
import tempfile
from collections.abc import Iterator

from qabuse_dagster.processes import free_port

from .local_server import running

NATS_SERVER = "nats-server"


class NatsServerMissing(RuntimeError):
    """``nats-server`` is not on PATH."""


def nats_server_binary() -> str | None:
    """The path of ``nats-server``, or None when it is not installed."""
    return shutil.which(NATS_SERVER)


def _greets(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


@contextlib.contextmanager
def local_nats(host: str = "127.0.0.1", startup_timeout_s: float = 10.0) -> Iterator[str]:
    """Run ``nats-server`` with JetStream on a free port; yield its ``nats://`` URL.

    Raises:
        NatsServerMissing: ``nats-server`` is not installed.
        RuntimeError: it exited, or did not greet within ``startup_timeout_s``.
    """
    binary = nats_server_binary()
    if binary is None:
        raise NatsServerMissing(
            f"{NATS_SERVER} is not on PATH; install it (Debian: apt-get install nats-server)"
        )
    with tempfile.TemporaryDirectory(prefix="qabuse-nats-") as store:
        port = free_port(host)
        command = [binary, "-a", host, "-p", str(port), "-js", "-sd", store]
        ready = functools.partial(_greets, host, port)
        with running(command, ready, what=NATS_SERVER, startup_timeout_s=startup_timeout_s):
            yield f"nats://{host}:{port}"
