"""One-Class SVM family: the estimator contract, planted outliers, fast scoring, storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from models.base import signed_log
from models.ocsvm import OneClassSvmDetector, load, save
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
    train = _counts(rng, 5_000)
    normal = _counts(rng, 1_000)
    outliers = _counts(rng, 30)
    outliers[np.arange(30), rng.integers(0, 4, 30)] += 200.0
    return train, np.vstack([normal, outliers]), np.r_[np.zeros(1_000), np.ones(30)]


@pytest.fixture(scope="module")
def fitted(planted: tuple[np.ndarray, np.ndarray, np.ndarray]) -> OneClassSvmDetector:
    train, _, _ = planted
    return OneClassSvmDetector(n_components=100, threshold_strategy=Contamination(0.01)).fit(train)


def _pipeline_scores(detector: OneClassSvmDetector, X: np.ndarray) -> np.ndarray:
    """scikit-learn's own pipeline: -decision_function, plus the beyond-the-range term."""
    data = signed_log(X)
    scaled = detector.estimator_["scale"].transform(data)
    beyond = np.clip(scaled - detector.high_, 0, None) + np.clip(detector.low_ - scaled, 0, None)
    span = detector.high_ - detector.low_
    beyond = beyond / np.where(span > 0, span, 1.0)  # in units of the training range
    margin = detector.estimator_.decision_function(data)
    return -margin + detector.extrapolation_weight * beyond.sum(axis=1)


def test_planted_outliers_rank_first(
    fitted: OneClassSvmDetector, planted: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    _, X, y = planted
    assert roc_auc_score(y, fitted.decision_function(X)) >= 0.95
    assert fitted.predict(X)[y == 1].mean() >= 0.8
    assert fitted.predict(X)[y == 0].mean() <= 0.05


def test_farther_beyond_the_training_range_scores_higher(fitted: OneClassSvmDetector) -> None:
    rows = np.array([[6.0, 20.0, 7.4, 0.09]] * 3)
    rows[1, 0], rows[2, 0] = 1e3, 1e6
    low, mid, high = fitted.decision_function(rows)
    assert low < mid < high


@pytest.mark.parametrize("weight", [0.0, 1.0, 2.5])
def test_fast_scores_equal_scikit_learns_pipeline(
    weight: float, planted: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    train, X, _ = planted
    detector = OneClassSvmDetector(n_components=50, extrapolation_weight=weight).fit(train)
    rows = np.vstack([X, train[:100]])
    np.testing.assert_allclose(
        detector.decision_function(rows), _pipeline_scores(detector, rows), rtol=1e-9, atol=1e-9
    )


def test_fast_scores_equal_scikit_learns_across_chunks(fitted: OneClassSvmDetector) -> None:
    rows = _counts(np.random.default_rng(1), (1 << 14) * 2 + 3)
    np.testing.assert_allclose(
        fitted.decision_function(rows), _pipeline_scores(fitted, rows), rtol=1e-9, atol=1e-9
    )


def test_the_estimator_contract(fitted: OneClassSvmDetector) -> None:
    params = fitted.get_params()
    assert params["n_components"] == 100 and params["threshold_strategy"] == Contamination(0.01)
    fresh = clone(fitted).set_params(nu=0.1)
    assert fresh.nu == 0.1 and not hasattr(fresh, "threshold_")
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.predict(np.zeros((1, 4)))
    assert fitted.n_features_in_ == 4 and len(fitted.decision_scores_) == 5_000
    with pytest.raises(ValueError, match="2-D"):
        fitted.decision_function(np.zeros(4))


def test_training_rows_are_subsampled_with_a_seed() -> None:
    train = _counts(np.random.default_rng(2), 3_000)
    one = OneClassSvmDetector(n_components=20, max_train_rows=500, random_state=4).fit(train)
    two = OneClassSvmDetector(n_components=20, max_train_rows=500, random_state=4).fit(train)
    assert one.threshold_ == two.threshold_
    assert len(one.decision_scores_) == 3_000  # the threshold still sees every row
    tiny = OneClassSvmDetector(n_components=200).fit(train[:30])
    assert tiny.estimator_["kernel"].components_.shape[0] == 30


def test_explain_points_at_the_feature_that_moved(fitted: OneClassSvmDetector) -> None:
    row = np.array([[6.0, 20.0, 7.4, 0.09]])
    moved = row.copy()
    moved[0, 2] = 5_000.0
    contributions = fitted.explain(np.vstack([row, moved]))
    assert contributions.shape == (2, 4)
    assert (contributions >= 0).all()
    assert np.argmax(contributions[1]) == 2


def test_save_and_load_round_trip(
    fitted: OneClassSvmDetector,
    planted: tuple[np.ndarray, np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    _, X, _ = planted
    save(fitted, tmp_path / "ocsvm")
    loaded = load(tmp_path / "ocsvm")
    assert loaded.get_params() == fitted.get_params()
    assert loaded.threshold_ == fitted.threshold_
    np.testing.assert_array_equal(loaded.low_, fitted.low_)
    np.testing.assert_array_equal(loaded.decision_function(X), fitted.decision_function(X))


def test_the_registered_family_builds_this_detector() -> None:
    family = get_family("ocsvm")
    detector = family.build(KeyDayBudget(0.01))
    assert isinstance(detector, OneClassSvmDetector)
    assert detector.threshold_strategy == KeyDayBudget(0.01)
    assert family.input_kind == "rows" and family.entity == "api_key"
