"""Start and stop qabuse's servers as subprocesses bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from qabuse_dagster import settings
from qabuse_dagster.processes import ChildProcesses
from qabuse_dagster.serving.client import ScoringClient

logger = logging.getLogger(__name__)

SERVICE = "qabuse_dagster.serving.service:Scorer"


def _bin(name: str) -> str:
    """A console script of this environment (beside the running interpreter)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_env() -> dict[str, str]:
    """The environment every server gets: one QABUSE_HOME, DAGSTER_HOME and BentoML home."""
    env = dict(os.environ)
    paths = settings.paths()
    env[settings.HOME_ENV] = str(paths.home)
    env["DAGSTER_HOME"] = str(paths.dagster_home)
    env.setdefault("BENTOML_HOME", str(paths.home / "bentoml"))
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def bentoml_command(host: str, port: int) -> list[str]:
    return [_bin("bentoml"), "serve", SERVICE, "--host", host, "--port", str(port)]


def _start(
    children: ChildProcesses,
    command: Sequence[str],
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    return children.start(
        command, cwd=settings.PROJECT_ROOT, env={**server_env(), **(env or {})}, log=log
    )


@contextlib.contextmanager
def scoring_server(
    host: str = "127.0.0.1", port: int | None = None, ready_timeout: float = 180.0
) -> Iterator[ScoringClient]:
    """Run ``bentoml serve`` for the block; yields a client once ``/readyz`` answers."""
    port = port or free_port(host)
    log = settings.paths().run / "bentoml.log"
    with ChildProcesses() as children:
        process = _start(children, bentoml_command(host, port), log)
        with contextlib.closing(ScoringClient(f"http://{host}:{port}")) as client:
            deadline = time.monotonic() + ready_timeout
            while not client.ready():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"bentoml serve exited with {process.returncode}; see {log}:\n" + _tail(log)
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"endpoint not ready after {ready_timeout:.0f} s; see {log}")
                time.sleep(0.5)
            yield client


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def serve_forever(host: str, port: int) -> int:
    """``qabuse serve``: BentoML in the foreground until it exits, Ctrl-C or SIGTERM."""
    with ChildProcesses() as children:
        process = _start(children, bentoml_command(host, port))
        try:
            return process.wait()
        except KeyboardInterrupt:  # bentoml and its workers are already stopped
            return 0


def run_stack(
    dagster_port: int, mlflow_port: int, serve_port: int, say: Callable[[str], None]
) -> int:
    """``qabuse up``: Dagster UI, MLflow UI and the endpoint, until Ctrl-C, SIGTERM or one exits.

    ``say`` shows the URLs and what happened (the CLI passes ``click.echo``).
    """
    from qabuse_dagster.pipeline import export_dagster_home

    export_dagster_home()
    run_dir = settings.paths().run
    commands = {
        "dagster": [
            _bin("dagster"),
            "dev",
            "-w",
            str(settings.PROJECT_ROOT / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(dagster_port),
        ],
        "mlflow": [
            _bin("mlflow"),
            "ui",
            "--backend-store-uri",
            settings.mlflow_tracking_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ],
        "bentoml": bentoml_command("127.0.0.1", serve_port),
    }
    # MLflow's job runner (seven huey consumers for GenAI jobs qabuse never submits) would
    # double the processes `up` starts and take most of the grace period to stop.
    extra_env = {"mlflow": {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}}
    with ChildProcesses() as children:
        processes = {
            name: _start(children, command, run_dir / f"{name}.log", extra_env.get(name))
            for name, command in commands.items()
        }
        say(f"Dagster UI      http://127.0.0.1:{dagster_port}")
        say(f"MLflow UI       http://127.0.0.1:{mlflow_port}")
        say(f"Scoring API     http://127.0.0.1:{serve_port}/score   (OpenAPI docs at /)")
        say(f"logs in {run_dir}; the UIs take up to a minute to start; Ctrl-C stops all three")
        try:
            while True:
                for name, process in processes.items():
                    if process.poll() is not None:
                        say(f"{name} exited with {process.returncode}; see {run_dir / name}.log")
                        return 1
                time.sleep(1.0)
        except KeyboardInterrupt:  # the servers are already stopped
            return 0
