"""Start and stop qabuse's servers as subprocesses bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from qabuse_dagster import settings
from qabuse_dagster.processes import ChildProcesses, free_port
from qabuse_dagster.serving.client import ScoringClient

logger = logging.getLogger(__name__)

SERVICE = "qabuse_dagster.serving.service:Scorer"
WORKERS_ENV = "QABUSE_SCORER_WORKERS"
#: Each worker holds the whole champion and its caches (a few hundred MB): past a few,
#: a machine gains more from replicas than from more workers in one.
MAX_DEFAULT_WORKERS = 4


def scorer_workers() -> int:
    """Worker processes ``bentoml serve`` starts for the scorer, each on the same port.

    ``QABUSE_SCORER_WORKERS`` when set, else one per CPU core this process may use (at
    most `MAX_DEFAULT_WORKERS`): a /score request is CPU work under the GIL, so one
    process uses one core.
    """
    text = os.environ.get(WORKERS_ENV, "").strip()
    if not text:
        usable = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
        return max(1, min(usable or 1, MAX_DEFAULT_WORKERS))
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ValueError(f"{WORKERS_ENV}={text!r}: expected a whole number of workers, 1 or more")
    return workers


def console_script(name: str) -> str:
    """A console script of this environment (beside the running interpreter)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


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
    return [console_script("bentoml"), "serve", SERVICE, "--host", host, "--port", str(port)]


def start_server(
    children: ChildProcesses,
    command: Sequence[str],
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start one server in ``children`` from the project root, with :func:`server_env`."""
    return children.start(
        command, cwd=settings.PROJECT_ROOT, env={**server_env(), **(env or {})}, log=log
    )


@contextlib.contextmanager
def scoring_server(
    host: str = "127.0.0.1",
    port: int | None = None,
    ready_timeout: float = 180.0,
    workers: int | None = None,
) -> Iterator[ScoringClient]:
    """Run ``bentoml serve`` for the block; yields a client once ``/readyz`` answers.

    ``workers`` defaults to `scorer_workers` (``QABUSE_SCORER_WORKERS``).
    """
    port = port or free_port(host)
    log = settings.paths().run / "bentoml.log"
    env = {WORKERS_ENV: str(workers)} if workers is not None else None
    with ChildProcesses() as children:
        process = start_server(children, bentoml_command(host, port), log, env=env)
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


def serve_forever(host: str, port: int, workers: int | None = None) -> int:
    """``qabuse serve``: BentoML in the foreground until it exits, Ctrl-C or SIGTERM.

    Args:
        workers: Worker processes; default `scorer_workers` (``QABUSE_SCORER_WORKERS``).
    """
    env = {WORKERS_ENV: str(workers)} if workers is not None else None
    with ChildProcesses() as children:
        process = start_server(children, bentoml_command(host, port), env=env)
        try:
            return process.wait()
        except KeyboardInterrupt:  # bentoml and its workers are already stopped
            return 0
