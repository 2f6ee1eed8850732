"""A throwaway ``nats-server -js`` on 127.0.0.1 for the ingest bus's tests.

JetStream keeps its file store in a fresh temporary folder, removed when the context
exits, so no test ever sees another run's streams. The server is the one Debian ships
(``apt-get install nats-server``); no client library is needed to know it is up: it
greets every connection with an ``INFO`` line.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

from qabuse_dagster.processes import free_port

logger = logging.getLogger(__name__)

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
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not _greets(host, port):
                if process.poll() is not None:
                    output = (
                        process.stdout.read().decode(errors="replace") if process.stdout else ""
                    )
                    raise RuntimeError(f"{NATS_SERVER} exited with {process.returncode}: {output}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{NATS_SERVER} did not greet within {startup_timeout_s}s")
                time.sleep(0.05)
            logger.info("nats-server pid %s on %s:%s", process.pid, host, port)
            yield f"nats://{host}:{port}"
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout:
                process.stdout.close()
