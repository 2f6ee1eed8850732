"""Train on history, score the rest: the functions every detector family is trained through."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from models.registry import get_family
from qabuse_dagster.evaluation.closed_loop import feature_input
from qabuse_dagster.evaluation.families import (
    ENSEMBLE,
    WARM_UP,
    DetectorInputs,
    TrainedDetectors,
    TrainingParams,
    calibration_start,
    detector_inputs,
    fit_family,
    train_then_score,
    warmed_up,
)
from qabuse_dagster.simulation.jobs import Horizon
from qabuse_dagster.simulation.twin import DEFAULT_START, build_plan, shared_queue
from qabuse_dagster.telemetry.hashing import KeyedHasher

#: Cheap families of both entities: the mechanics do not need the slow ones.
NAMES = ("isolation_forest", "lof", "user_isolation_forest")
HOURS = 72


@pytest.fixture(scope="module")
def inputs() -> DetectorInputs:
    """Three simulated days (the twin's jobs, as its telemetry records, without the file)."""
    horizon = Horizon(start=DEFAULT_START, end=DEFAULT_START + timedelta(hours=HOURS))
    plan = build_plan(
        horizon, seed=11, hasher=KeyedHasher(b"families-test-hash-key-0123456789"), scenarios=None
    )
    records = feature_input(shared_queue(plan.jobs), until_ms=horizon.end_ms)
    return detector_inputs(records, NAMES)


@pytest.fixture(scope="module")
def trained(inputs: DetectorInputs) -> TrainedDetectors:
    params = TrainingParams(overrides={"isolation_forest": {"n_estimators": 50}})
    return train_then_score(inputs, DEFAULT_START + timedelta(hours=60), params)


def test_scored_rows_have_a_score_and_an_alert_per_detector(trained: TrainedDetectors) -> None:
    columns = set(trained.scored.columns)
    assert {*NAMES, ENSEMBLE} <= columns
    assert {f"{name}_alert" for name in (*NAMES, ENSEMBLE)} <= columns
    assert set(trained.thresholds()) == {*NAMES, ENSEMBLE}
    for name, threshold in trained.thresholds().items():
        assert np.isfinite(trained.scored[name]).all()
        expected = trained.scored[name] > threshold
        assert (trained.scored[f"{name}_alert"] == expected).all(), name
    frame = trained.scored_for(ENSEMBLE)
    assert list(frame.columns) == ["api_key_id", "event_timestamp", "score", "alert"]
    assert len(frame) == len(trained.scored)


def test_only_rows_after_the_cutoff_are_scored(
    inputs: DetectorInputs, trained: TrainedDetectors
) -> None:
    assert (trained.scored["event_timestamp"] >= trained.cutoff).all()
    after = inputs.key_rows["event_timestamp"] >= trained.cutoff
    assert len(trained.scored) == int(after.sum()) > 0


def test_under_three_days_of_history_the_ensemble_is_calibrated_in_sample(
    inputs: DetectorInputs, trained: TrainedDetectors
) -> None:
    # 60 h before the cutoff: too little to split into training and calibration days.
    assert calibration_start(inputs, trained.cutoff) == trained.cutoff
    stamps = trained.train_scores["event_timestamp"]
    assert (stamps < trained.cutoff).all()
    assert stamps.min() == inputs.key_rows["event_timestamp"].min()  # every row before it
    assert trained.train_rows == len(trained.train_scores) > 0
    assert trained.ensemble is not None
    assert tuple(trained.ensemble.members) == NAMES


def test_overrides_reach_their_family(trained: TrainedDetectors) -> None:
    assert trained.detectors["isolation_forest"].get_params()["n_estimators"] == 50
    family = get_family("user_isolation_forest")
    assert (
        trained.detectors["user_isolation_forest"].get_params()["n_estimators"]
        == family.params["n_estimators"]
    )


def test_the_seed_reaches_every_family(inputs: DetectorInputs) -> None:
    """``TrainingParams.random_state`` is documented as the seed of every family."""
    cutoff = DEFAULT_START + timedelta(hours=40)
    detector = fit_family(get_family("lof"), inputs, cutoff, TrainingParams(random_state=7))
    assert detector.get_params()["random_state"] == 7


def test_user_scores_reach_each_key_of_the_user(
    inputs: DetectorInputs, trained: TrainedDetectors
) -> None:
    """A key row gets the highest score of its users' rows at the same instant."""
    name = "user_isolation_forest"
    detector = trained.detectors[name]
    users = inputs.user_rows[inputs.user_rows["event_timestamp"] >= trained.cutoff]
    X = users[list(get_family(name).feature_names)].to_numpy(dtype=np.float64)
    per_user = users[["user", "event_timestamp"]].assign(expected=detector.decision_function(X))
    expected = (
        per_user.merge(inputs.key_users, on="user")
        .groupby(["api_key_id", "event_timestamp"])["expected"]
        .max()
        .reset_index()
    )
    joined = trained.scored[["api_key_id", "event_timestamp", name]].merge(
        expected, on=["api_key_id", "event_timestamp"], how="left"
    )
    have_user_row = joined["expected"].notna()
    assert have_user_row.mean() > 0.9
    np.testing.assert_allclose(
        joined.loc[have_user_row, name], joined.loc[have_user_row, "expected"]
    )
    # A key row without a user row at its instant gets the family's lowest training score.
    assert (joined.loc[~have_user_row, name] == detector.score_floor_).all()


def _tiny_inputs(first: datetime, last: datetime) -> DetectorInputs:
    stamps = pa.array([first, last], pa.timestamp("us", tz="UTC"))
    return DetectorInputs(
        telemetry=pa.table({"timestamp": stamps}), start=first, end=last, family_names=()
    )


def test_calibration_start_with_short_and_long_history() -> None:
    first = datetime(2026, 5, 1, tzinfo=UTC)
    inputs = _tiny_inputs(first, first + timedelta(days=10))
    warm = TrainingParams(warm_up=WARM_UP)
    short = first + WARM_UP + timedelta(days=2, hours=20)
    assert calibration_start(inputs, short, warm) == short
    long = first + WARM_UP + timedelta(days=3)
    assert calibration_start(inputs, long, warm) == first + WARM_UP + timedelta(days=2)
    half = TrainingParams(calibration_fraction=0.5, warm_up=WARM_UP)
    assert calibration_start(inputs, long, half) == first + WARM_UP + timedelta(days=1.5)
    none = TrainingParams(calibration_fraction=0.0, warm_up=WARM_UP)
    assert calibration_start(inputs, long, none) == long
    # Without a warm-up the slice is a third of the whole history before the cutoff.
    assert calibration_start(inputs, long) == long - (long - first) / 3


def test_warmed_up_drops_the_first_day(caplog: pytest.LogCaptureFixture) -> None:
    first = datetime(2026, 5, 1, tzinfo=UTC)
    inputs = _tiny_inputs(first, first + timedelta(days=2))
    stamps = pd.date_range(first, first + timedelta(hours=47), freq="h", tz="UTC")
    rows = pd.DataFrame({"api_key_id": "k", "event_timestamp": stamps})
    warm = TrainingParams(warm_up=WARM_UP)
    assert len(warmed_up(inputs, rows)) == 48  # no warm-up by default
    kept = warmed_up(inputs, rows, warm)
    assert kept["event_timestamp"].min() == first + WARM_UP
    assert len(kept) == 24
    with caplog.at_level(logging.WARNING):
        early = warmed_up(inputs, rows[rows["event_timestamp"] < first + WARM_UP], warm)
    assert len(early) == 24  # nothing warmed up: the first day rather than nothing
    assert "warming up" in caplog.text


def test_no_history_before_the_cutoff_is_an_error(inputs: DetectorInputs) -> None:
    with pytest.raises(ValueError, match="no training rows before"):
        fit_family(get_family("isolation_forest"), inputs, DEFAULT_START)


@pytest.mark.parametrize(
    "changes",
    [{"alert_budget": 0.0}, {"alert_budget": 1.0}, {"calibration_fraction": 1.0}],
)
def test_training_params_outside_their_range_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must lie in"):
        TrainingParams(**changes)  # type: ignore[arg-type]


def test_rows_without_demand_in_their_hour_are_neither_learnt_nor_scored() -> None:
    from qabuse_dagster.features.definitions import has_demand
    from qabuse_dagster.features.windows import INPUT_TYPES

    schema = pa.schema([(name, INPUT_TYPES[name]) for name in INPUT_TYPES])
    t0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

    def record(key: str, job: str, minutes: float, status: str, **extra: object) -> dict:
        base = dict.fromkeys(schema.names)
        base.update(api_key_id=key, user=f"u-{key}", job_id=job, status=status, shots=100)
        base.update(timestamp=t0 + timedelta(minutes=minutes), backend="ibm_torino", **extra)
        return base

    records = [
        # A job that waits two hours in the queue: its outcome arrives with no demand.
        record("queued", "j1", 0.0, "submitted"),
        record("queued", "j1", 120.0, "completed", runtime_s=2.0),
        # Failed logins are demand, though nothing was submitted.
        record("stuffer", "j2", 120.0, "failed", error_code="auth_failed"),
    ]
    telemetry = pa.Table.from_pylist(records, schema=schema)
    inputs = detector_inputs(
        telemetry, ("isolation_forest",), t0 - timedelta(hours=1), t0 + timedelta(hours=3)
    )
    rows = inputs.key_rows
    queued = rows.loc[rows["api_key_id"] == "queued", "event_timestamp"]
    assert queued.min() == t0 + timedelta(minutes=1)  # the rows after its submission
    assert queued.max() < t0 + timedelta(minutes=61)  # none once the hour holds no demand
    stuffer = rows.loc[rows["api_key_id"] == "stuffer", "event_timestamp"]
    assert stuffer.min() == t0 + timedelta(minutes=121)
    assert has_demand(rows).all()
