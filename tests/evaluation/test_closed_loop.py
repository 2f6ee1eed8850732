"""Closed-loop backtest: the twin rerun with qabuse mitigating, against the same twin without."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest

from qabuse_dagster.evaluation import closed_loop
from qabuse_dagster.evaluation.closed_loop import (
    CLOSED_LOOP_COLUMNS,
    ClosedLoopReport,
    DetectorController,
    closed_loop_backtest,
    closed_loop_metrics,
    closed_loop_rows,
    closed_loop_summary,
)
from qabuse_dagster.evaluation.families import TrainedDetectors, TrainingParams
from qabuse_dagster.response.decisions import Decision
from qabuse_dagster.response.policy import MitigationPolicy
from qabuse_dagster.simulation.jobs import epoch_ms
from qabuse_dagster.simulation.twin import DEFAULT_START, TwinManifest
from qabuse_dagster.telemetry.hashing import KeyedHasher

HASHER = KeyedHasher(b"test-hash-key-for-the-closed-loop-0123")
# Five days: the families train on a warmed-up day (the first day's day-long features
# are still filling) and the ensemble is calibrated on history they did not see, as in
# production; the incidents fall in the second half, after the default cutoff.
MANIFEST = TwinManifest(
    seed=3,
    start=DEFAULT_START,
    end=DEFAULT_START + timedelta(days=5),
    scenarios=["runaway_ci", "credit_drain"],
)
PARAMS = TrainingParams(alert_budget=0.01)


@pytest.fixture(scope="module")
def trained_with() -> list[tuple[TrainingParams | None, TrainedDetectors]]:
    """What `closed_loop_backtest` trained, with the params it was given (filled by `report`)."""
    return []


@pytest.fixture(scope="module")
def report(trained_with: list[tuple[TrainingParams | None, TrainedDetectors]]) -> ClosedLoopReport:
    real = closed_loop.train_then_score

    def spy(inputs, cutoff, params=None, **kwargs):  # type: ignore[no-untyped-def]
        trained = real(inputs, cutoff, params, **kwargs)
        trained_with.append((params, trained))
        return trained

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(closed_loop, "train_then_score", spy)
        return closed_loop_backtest(MANIFEST, HASHER, params=PARAMS)


def test_the_champion_is_trained_with_the_given_params(
    report: ClosedLoopReport,
    trained_with: list[tuple[TrainingParams | None, TrainedDetectors]],
) -> None:
    ((params, trained),) = trained_with
    assert params is PARAMS
    assert trained.ensemble is not None
    assert report.threshold == trained.thresholds()["ensemble"]
    middle = MANIFEST.start + (MANIFEST.end - MANIFEST.start) / 2
    assert report.train_until == trained.cutoff == middle


def test_mitigation_stops_the_abuse_soon_after_onset(report: ClosedLoopReport) -> None:
    by_kind = {i.kind: i for i in report.incidents}
    assert set(by_kind) == {"runaway_ci", "credit_drain"}
    for impact in by_kind.values():
        assert impact.mitigated_after_s is not None and impact.mitigated_after_s <= 300
        assert impact.harm_until_s_without is not None and impact.harm_until_s_with is not None
        assert impact.harm_until_s_with < 0.5 * impact.harm_until_s_without
        assert impact.abuse_backend_s_with < 0.3 * impact.abuse_backend_s_without


def test_legitimate_users_wait_less_and_pay_little(report: ClosedLoopReport) -> None:
    without, with_ = report.legit_wait_without, report.legit_wait_with
    assert without.jobs > 1000
    # Wait is measured over the jobs that ran: those refused for good are counted apart.
    assert with_.jobs == without.jobs - report.legit_jobs_never_ran
    assert with_.mean_s is not None and without.mean_s is not None
    assert with_.mean_s < 0.5 * without.mean_s  # this seed's incidents share busy backends
    assert report.legit_keys_mitigated <= 0.1 * report.legit_keys
    assert report.legit_jobs_never_ran <= 0.01 * report.legit_planned_jobs
    # The runaway loop is throttled; the credit drain's multi-million-shot jobs are capped.
    assert report.decisions.get("throttle", 0) >= 1
    assert report.decisions.get("cap", 0) >= 1


def test_the_report_serialises_and_renders(report: ClosedLoopReport) -> None:
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["legit_wait_with"]["jobs"] == report.legit_wait_with.jobs
    actions = {d["action"] for d in data["timeline"]}
    assert actions <= {"throttle", "cap", "challenge", "revoke", "release"}
    assert math.isfinite(report.threshold)
    rows = closed_loop_rows(report)
    assert len(rows) == 1 + len(report.incidents)
    assert all(len(row) == len(CLOSED_LOOP_COLUMNS) for row in rows)
    assert "->" in rows[0][4]
    assert "legitimate keys mitigated" in closed_loop_summary(report)
    metrics = closed_loop_metrics(report)
    assert metrics["closed_loop.legit_wait_mean_s_with"] == report.legit_wait_with.mean_s


def test_a_twin_rebuilt_with_another_hash_key_is_refused() -> None:
    other = KeyedHasher(b"not-the-key-the-twin-was-written-with")
    with pytest.raises(ValueError, match="hashed with another key"):
        closed_loop_backtest(MANIFEST, other, expected_keys={HASHER.hash("x", domain="api_key")})


def test_train_until_outside_the_horizon_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the twin's horizon"):
        closed_loop_backtest(MANIFEST, HASHER, train_until=datetime(2020, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "not a twin manifest"),
        ('{"seed": 1, "start": "2026-11-02T00:00:00+00:00"}', "not a twin manifest"),
        (
            '{"seed": 1, "start": "2026-11-02T00:00:00+00:00", '
            '"end": "2026-11-01T00:00:00+00:00", "scenarios": null}',
            "not a twin manifest",
        ),
        (
            '{"seed": 1, "start": "2026-11-02T00:00:00+00:00", '
            '"end": "2026-11-03T00:00:00+00:00", "scenarios": ["nope"]}',
            "unknown scenario",
        ),
    ],
)
def test_a_malformed_manifest_names_the_file(tmp_path, text: str, match: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "twin.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        TwinManifest.read(path)


def test_a_missing_manifest_says_what_is_needed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="qabuse simulate"):
        TwinManifest.read(tmp_path / "twin.json")


def test_the_controller_sees_the_features_production_computes_from_the_file(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """`feature_input` of the twin's jobs gives the features of its written telemetry."""
    import numpy as np

    from qabuse_dagster.evaluation.closed_loop import feature_input
    from qabuse_dagster.evaluation.report import read_telemetry_jsonl
    from qabuse_dagster.features.definitions import DETECTOR_FEATURES
    from qabuse_dagster.features.windows import window_features
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.simulation.twin import build_plan, shared_queue

    result = simulate(hours=3, seed=2, out=tmp_path, hasher=HASHER)
    manifest = TwinManifest.read(tmp_path / "twin.json")
    plan = build_plan(manifest.horizon, seed=2, hasher=HASHER, scenarios=None)
    jobs = shared_queue(plan.jobs)
    start, end = manifest.start, manifest.end
    ours = window_features(feature_input(jobs, until_ms=epoch_ms(end)), start, end).to_pandas()
    theirs = window_features(read_telemetry_jsonl(result.telemetry_path), start, end).to_pandas()
    assert len(ours) == len(theirs) > 100
    for name in ["api_key_id", "event_timestamp", *DETECTOR_FEATURES]:
        np.testing.assert_array_equal(ours[name].to_numpy(), theirs[name].to_numpy(), name)


def test_the_twins_people_apply_what_a_review_held_back(
    report: ClosedLoopReport,
    trained_with: list[tuple[TrainingParams | None, TrainedDetectors]],
) -> None:
    ((_, trained),) = trained_with
    policy = MitigationPolicy()
    controller = DetectorController(
        trained, policy, active_from=report.train_until, people_delay_s=600
    )
    for held in ("revoke", "challenge"):
        review = Decision(1_000, "k", "review", "weak", {"instead_of": held})
        applied = controller.people_answer(review)
        expected = policy.decide("k", held, 1_000 + 600_000, "x")  # type: ignore[arg-type]
        assert (applied.action, applied.at_ms) == (held, 1_000 + 600_000)
        assert dict(applied.params) == dict(expected.params)
        assert applied.expires_at_ms == expected.expires_at_ms
    throttle = Decision(1_000, "k", "throttle")
    assert controller.people_answer(throttle) is throttle
