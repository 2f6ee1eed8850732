"""``qabuse up``: the Dagster UI, the MLflow UI, the scoring endpoint, the telemetry
collector, the stream worker and the gateway's authorize API, run together.

An entry point beside ``cli.py``: it starts the orchestration (``dagster dev``, whose
home :mod:`qabuse_dagster.pipeline` sets) and the serving layer's endpoint, so it sits
above both in the layers of DESIGN.md. The collector (``qabuse collector``) starts when
client tokens are configured (``QABUSE_COLLECTOR_TOKENS``); the stream worker (``qabuse
stream``) tails what it accepts into the online store and the decision ledger.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from qabuse_dagster import settings
from qabuse_dagster.ingest.collector import TOKENS_ENV
from qabuse_dagster.pipeline import export_dagster_home
from qabuse_dagster.processes import ChildProcesses
from qabuse_dagster.serving.server import bentoml_command, console_script, start_server


def run_stack(
    dagster_port: int,
    mlflow_port: int,
    serve_port: int,
    say: Callable[[str], None],
    collector_port: int = 8787,
    gateway_port: int = 8181,
) -> int:
    """``qabuse up``: every server, until Ctrl-C, SIGTERM or one of them exits.

    The Dagster UI, the MLflow UI, the endpoint, the stream worker and the gateway's
    authorize API; the collector too
    when ``QABUSE_COLLECTOR_TOKENS`` names its clients (without, it could accept nothing).
    ``say`` shows the URLs and what happened (the CLI passes ``click.echo``).
    """
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
        "mlflow": [
            console_script("mlflow"),
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
    collecting = bool(os.environ.get(TOKENS_ENV, "").strip())
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
    with ChildProcesses() as children:
        processes = {
            name: start_server(children, command, run_dir / f"{name}.log", extra_env.get(name))
            for name, command in commands.items()
        }
        say(f"Dagster UI      http://127.0.0.1:{dagster_port}")
        say(f"MLflow UI       http://127.0.0.1:{mlflow_port}")
        say(f"Scoring API     http://127.0.0.1:{serve_port}/score   (OpenAPI docs at /)")
        if collecting:
            say(f"Collector       http://127.0.0.1:{collector_port}/v1/telemetry")
        else:
            say(f"Collector       not started: set {TOKENS_ENV} (tenant:token,...) to run it")
        say(f"Stream worker   figures in {run_dir / 'stream-stats.json'}")
        say(f"Gateway         http://127.0.0.1:{gateway_port}/v1/authorize   (ext_authz)")
        say(f"Triage page     http://127.0.0.1:{gateway_port}/triage   (analyst tokens)")
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
