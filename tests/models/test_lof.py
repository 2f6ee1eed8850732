"""Local Outlier Factor family: the estimator contract, planted outliers, fast scoring, storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from models.base import signed_log
from models.lof import TRUSTED_TYPES, LocalOutlierFactorDetector, load, save
from models.persistence import load_skops
from models.registry import get_family
from models.thresholds import Contamination, KeyDayBudget


def _counts(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows like window features: non-negative rates and counts of a few magnitudes."""
    return np.column_stack(
        [rng.gamma(2.0, 3.0, n), rng.poisson(20, n), rng.lognormal(2.0, 0.3, n), rng.beta(2, 20, n)]
    )


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal training rows, and test rows with 30 planted outliers (label 1)."""
    rng = np.random.default_rng(0)
    train = _counts(rng, 3_000)
    normal = _counts(rng, 1_000)
    outliers = _counts(rng, 30)
    outliers[:, rng.integers(0, 4, 30)] *= 0  # each outlier loses one signal ...
    outliers[np.arange(30), rng.integers(0, 4, 30)] += 200.0  # ... and another explodes
    X = np.vstack([normal, outliers])
    return train, X, np.r_[np.zeros(1_000), np.ones(30)]


@pytest.fixture(scope="module")
def fitted(planted: tuple[np.ndarray, np.ndarray, np.ndarray]) -> LocalOutlierFactorDetector:
    train, _, _ = planted
    return LocalOutlierFactorDetector(threshold_strategy=Contamination(0.01)).fit(train)


def test_planted_outliers_rank_first(
    fitted: LocalOutlierFactorDetector, planted: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    _, X, y = planted
    scores = fitted.decision_function(X)
    assert roc_auc_score(y, scores) >= 0.95
    assert fitted.predict(X)[y == 1].mean() >= 0.8
    assert fitted.predict(X)[y == 0].mean() <= 0.05


def test_fast_scores_equal_scikit_learns_pipeline(
    fitted: LocalOutlierFactorDetector, planted: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    train, X, _ = planted
    rows = np.vstack([X, train[:200]])  # training rows too: zero distances to themselves
    ours = fitted.decision_function(rows)
    theirs = -fitted.estimator_.score_samples(signed_log(rows))
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)


def test_fast_scores_equal_scikit_learns_across_chunks() -> None:
    rng = np.random.default_rng(1)
    detector = LocalOutlierFactorDetector(n_neighbors=5, max_train_rows=500).fit(_counts(rng, 500))
    rows = _counts(rng, (1 << 16) + 7)
    ours = detector.decision_function(rows)
    theirs = -detector.estimator_.score_samples(signed_log(rows))
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)


def test_the_estimator_contract(fitted: LocalOutlierFactorDetector) -> None:
    params = fitted.get_params()
    assert params["n_neighbors"] == 20 and params["threshold_strategy"] == Contamination(0.01)
    fresh = clone(fitted).set_params(n_neighbors=5)
    assert fresh.n_neighbors == 5 and not hasattr(fresh, "threshold_")
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.decision_function(np.zeros((1, 4)))
    assert fitted.n_features_in_ == 4
    assert len(fitted.decision_scores_) == 3_000
    with pytest.raises(ValueError, match="expected 4 features"):
        fitted.decision_function(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fitted.decision_function(np.full((1, 4), np.nan))


def test_duplicate_rows_do_not_make_densities_infinite() -> None:
    rng = np.random.default_rng(2)
    busy = np.tile([[3.0, 20.0, 7.0, 0.1]], (2_000, 1))  # one key repeating its row
    train = np.vstack([busy, _counts(rng, 300)])
    detector = LocalOutlierFactorDetector().fit(train)
    scores = detector.decision_function(train)
    assert np.isfinite(scores).all() and np.isfinite(detector.threshold_)


def test_training_rows_are_deduplicated_and_subsampled_with_a_seed() -> None:
    rng = np.random.default_rng(3)
    train = _counts(rng, 2_000)
    one = LocalOutlierFactorDetector(max_train_rows=400, random_state=7).fit(train)
    two = LocalOutlierFactorDetector(max_train_rows=400, random_state=7).fit(train)
    assert one.estimator_["lof"].n_samples_fit_ == 400
    assert one.threshold_ == two.threshold_
    small = LocalOutlierFactorDetector(n_neighbors=50).fit(train[:10])
    assert small.estimator_["lof"].n_neighbors_ == 9
    with pytest.raises(ValueError, match="2 distinct"):
        LocalOutlierFactorDetector().fit(np.ones((20, 4)))


def test_explain_points_at_the_feature_that_moved(fitted: LocalOutlierFactorDetector) -> None:
    row = np.array([[6.0, 20.0, 7.4, 0.09]])
    moved = row.copy()
    moved[0, 1] = 400.0
    contributions = fitted.explain(np.vstack([row, moved]))
    assert contributions.shape == (2, 4)
    assert (contributions >= 0).all()
    assert np.argmax(contributions[1]) == 1


def test_save_and_load_round_trip(
    fitted: LocalOutlierFactorDetector,
    planted: tuple[np.ndarray, np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    _, X, _ = planted
    save(fitted, tmp_path / "lof")
    loaded = load(tmp_path / "lof")
    assert loaded.get_params() == fitted.get_params()
    assert loaded.threshold_ == fitted.threshold_
    np.testing.assert_array_equal(loaded.decision_function(X), fitted.decision_function(X))
    np.testing.assert_array_equal(loaded.explain(X[:5]), fitted.explain(X[:5]))


def test_load_trusts_only_the_types_the_family_names(
    fitted: LocalOutlierFactorDetector, tmp_path: Path
) -> None:
    save(fitted, tmp_path / "lof")
    with pytest.raises(ValueError, match="does not trust"):
        load_skops(tmp_path / "lof", LocalOutlierFactorDetector, TRUSTED_TYPES[:1])


def test_the_registered_family_builds_this_detector() -> None:
    family = get_family("lof")
    detector = family.build(KeyDayBudget(0.01))
    assert isinstance(detector, LocalOutlierFactorDetector)
    assert family.input_kind == "rows" and family.entity == "api_key"
    assert len(family.feature_names) < len(get_family("isolation_forest").feature_names)
