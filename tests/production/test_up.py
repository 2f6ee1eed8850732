"""``qabuse up --profile production``: the UIs start on the servers given, and stop on SIGTERM.

The real console script runs against the session's PostgreSQL and Redis with the two
servers whose storage the profile changes, ``--only dagster,mlflow`` (``dagster dev`` on
the PostgreSQL instance, ``mlflow server`` on the PostgreSQL backend store): the whole
stack takes twice as long to start here, and its other servers read settings tested in
``test_profile.py``; ``tests/test_cli_signals.py`` stops the whole embedded stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from support.production import ProductionDeployment

from qabuse_dagster import settings
from qabuse_dagster.processes import free_port

pytestmark = pytest.mark.integration

READY_WITHIN_S = 120.0
STOP_WITHIN_S = 20.0


def _request(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5.0) as response:
        return json.loads(response.read() or b"null")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _answers_or_exited(url: str, process: subprocess.Popen[bytes]) -> bool:
    return _answers(url) or process.poll() is not None


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def _rows(url: str, statement: str) -> list[tuple[Any, ...]]:
    import psycopg

    scheme, _, rest = url.partition("://")
    try:
        with psycopg.connect(f"{scheme.split('+')[0]}://{rest}") as conn:
            return conn.execute(statement).fetchall()
    except psycopg.errors.UndefinedTable:  # not created yet
        return []


def test_up_refuses_production_without_its_servers_and_names_each_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from qabuse_dagster.cli import main

    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    # `up` exports its --profile for the servers it starts: undone after, with this.
    monkeypatch.setenv(settings.PROFILE_ENV, "embedded")
    for name in (
        settings.DAGSTER_PG_URL_ENV,
        settings.MLFLOW_URI_ENV,
        settings.LEDGER_URL_ENV,
        settings.REDIS_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["up", "--profile", "production"])
    assert result.exit_code == 1, result.output
    assert os.environ[settings.PROFILE_ENV] == "production"
    for name in ("QABUSE_DAGSTER_PG_URL", "QABUSE_MLFLOW_TRACKING_URI", "QABUSE_LEDGER_URL"):
        assert f"{name} is not set" in result.output
    assert not (tmp_path / "dagster").exists(), "nothing may start before the check"
    unknown = CliRunner().invoke(main, ["up", "--only", "dagster,airflow"])
    assert unknown.exit_code == 2 and "unknown airflow" in unknown.output


def test_up_production_serves_both_uis_on_postgres_and_stops_on_sigterm(
    production: ProductionDeployment, tmp_path: Path
) -> None:
    dagster, mlflow = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env["DAGSTER_DISABLE_TELEMETRY"] = "true"
    command = [str(Path(sys.executable).parent / "qabuse"), "up", "--profile", "production"]
    command += ["--only", "dagster,mlflow"]
    command += ["--dagster-port", str(dagster), "--mlflow-port", str(mlflow)]
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        for url in (f"http://127.0.0.1:{mlflow}/health", f"http://127.0.0.1:{dagster}/server_info"):
            ready = _wait(partial(_answers_or_exited, url, process), READY_WITHIN_S)
            assert ready and process.poll() is None, f"{url}:\n{log.read_text()[-3000:]}"
        # MLflow's UI writes to PostgreSQL: an experiment made through it is in the table.
        created = _request(
            f"http://127.0.0.1:{mlflow}/api/2.0/mlflow/experiments/create",
            {"name": "made-through-the-ui"},
        )
        assert created["experiment_id"]
        names = {
            row[0] for row in _rows(production.mlflow_tracking_uri, "SELECT name FROM experiments")
        }
        assert "made-through-the-ui" in names
        # Dagster's UI reads the PostgreSQL instance, and its daemon beats there.
        info = _request(f"http://127.0.0.1:{dagster}/graphql", {"query": "{ instance { info } }"})
        assert "PostgresRunStorage" in info["data"]["instance"]["info"]
        assert _wait(
            lambda: bool(
                _rows(production.dagster_postgres_url, "SELECT daemon_type FROM daemon_heartbeats")
            ),
            30.0,
        ), "the daemon of dagster dev wrote no heartbeat to PostgreSQL"
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"qabuse up still running {STOP_WITHIN_S} s after SIGTERM")
        assert not _answers(f"http://127.0.0.1:{mlflow}/health")
        assert not _answers(f"http://127.0.0.1:{dagster}/server_info")
    finally:
        if process.poll() is None:  # a failed test: its children follow (PDEATHSIG)
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
