"""Input drift: PSI and Jensen-Shannon distance against reference bins stored as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qabuse_dagster.evaluation.drift import (
    EMPTY_SHARE,
    PSI_ERROR,
    PSI_WARN,
    drift_level,
    entity_weights,
    feature_drift,
    population_stability_index,
    reference_bins,
)


@pytest.fixture(scope="module")
def training() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    n = 20_000
    return pd.DataFrame(
        {
            "shots": rng.lognormal(7.0, 1.0, n),  # heavy-tailed
            "failures": rng.poisson(0.3, n).astype(float),  # mostly zeros: ties
            "regularity": rng.normal(0.0, 0.3, n),
        }
    )


def test_the_same_population_is_stable_and_a_shifted_one_is_not(training: pd.DataFrame) -> None:
    reference = reference_bins(training, training.columns)
    rng = np.random.default_rng(4)
    n = 10_000
    same = pd.DataFrame(
        {
            "shots": rng.lognormal(7.0, 1.0, n),
            "failures": rng.poisson(0.3, n).astype(float),
            "regularity": rng.normal(0.0, 0.3, n),
        }
    )
    drift = feature_drift(reference, same)
    assert list(drift.index) == list(training.columns)
    assert (drift["psi"] < PSI_WARN / 2).all()
    assert (drift["level"] == "ok").all()
    assert (drift["js_distance"] < 0.05).all()
    assert (drift["rows"] == n).all()

    # A new backend: shots ten times larger for everyone; a slight move of regularity.
    shifted = same.assign(shots=same["shots"] * 10, regularity=same["regularity"] + 0.1)
    drift = feature_drift(reference, shifted)
    assert drift.loc["shots", "level"] == "error"
    assert drift.loc["shots", "psi"] > PSI_ERROR
    assert drift.loc["shots", "js_distance"] > 0.5
    assert drift.loc["regularity", "level"] == "warn"
    assert drift.loc["failures", "level"] == "ok"


def test_psi_is_the_textbook_sum_with_empty_bins_floored() -> None:
    r, c = [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]
    expected = (0.4 - 0.5) * math.log(0.4 / 0.5) + (0.4 - 0.3) * math.log(0.4 / 0.3)
    assert population_stability_index(r, c) == pytest.approx(expected, rel=1e-12)
    assert population_stability_index(r, r) == 0.0
    # An emptied bin counts as EMPTY_SHARE: large, but finite.
    emptied = population_stability_index([0.5, 0.5], [1.0, 0.0])
    assert math.isfinite(emptied) and emptied > PSI_ERROR
    assert emptied == pytest.approx(
        (1.0 - 0.5) * math.log(2.0) + (EMPTY_SHARE - 0.5) * math.log(EMPTY_SHARE / 0.5)
    )
    with pytest.raises(ValueError, match="different bins"):
        population_stability_index([0.5, 0.5], [1.0])


def test_ties_collapse_the_deciles_and_shares_sum_to_one(training: pd.DataFrame) -> None:
    reference = reference_bins(training, ["failures", "shots"])
    failures = reference["failures"]
    assert len(failures["edges"]) < 9  # 0, 1, 2 ... not ten distinct deciles
    assert len(failures["shares"]) == len(failures["edges"]) + 1
    for bins in reference.values():
        assert sum(bins["shares"]) == pytest.approx(1.0)
    assert len(reference["shots"]["edges"]) == 9
    assert all(share == pytest.approx(0.1, abs=0.01) for share in reference["shots"]["shares"])


def test_a_reference_read_back_from_json_gives_the_same_drift(training: pd.DataFrame) -> None:
    reference = reference_bins(training, training.columns)
    again = json.loads(json.dumps(reference))
    current = training.sample(5000, random_state=1).assign(shots=lambda f: f["shots"] * 3)
    pd.testing.assert_frame_equal(feature_drift(reference, current), feature_drift(again, current))


def test_missing_values_and_malformed_input_are_reported_clearly(training: pd.DataFrame) -> None:
    reference = reference_bins(training, ["shots"])
    with_gaps = pd.DataFrame({"shots": [np.nan, np.inf, 1000.0, 2000.0]})
    assert feature_drift(reference, with_gaps).loc["shots", "rows"] == 2
    empty = feature_drift(reference, pd.DataFrame({"shots": [np.nan]}))
    assert math.isnan(empty.loc["shots", "psi"]) and empty.loc["shots", "level"] == "ok"
    with pytest.raises(ValueError, match="'shots' is not a column"):
        feature_drift(reference, pd.DataFrame({"other": [1.0]}))
    with pytest.raises(ValueError, match="no finite value"):
        reference_bins(pd.DataFrame({"x": [np.nan, np.nan]}), ["x"])
    with pytest.raises(ValueError, match="n_bins"):
        reference_bins(training, ["shots"], n_bins=1)
    assert feature_drift({}, training).empty


def test_levels_follow_the_customary_psi_bands() -> None:
    assert [drift_level(v) for v in (0.0, 0.099, 0.1, 0.2499, 0.25, 3.0)] == [
        "ok",
        "ok",
        "warn",
        "warn",
        "error",
        "error",
    ]
    assert drift_level(float("nan")) == "ok"
    assert drift_level(0.15, warn=0.2, error=0.3) == "ok"
    with pytest.raises(ValueError, match="must not exceed"):
        drift_level(0.1, warn=0.3, error=0.2)


def test_feature_drift_reads_levels_at_the_given_bounds(training: pd.DataFrame) -> None:
    reference = reference_bins(training, ["shots"])
    shifted = training.assign(shots=training["shots"] * 1.3)
    psi = feature_drift(reference, shifted).loc["shots", "psi"]
    assert (
        feature_drift(reference, shifted, warn=psi / 2, error=psi * 2).loc["shots", "level"]
        == "warn"
    )
    assert feature_drift(reference, shifted, warn=0.0, error=0.0).loc["shots", "level"] == "error"
    assert (
        feature_drift(reference, shifted, warn=psi + 1, error=psi + 2).loc["shots", "level"] == "ok"
    )
    with pytest.raises(ValueError, match="must not exceed"):
        feature_drift(reference, shifted, warn=0.3, error=0.2)


def _keys(n_keys: int, rows_each: int, rate: float, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "api_key_id": np.repeat([f"k{rate}-{i}" for i in range(n_keys)], rows_each),
            "rate": rng.normal(rate, 0.2, n_keys * rows_each),
        }
    )


def test_one_busy_key_is_one_key_not_the_populations_drift() -> None:
    rng = np.random.default_rng(5)
    quiet = _keys(200, 20, 1.0, rng)  # 200 keys, 20 rows each
    reference = reference_bins(quiet, ["rate"], weights=entity_weights(quiet))
    later = _keys(200, 20, 1.0, rng)
    # One runaway script: a row a minute for a day, far from everyone else.
    attacked = pd.concat([later, _keys(1, 1440, 8.0, rng)], ignore_index=True)
    by_rows = feature_drift(reference, attacked)
    by_keys = feature_drift(reference, attacked, weights=entity_weights(attacked))
    assert by_rows.loc["rate", "level"] == "error"  # 26% of the rows moved
    assert by_keys.loc["rate", "psi"] < PSI_WARN  # 1 key in 201
    # Most keys moving is drift, however it is weighed.
    shifted = _keys(200, 20, 2.0, rng)
    moved = feature_drift(reference, shifted, weights=entity_weights(shifted))
    assert moved.loc["rate", "level"] == "error"
    with pytest.raises(ValueError, match="3 weights for"):
        feature_drift(reference, shifted, weights=[1.0, 1.0, 1.0])


def test_the_newest_row_time_reads_the_newest_hour(tmp_path: Path) -> None:
    from qabuse_dagster.evaluation.drift import newest_row_time

    assert newest_row_time(tmp_path / "missing") is None
    hours = pd.date_range("2026-11-02 10:00", periods=3, freq="h", tz="UTC")
    for hour in hours:
        rows = pd.DataFrame(
            {"api_key_id": ["k", "k"], "event_timestamp": [hour, hour + pd.Timedelta(minutes=59)]}
        )
        rows.to_parquet(tmp_path / f"{hour:%Y-%m-%d-%H}.parquet")
    assert newest_row_time(tmp_path) == (hours[-1] + pd.Timedelta(minutes=59)).to_pydatetime()
