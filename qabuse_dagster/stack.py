"""``qabuse up``: the Dagster UI, the MLflow UI, the scoring endpoint, the telemetry
collector, the stream worker and the gateway's authorize API, run together.

An entry point beside ``cli.py``: it starts the orchestration (``dagster dev``, whose
home :mod:`qabuse_dagster.pipeline` sets) and the serving layer's endpoint, so it sits
above both in the layers of DESIGN.md. The collector (``qabuse collector``) starts when
client tokens are configured (``QABUSE_COLLECTOR_TOKENS``); the stream worker (``qabuse
stream``) tails what it accepts into the online store and the decision ledger.

Under the production profile (``qabuse up --profile production``,
:mod:`qabuse_dagster.profile`) the same processes start against the servers given by
URL: ``dagster dev`` on the PostgreSQL instance :func:`~qabuse_dagster.pipeline.
export_dagster_home` writes, ``mlflow server`` on the PostgreSQL backend store (artifacts
on the file store, ``QABUSE_MLFLOW_ARTIFACTS``) instead of ``mlflow ui`` on SQLite, and
the endpoint, stream worker, collector and gateway inherit the Redis, ledger and bus
settings from the environment. It starts nothing until every server answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection

from qabuse_dagster import settings
from qabuse_dagster.ingest.collector import TOKENS_ENV
from qabuse_dagster.pipeline import export_dagster_home
from qabuse_dagster.processes import ChildProcesses
from qabuse_dagster.profile import (
    ProductionServers,
    ProfileError,
    check_profile,
    shown,
    unreachable,
)
from qabuse_dagster.serving.server import bentoml_command, console_script, start_server

#: What ``qabuse up`` starts, by the names ``--only`` takes.
STACK_SERVERS = ("dagster", "mlflow", "bentoml", "collector", "stream", "gateway")


def run_stack(
    dagster_port: int,
    mlflow_port: int,
    serve_port: int,
    say: Callable[[str], None],
    collector_port: int = 8787,
    gateway_port: int = 8181,
    only: Collection[str] | None = None,
) -> int:
    """``qabuse up``: every server, until Ctrl-C, SIGTERM or one of them exits.

    The Dagster UI, the MLflow UI, the endpoint, the stream worker and the gateway's
    authorize API; the collector too
    when ``QABUSE_COLLECTOR_TOKENS`` names its clients (without, it could accept nothing).
    ``say`` shows the URLs and what happened (the CLI passes ``click.echo``). ``only``
    names some of `STACK_SERVERS` to start those alone: a production deployment runs the
    UIs on one machine and collectors, stream workers and endpoints on others.

    Raises:
        ProfileError: under the production profile, a setting is missing or malformed, or
            a server does not answer.
        ValueError: ``only`` names a server that is not one of `STACK_SERVERS`.
    """
    wanted = set(STACK_SERVERS if only is None else only)
    if unknown := sorted(wanted - set(STACK_SERVERS)):
        raise ValueError(f"unknown server(s) {unknown}: expected some of {STACK_SERVERS}")
    servers = check_profile()
    if servers is not None:
        problems = unreachable(servers)
        if problems:
            raise ProfileError(problems)
    export_dagster_home()
    run_dir = settings.paths().run
    commands = {
        "dagster": [
            console_script("dagster"),
            "dev",
            "-w",
            str(settings.PROJECT_ROOT / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(dagster_port),
        ],
        "mlflow": _mlflow_command(servers, mlflow_port),
        "bentoml": bentoml_command("127.0.0.1", serve_port),
        # -v: its minute-by-minute figures go to the log.
        "stream": [console_script("qabuse"), "-v", "stream"],
        "gateway": [
            console_script("qabuse"),
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(gateway_port),
        ],
    }
    collecting = "collector" in wanted and bool(os.environ.get(TOKENS_ENV, "").strip())
    if collecting:
        port = ["--host", "127.0.0.1", "--port", str(collector_port)]
        commands["collector"] = [console_script("qabuse"), "collector", *port]
    # MLflow's job runner (seven huey consumers for GenAI jobs qabuse never submits) would
    # double the processes `up` starts and take most of the grace period to stop.
    extra_env = {"mlflow": {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}}
    # Alerts link to the UIs this command serves, unless the deployment says otherwise.
    extra_env["stream"] = {
        name: os.environ.get(name, url)
        for name, url in (
            (settings.DAGSTER_UI_URL_ENV, f"http://127.0.0.1:{dagster_port}"),
            (settings.MLFLOW_UI_URL_ENV, f"http://127.0.0.1:{mlflow_port}"),
            (settings.TRIAGE_URL_ENV, f"http://127.0.0.1:{gateway_port}"),
        )
    }
    commands = {name: command for name, command in commands.items() if name in wanted}
    announced = {
        "dagster": [f"Dagster UI      http://127.0.0.1:{dagster_port}"],
        "mlflow": [f"MLflow UI       http://127.0.0.1:{mlflow_port}"],
        "bentoml": [f"Scoring API     http://127.0.0.1:{serve_port}/score   (OpenAPI docs at /)"],
        "collector": [
            f"Collector       http://127.0.0.1:{collector_port}/v1/telemetry"
            if collecting
            else f"Collector       not started: set {TOKENS_ENV} (tenant:token,...) to run it"
        ],
        "stream": [f"Stream worker   figures in {run_dir / 'stream-stats.json'}"],
        "gateway": [
            f"Gateway         http://127.0.0.1:{gateway_port}/v1/authorize   (ext_authz)",
            f"Triage page     http://127.0.0.1:{gateway_port}/triage   (analyst tokens)",
        ],
    }
    with ChildProcesses() as children:
        processes = {
            name: start_server(children, command, run_dir / f"{name}.log", extra_env.get(name))
            for name, command in commands.items()
        }
        if servers is not None:
            say(f"Profile         production: {_stores(servers)}")
        for name in STACK_SERVERS:
            if name in wanted:
                for line in announced[name]:
                    say(line)
        say(f"logs in {run_dir}; the UIs take up to a minute to start; Ctrl-C stops them all")
        try:
            while True:
                for name, process in processes.items():
                    if process.poll() is not None:
                        say(f"{name} exited with {process.returncode}; see {run_dir / name}.log")
                        return 1
                time.sleep(1.0)
        except KeyboardInterrupt:  # the servers are already stopped
            return 0


def _mlflow_command(servers: ProductionServers | None, port: int) -> list[str]:
    """The MLflow UI: ``mlflow ui`` on the embedded store, ``mlflow server`` in production.

    The production server's backend store is the PostgreSQL tracking and registry store
    (MLflow creates its tables on first use); runs keep their artifacts where qabuse's
    experiments put them (``QABUSE_MLFLOW_ARTIFACTS``), which the server reads too.
    """
    address = ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if servers is None:
        store = ["--backend-store-uri", settings.mlflow_tracking_uri()]
        return [console_script("mlflow"), "ui", *store, *address]
    store = ["--backend-store-uri", servers.mlflow_tracking_uri]
    store += ["--default-artifact-root", settings.mlflow_artifact_root()]
    return [console_script("mlflow"), "server", *store, *address]


def _stores(servers: ProductionServers) -> str:
    """Where each store is, passwords hidden: what ``qabuse up`` shows at start."""
    stores = [
        f"Dagster {shown(servers.dagster_postgres_url)}",
        f"MLflow {shown(servers.mlflow_tracking_uri)}",
        f"ledger {shown(servers.ledger_url)}",
        f"Redis {servers.redis.split(',')[0]}",
    ]
    if servers.bus_url is not None:
        stores.append(f"bus {shown(servers.bus_url)}")
    return "; ".join(stores)
