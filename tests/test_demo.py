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
    # The simulated days lie in the past: every online vector is flagged, not hidden.
    assert re.search(r"stale \d+\.\dd", output) and "flags it stale" in output

    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS, tracking_uri=uri)
    assert champion.version == "1"
