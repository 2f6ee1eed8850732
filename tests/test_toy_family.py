"""Adding a detector family means one module and one registration: nothing else changes.

`tests/support/toy_family.py` is that module. Registered in this process, the toy runs
through the one evaluation entry point; named in ``QABUSE_DETECTOR_MODULES``, a real
``bentoml serve`` subprocess loads it from the registry and answers with its score.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.registry import PLUGINS_ENV
from qabuse_dagster import model_registry, settings
from qabuse_dagster.evaluation.families import (
    ENSEMBLE,
    detector_inputs,
    train_then_score,
)
from qabuse_dagster.evaluation.report import run_backtests
from qabuse_dagster.ingest.partitions import read_raw
from qabuse_dagster.serving.server import scoring_server
from qabuse_dagster.telemetry.labels import read_labels

pytestmark = pytest.mark.integration

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def toy() -> Iterator[str]:
    from support.toy_family import registered

    with registered() as name:
        yield name


def test_a_registered_toy_family_is_evaluated_like_the_others(pipeline_run, toy: str) -> None:
    telemetry = read_raw(settings.paths().raw_telemetry)
    labels = read_labels(settings.paths().labels)
    report, baseline = run_backtests(telemetry, labels, detectors=[toy, "baseline"])
    assert report.detector == toy and baseline.detector == "baseline"
    # A rate detector sees the runaway CI pipeline, and the report judges it per kind.
    assert report.per_kind["runaway_ci"].recall == 1.0
    assert report.overall.precision_at_k is not None and report.overall.precision_at_k >= 0.5


def test_a_toy_champion_is_served_with_its_own_score(
    pipeline_run, toy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    telemetry = read_raw(settings.paths().raw_telemetry)
    sim = pipeline_run.simulation
    middle = sim.start + (sim.end - sim.start) / 2
    trained = train_then_score(detector_inputs(telemetry, [toy]), middle)
    assert trained.ensemble is not None
    member, _ = model_registry.log_detector(
        trained.detectors[toy], family=toy, params={}, metrics={}, run_name="toy"
    )
    champion, _ = model_registry.log_detector(
        trained.ensemble,
        family=model_registry.ENSEMBLE_FAMILY,
        params={},
        metrics={},
        run_name="toy-ensemble",
        members={toy: member},
    )
    before = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    model_registry.set_alias(champion, settings.CHAMPION_ALIAS)
    # The server is a new process: it learns of the toy from the plugin setting alone.
    monkeypatch.setenv(PLUGINS_ENV, "support.toy_family")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    try:
        with scoring_server() as client:
            (incident_key,) = sim.incident_api_key_ids
            response = client.score(incident_key)
    finally:
        model_registry.set_alias(before, settings.CHAMPION_ALIAS)
    assert response.model_version == champion.version
    assert set(response.family_scores) == {toy}
    assert response.family_versions == {toy: member.version}
    assert response.top_family == toy
    assert response.anomalous
    assert response.score == pytest.approx(
        trained.ensemble.decision_function([[response.family_scores[toy]]])[0]
    )
    assert {c.feature for c in response.top_features} <= {
        "submissions_1m",
        "submissions_per_min_5m",
    }
    assert ENSEMBLE in trained.thresholds()
