"""The ensemble champion: families' scores on their own alert scale, then combined."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone

from models.ensemble import EnsembleDetector, load, save
from models.thresholds import KeyDayBudget

ROWS_PER_KEY_DAY = 50


@pytest.fixture(scope="module")
def scores() -> tuple[np.ndarray, np.ndarray]:
    """Two families' scores in very different units, over 1,000 key-days, and the key-days."""
    rng = np.random.default_rng(0)
    n = 1_000 * ROWS_PER_KEY_DAY
    forest = 0.4 + 0.05 * rng.standard_normal(n)  # an Isolation Forest-like score
    gru = rng.lognormal(mean=3.0, sigma=0.5, size=n)  # a reconstruction error
    return np.column_stack([forest, gru]), np.repeat(np.arange(1_000), ROWS_PER_KEY_DAY)


@pytest.fixture(scope="module")
def ensemble(scores: tuple[np.ndarray, np.ndarray]) -> EnsembleDetector:
    S, groups = scores
    return EnsembleDetector(
        ["isolation_forest", "gru_autoencoder"], top_k=1, threshold_strategy=KeyDayBudget(0.01)
    ).fit(S, groups=groups)


def test_each_family_is_standardised_at_its_own_alert_level(
    ensemble: EnsembleDetector, scores: tuple[np.ndarray, np.ndarray]
) -> None:
    S, groups = scores
    median = np.median(S, axis=0)
    reference = np.array([KeyDayBudget(0.01).threshold(S[:, j], groups) for j in range(2)])
    standard = ensemble.standardise(np.vstack([median, reference]))
    np.testing.assert_allclose(standard[0], [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(standard[1], [1.0, 1.0], rtol=1e-12)


def test_top_1_is_the_largest_standardised_score(
    ensemble: EnsembleDetector, scores: tuple[np.ndarray, np.ndarray]
) -> None:
    S, _ = scores
    rows = S[:500]
    standard = ensemble.standardise(rows)
    np.testing.assert_allclose(ensemble.decision_function(rows), standard.max(axis=1))
    np.testing.assert_allclose(ensemble.explain(rows), standard)


@pytest.mark.parametrize("top_k", [1, 2, 3, 10])
def test_top_k_averages_the_largest_standardised_scores(top_k: int) -> None:
    rng = np.random.default_rng(7)
    S = rng.normal(size=(3_000, 4)) * [1.0, 10.0, 0.1, 3.0]
    detector = EnsembleDetector(["a", "b", "c", "d"], top_k=top_k).fit(S)
    standard = detector.standardise(S[:200])
    largest = np.sort(standard, axis=1)[:, ::-1][:, : min(top_k, 4)]
    np.testing.assert_allclose(detector.decision_function(S[:200]), largest.mean(axis=1))


def test_top_k_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="top_k"):
        EnsembleDetector(["a"], top_k=0).fit(np.zeros((10, 1)))


def test_a_strong_anomaly_in_one_member_alerts(
    ensemble: EnsembleDetector, scores: tuple[np.ndarray, np.ndarray]
) -> None:
    S, _ = scores
    typical = np.median(S, axis=0)
    forest_only = [S[:, 0].max() + 0.3, typical[1]]
    gru_only = [typical[0], S[:, 1].max() * 5]
    assert ensemble.predict([typical, forest_only, gru_only]).tolist() == [0, 1, 1]
    assert np.argmax(ensemble.explain([forest_only])[0]) == 0
    assert np.argmax(ensemble.explain([gru_only])[0]) == 1


def test_the_threshold_keeps_the_key_day_budget_on_fresh_scores(
    ensemble: EnsembleDetector,
) -> None:
    """Adding families must not add benign alerts: fresh key-days alert about the budget."""
    rng = np.random.default_rng(1)
    n = 2_000 * ROWS_PER_KEY_DAY
    fresh = np.column_stack(
        [0.4 + 0.05 * rng.standard_normal(n), rng.lognormal(mean=3.0, sigma=0.5, size=n)]
    )
    alerts = ensemble.predict(fresh).reshape(-1, ROWS_PER_KEY_DAY).any(axis=1)
    assert alerts.mean() <= 3 * 0.01
    # The maximum is at least each member's score: no lower than any member's alert level.
    assert ensemble.threshold_ >= 1.0 - 1e-9


def test_a_constant_member_gets_unit_scale() -> None:
    rng = np.random.default_rng(2)
    S = np.column_stack([rng.normal(size=2_000), np.full(2_000, 3.0)])
    detector = EnsembleDetector(["a", "constant"]).fit(S)
    assert detector.scale_[1] == 1.0
    assert np.isfinite(detector.decision_function(S)).all()


def test_score_columns_must_match_the_members() -> None:
    with pytest.raises(ValueError, match="3 score columns for 2 members"):
        EnsembleDetector(["a", "b"]).fit(np.zeros((10, 3)))


def test_the_estimator_contract(ensemble: EnsembleDetector) -> None:
    params = ensemble.get_params()
    assert params["members"] == ["isolation_forest", "gru_autoencoder"]
    assert params["top_k"] == 1
    assert params["reference_budget"] == 0.01
    fresh = clone(ensemble)
    assert not hasattr(fresh, "threshold_")
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.decision_function([[0.0, 0.0]])
    assert not hasattr(ensemble, "_groups")  # the fit-time group ids are not kept


def test_save_and_load_round_trip_without_pickle(
    ensemble: EnsembleDetector, scores: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    S, _ = scores
    save(ensemble, tmp_path / "ensemble")
    for path in (tmp_path / "ensemble").iterdir():
        json.loads(path.read_text())  # every stored file is JSON text: nothing to unpickle
    loaded = load(tmp_path / "ensemble")
    assert loaded.members == ("isolation_forest", "gru_autoencoder")
    assert loaded.top_k == ensemble.top_k
    assert loaded.threshold_ == ensemble.threshold_
    assert loaded.threshold_strategy == ensemble.threshold_strategy
    np.testing.assert_array_equal(
        loaded.decision_function(S[:1000]), ensemble.decision_function(S[:1000])
    )


def test_load_refuses_another_detector(tmp_path: Path) -> None:
    from models.isolation_forest import IsolationForestDetector
    from models.isolation_forest import save as save_forest

    rows = np.random.default_rng(3).normal(size=(300, 2))
    save_forest(IsolationForestDetector(n_estimators=5).fit(rows), tmp_path / "forest")
    with pytest.raises(ValueError, match=r"not a models\.ensemble\.EnsembleDetector"):
        load(tmp_path / "forest")
