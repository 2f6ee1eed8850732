"""``qabuse collector`` as a real subprocess on a free port, for tests that need its sockets."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from qabuse_dagster.ingest.collector import TOKENS_ENV


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def open_files_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` that sets the child's RLIMIT_NOFILE (soft and hard) to ``limit``."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


class CollectorServer:
    """``qabuse collector`` on 127.0.0.1, started and ready (``/healthz`` answers).

    Args:
        home: ``QABUSE_HOME`` of the collector; its log goes beside it.
        token: the one client token (client name ``ci``).
        *extra: more ``qabuse collector`` options.
        port: a fixed port (a restart on the same one); a free one if not given.
        open_files: the collector's RLIMIT_NOFILE, if it should be other than this
            process's.
    """

    def __init__(
        self,
        home: Path,
        token: str,
        *extra: str,
        port: int | None = None,
        open_files: int | None = None,
    ) -> None:
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / "collector.log"
        home.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, TOKENS_ENV: f"ci:{token}", "QABUSE_HOME": str(home)}
        command = [sys.executable, "-m", "qabuse_dagster.cli", "collector"]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port), *extra],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),  # a file, not a pipe: a pipe nobody reads fills up
            preexec_fn=None if open_files is None else open_files_limit(open_files),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text(errors="replace"))
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.process.kill()
        raise RuntimeError("collector did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")
