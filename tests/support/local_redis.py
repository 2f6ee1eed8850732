"""A throwaway ``redis-server`` on 127.0.0.1 for the Redis online store's tests and benchmark.

Nothing is persisted (no RDB snapshot, no append-only file): the server holds only what
one test or benchmark run writes, and it is gone when the context exits.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
from collections.abc import Iterator

from qabuse_dagster.processes import free_port

# Relative: the benchmarks import this module as tests.support.local_redis.
from .local_server import running

REDIS_SERVER = "redis-server"


class RedisServerMissing(RuntimeError):
    """``redis-server`` is not on PATH."""


def redis_server_binary() -> str | None:
    """The path of ``redis-server``, or None when it is not installed."""
    return shutil.which(REDIS_SERVER)


def _answers_ping(host: str, port: int) -> bool:
    # The inline protocol: no client library needed to know the server is up.
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def local_redis(host: str = "127.0.0.1", startup_timeout_s: float = 10.0) -> Iterator[str]:
    """Run ``redis-server`` on a free port; yield Feast's ``connection_string`` for it.

    Raises:
        RedisServerMissing: ``redis-server`` is not installed.
        RuntimeError: it exited, or did not answer PING within ``startup_timeout_s``.
    """
    binary = redis_server_binary()
    if binary is None:
        raise RedisServerMissing(
            f"{REDIS_SERVER} is not on PATH; install it (Debian: apt-get install redis-server)"
        )
    port = free_port(host)
    command = [binary, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"]
    command += ["--loglevel", "warning"]
    ready = functools.partial(_answers_ping, host, port)
    with running(command, ready, what=REDIS_SERVER, startup_timeout_s=startup_timeout_s):
        yield f"{host}:{port}"
