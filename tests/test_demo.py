"""``qabuse demo`` end to end, as a user runs it: four simulated days, few calls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qabuse_dagster import model_registry, settings

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_detects_the_incident_and_leaves_a_champion(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, settings.HOME_ENV: str(home), "COLUMNS": "160"}
    env.pop("DAGSTER_HOME", None)
    qabuse = Path(sys.executable).parent / "qabuse"
    completed = subprocess.run(
        [str(qabuse), "demo", "--hours", "96", "--seed", "11", "--calls", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "Incident detected" in output
    assert "DETECTED" in output
    assert "/score latency" in output
    assert "ranks the incident key above every benign key" in output
    # A family missing its floors is a verdict the report states, not a crash to dump.
    assert "Stack Trace" not in output and "DagsterAssetCheckFailedError" not in output
    # Simulated up to the present minute: the incident key, busy to the end, reads fresh
    # (younger than the staleness bound), and quiet keys are flagged, not hidden.
    assert re.search(r"│ runaway_ci .*│ fresh \d+(\.\d)?[sm] ", output), output[-3000:]
    fresh = re.search(r"(\d+) of (\d+) keys have online features younger than", output)
    assert fresh and int(fresh.group(1)) >= 1
    # The drift summary and what runs on its own once `make up` starts the daemon.
    assert re.search(r"input drift\s+│\s+\d+ of \d+ inputs at PSI", output)
    # Eleven keys are too few for decile shares: the figures are shown, not judged.
    assert "not judged" in output
    assert "score drift" in output and "check feature_drift:psi_below_error" in output
    assert "last hour" in output
    for name, status in (
        ("weekly_training_schedule", "stopped"),
        ("hourly_monitoring_schedule", "stopped"),
        ("drift_sensor", "running"),
        ("label_sensor", "running"),
        ("landed_telemetry_sensor", "running"),
    ):
        assert re.search(rf"{name}.*{status}", output), name

    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS, tracking_uri=uri)
    assert champion.version == "1"
