"""The Dagster instance of a qabuse home: telemetry and the first-visit dialog are off."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance

from qabuse_dagster import settings
from qabuse_dagster.pipeline import export_dagster_home


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return tmp_path


def test_a_fresh_home_turns_telemetry_and_the_first_visit_dialog_off(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dagster_home = Path(export_dagster_home())
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))  # as export set it, undone after
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.telemetry_enabled is False
        assert instance.nux_enabled is False


def test_an_existing_config_keeps_its_settings_and_gains_the_two(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings.paths().dagster_home / "dagster.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("telemetry:\n  enabled: true\nrun_monitoring:\n  enabled: true\n")
    monkeypatch.setenv("DAGSTER_HOME", export_dagster_home())
    written = yaml.safe_load(config.read_text())
    assert written == {
        "telemetry": {"enabled": False},
        "run_monitoring": {"enabled": True},
        "nux": {"enabled": False},
    }
    before = config.stat().st_mtime_ns
    export_dagster_home()  # already quiet: left as it is
    assert config.stat().st_mtime_ns == before
