"""Gateway apps whose decision table misbehaves, and the gateway as a real uvicorn server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from qabuse_dagster.processes import free_port
from qabuse_dagster.response.decision_table import DecisionTable, Verdict
from qabuse_dagster.response.gateway import create_gateway_app

TESTS = Path(__file__).resolve().parent.parent


class StallingTable(DecisionTable):
    """A table whose every lookup hangs for ``stall_s`` (a lock held by a stuck refresher)."""

    def __init__(self, stall_s: float = 1.0) -> None:
        super().__init__()
        self.stall_s = stall_s

    def lookup(self, api_key_id: str, now_ms: int, **kwargs: Any) -> Verdict:
        time.sleep(self.stall_s)
        return super().lookup(api_key_id, now_ms, **kwargs)


class FailingTable(DecisionTable):
    """A table whose every lookup raises."""

    def lookup(self, api_key_id: str, now_ms: int, **kwargs: Any) -> Verdict:
        raise RuntimeError("the decision table is broken")


class StoppableTable(DecisionTable):
    """A table that works until the file ``QABUSE_TEST_STOP_FILE`` names exists, then hangs.

    The decision store stopping under load: a test creates the file while clients keep
    asking, and every lookup from then on stalls for ``stall_s``.
    """

    def __init__(self, stop_file: Path, stall_s: float = 5.0) -> None:
        super().__init__()
        self.stop_file = stop_file
        self.stall_s = stall_s

    def lookup(self, api_key_id: str, now_ms: int, **kwargs: Any) -> Verdict:
        if self.stop_file.exists():
            time.sleep(self.stall_s)
        return super().lookup(api_key_id, now_ms, **kwargs)


def stoppable_gateway() -> Starlette:
    """For ``uvicorn --factory``: a `StoppableTable` on ``QABUSE_TEST_STOP_FILE``."""
    return create_gateway_app(StoppableTable(Path(os.environ["QABUSE_TEST_STOP_FILE"])), modes={})


def stalling_gateway() -> Starlette:
    """For ``uvicorn --factory``: tokens and signing key from the environment (settings)."""
    return create_gateway_app(StallingTable(), modes={})


class GatewayServer:
    """``uvicorn --factory <factory>`` on 127.0.0.1, started and answering ``/healthz``.

    Args:
        factory: ``module:function`` building the app; ``tests/`` is on the path.
        env: Extra environment (tokens file, signing key, ``QABUSE_HOME``).
        log: Where the server's stderr goes.
    """

    def __init__(self, factory: str, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "uvicorn", "--factory", factory]
        self.process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            env={**os.environ, **env, "PYTHONPATH": path},
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),  # a file, not a pipe: a pipe nobody reads fills up
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(log.read_text(errors="replace"))
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the gateway did not start: " + log.read_text(errors="replace"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
