"""Session-wide state for the integration tests.

Feast and MLflow state lives under one ``QABUSE_HOME`` per test session: ``feast apply``
takes seconds and Feast's repo modules are imported once per process, so the applied
repository is shared instead of re-applied in every test. Unit tests that only need a
folder use ``settings.Paths(tmp_path)`` and never touch this home.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qabuse_dagster import settings


@dataclass(frozen=True)
class PipelineRun:
    """One simulated slice, ingested and taken through both Dagster jobs."""

    home: Path
    simulation: object
    ingest: object
    result: object


@pytest.fixture(scope="session")
def qabuse_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("qabuse-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(settings.HOME_ENV, str(home))
        patch.setenv("DAGSTER_HOME", str(home / "dagster"))
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        patch.setenv("BENTOML_HOME", str(home / "bentoml"))
        patch.setenv("FEAST_USAGE", "False")
        patch.delenv(settings.MLFLOW_URI_ENV, raising=False)
        yield home


@pytest.fixture(scope="session")
def pipeline_run(qabuse_home: Path) -> PipelineRun:
    """4 simulated days (a warm-up day, training, the incident) through the whole asset graph."""
    from qabuse_dagster.ingest.files import ingest_labels, ingest_telemetry
    from qabuse_dagster.ingest.partitions import hours_between
    from qabuse_dagster.pipeline import run_pipeline
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    sim = simulate(hours=96, seed=3, out=qabuse_home / "simulation", hasher=KeyedHasher.demo())
    report = ingest_telemetry([sim.telemetry_path], settings.paths())
    ingest_labels(sim.labels_path, settings.paths())
    result = run_pipeline(hours_between(sim.start, sim.end))
    assert os.environ["DAGSTER_HOME"] == str(qabuse_home / "dagster")
    return PipelineRun(home=qabuse_home, simulation=sim, ingest=report, result=result)
