"""``bentoml build`` packs the scorer as a Bento, and the Bento serves the @champion."""

from __future__ import annotations

import contextlib
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from qabuse_dagster import model_registry, settings
from qabuse_dagster.processes import ChildProcesses, free_port
from qabuse_dagster.serving.client import ScoringClient
from qabuse_dagster.serving.server import console_script, server_env, start_server

pytestmark = pytest.mark.integration

BENTOFILE = settings.PROJECT_ROOT / "bentofile.yaml"
HOST = "127.0.0.1"


def test_the_bento_installs_the_projects_runtime_dependencies() -> None:
    bentofile = yaml.safe_load(BENTOFILE.read_text())
    project = tomllib.loads((settings.PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    assert bentofile["python"]["packages"] == project["dependencies"]
    assert bentofile["python"]["lock_packages"] is False  # no network at build time
    assert bentofile["service"] == "qabuse_dagster.serving.service:Scorer"


def test_bentoml_build_packs_a_bento_that_serves_the_champion(pipeline_run, tmp_path: Path) -> None:
    env = {**server_env(), "BENTOML_HOME": str(tmp_path / "bentoml")}
    built = subprocess.run(
        [console_script("bentoml"), "build", "-f", str(BENTOFILE), ".", "--output", "tag"],
        cwd=settings.PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["service"] == "qabuse_dagster.serving.service:Scorer"
    src = bento / "src"
    for packed in (
        "qabuse_dagster/serving/service.py",
        "models/campaign.py",
        "feature_repo/feature_store.yaml",
        "qabuse_dagster/response/schemas/alert.v1.schema.json",
    ):
        assert (src / packed).is_file(), packed
    assert not list(src.rglob("__pycache__")) and not (src / "tests").exists()

    # Served from the Bento, the service resolves @champion from the registry at start.
    port = free_port(HOST)
    log = tmp_path / "bento-serve.log"
    command = [console_script("bentoml"), "serve", tag, "--host", HOST, "--port", str(port)]
    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    (incident_key,) = pipeline_run.simulation.incident_api_key_ids
    with ChildProcesses() as children:
        process = start_server(children, command, log, env={"BENTOML_HOME": env["BENTOML_HOME"]})
        with contextlib.closing(ScoringClient(f"http://{HOST}:{port}")) as client:
            deadline = time.monotonic() + 180
            while not client.ready():
                assert process.poll() is None, log.read_text(errors="replace")[-2000:]
                assert time.monotonic() < deadline, "the Bento did not become ready"
                time.sleep(0.5)
            response = client.score(incident_key)
    assert (response.model_name, response.model_version) == (champion.name, champion.version)
    assert response.anomalous
