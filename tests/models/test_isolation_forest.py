"""Isolation Forest detector: estimator contract, extrapolation term, persistence, quality."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score

from models.base import BaseDetector
from models.isolation_forest import IsolationForestDetector, load, save
from models.thresholds import Contamination

N_FEATURES = 4
FAST = {"n_estimators": 50, "random_state": 0}


def _normal(n: int = 2000, seed: int = 0) -> NDArray[np.float64]:
    # Non-negative, count-like features, as window features are.
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(loc=5.0, scale=1.5, size=(n, N_FEATURES)))


@pytest.fixture(scope="module")
def train() -> NDArray[np.float64]:
    return _normal()


@pytest.fixture(scope="module")
def fitted(train: NDArray[np.float64]) -> IsolationForestDetector:
    return IsolationForestDetector(threshold_strategy=Contamination(0.05), **FAST).fit(train)


def test_init_stores_parameters_only() -> None:
    params = {
        "n_estimators": 7,
        "max_samples": 64,
        "random_state": 3,
        "extrapolation_weight": 2.5,
        "threshold_strategy": Contamination(0.2),
    }
    detector = IsolationForestDetector(**params)

    assert vars(detector) == params
    assert set(inspect.signature(IsolationForestDetector).parameters) == set(params)
    assert isinstance(detector, BaseDetector)


def test_fit_returns_self_and_sets_learned_state(train: NDArray[np.float64]) -> None:
    detector = IsolationForestDetector(**FAST)
    assert detector.fit(train) is detector
    assert np.isfinite(detector.threshold_)
    assert detector.n_features_in_ == N_FEATURES
    assert hasattr(detector, "estimator_")


@pytest.mark.parametrize("contamination", [0.0, -0.1, 0.51, 1.0])
def test_fit_rejects_contamination_outside_range(
    train: NDArray[np.float64], contamination: float
) -> None:
    with pytest.raises(ValueError, match="contamination"):
        IsolationForestDetector(threshold_strategy=Contamination(contamination), **FAST).fit(train)


def test_predict_is_binary_and_flags_about_contamination(
    fitted: IsolationForestDetector, train: NDArray[np.float64]
) -> None:
    flags = fitted.predict(train)
    assert set(np.unique(flags)) <= {0, 1}
    assert flags.shape == (len(train),)
    assert abs(flags.mean() - 0.05) <= 0.01
    scores = fitted.decision_function(train)
    np.testing.assert_array_equal(flags, (scores > fitted.threshold_).astype(int))


def test_planted_outliers_score_higher(fitted: IsolationForestDetector) -> None:
    normal = _normal(200, seed=1)
    outliers = _normal(20, seed=2) * 10.0
    assert fitted.decision_function(outliers).min() > np.median(fitted.decision_function(normal))
    assert fitted.predict(outliers).all()


def test_roc_auc_on_planted_outliers() -> None:
    rng = np.random.default_rng(42)
    normal = np.abs(rng.normal(loc=5.0, scale=1.5, size=(2000, N_FEATURES)))
    outliers = np.abs(rng.normal(loc=40.0, scale=5.0, size=(20, N_FEATURES)))
    data = np.vstack([normal, outliers])
    truth = np.r_[np.zeros(len(normal)), np.ones(len(outliers))]
    perm = rng.permutation(len(data))
    data, truth = data[perm], truth[perm]

    detector = IsolationForestDetector(threshold_strategy=Contamination(0.02), **FAST).fit(data)
    assert roc_auc_score(truth, detector.decision_function(data)) >= 0.95
    assert detector.predict(data)[truth == 1].mean() >= 0.9


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.ones((3, N_FEATURES + 1)), "expected 4 features"),
        (np.ones((3, N_FEATURES - 1)), "expected 4 features"),
        (np.array([[np.nan, 1.0, 1.0, 1.0]]), "NaN or infinite"),
        (np.array([[np.inf, 1.0, 1.0, 1.0]]), "NaN or infinite"),
        (np.ones(N_FEATURES), "2-D"),
        (np.ones((1, 1, N_FEATURES)), "2-D"),
        (np.empty((0, N_FEATURES)), "at least one row"),
    ],
)
def test_bad_input_to_scoring_raises(
    fitted: IsolationForestDetector, bad: NDArray[np.float64], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        fitted.decision_function(bad)
    with pytest.raises(ValueError, match=message):
        fitted.predict(bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.array([[np.nan, 1.0], [1.0, 1.0]]), "NaN or infinite"),
        (np.ones(10), "2-D"),
        (np.empty((0, 2)), "at least one row"),
    ],
)
def test_bad_input_to_fit_raises(bad: NDArray[np.float64], message: str) -> None:
    detector = IsolationForestDetector(**FAST)
    with pytest.raises(ValueError, match=message):
        detector.fit(bad)
    assert not hasattr(detector, "threshold_")


def test_unfitted_use_raises() -> None:
    detector = IsolationForestDetector(**FAST)
    with pytest.raises(RuntimeError, match="not fitted"):
        detector.decision_function(np.ones((2, N_FEATURES)))
    with pytest.raises(RuntimeError, match="not fitted"):
        detector.predict(np.ones((2, N_FEATURES)))


def test_rows_beyond_the_training_range_score_higher(
    fitted: IsolationForestDetector, train: NDArray[np.float64]
) -> None:
    edge = train.max(axis=0)
    far = 10.0 * edge
    edge_score, far_score = fitted.decision_function(np.vstack([edge, far]))
    assert far_score > edge_score
    # One feature beyond the range is enough.
    one_far = edge.copy()
    one_far[2] *= 10.0
    assert fitted.decision_function(one_far[None, :])[0] > edge_score
    # Below the range (towards zero on a positive feature) counts too.
    low = train.min(axis=0).copy()
    low_far = low.copy()
    low_far[0] = -10.0 * train[:, 0].max()
    assert fitted.decision_function(low_far[None, :])[0] > fitted.decision_function(low[None, :])[0]


def test_zero_extrapolation_weight_gives_the_bare_forest(
    train: NDArray[np.float64],
) -> None:
    bare = IsolationForestDetector(extrapolation_weight=0.0, **FAST).fit(train)
    weighted = IsolationForestDetector(extrapolation_weight=1.0, **FAST).fit(train)
    probe = np.vstack([train[:50], 10.0 * train.max(axis=0), train.max(axis=0)])

    forest = -bare.estimator_.score_samples(bare.transform(probe))
    np.testing.assert_allclose(bare.decision_function(probe), forest, rtol=0, atol=1e-12)
    # Inside the range the extrapolation term is zero: same scores, same threshold.
    np.testing.assert_allclose(
        weighted.decision_function(train[:50]), bare.decision_function(train[:50])
    )
    assert weighted.threshold_ == pytest.approx(bare.threshold_)
    # The bare forest cannot tell the far row from the edge row; the weighted one can.
    far_bare, edge_bare = bare.decision_function(probe[-2:])
    far_weighted, edge_weighted = weighted.decision_function(probe[-2:])
    assert far_bare == pytest.approx(edge_bare)
    assert far_weighted > edge_weighted


def test_save_and_load_round_trip_without_pickle(
    fitted: IsolationForestDetector, train: NDArray[np.float64], tmp_path: Path
) -> None:
    save(fitted, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detector.json", "estimator.skops"]
    restored = load(tmp_path)
    probe = np.vstack([train[:100], 10.0 * train.max(axis=0)])
    np.testing.assert_array_equal(
        restored.decision_function(probe), fitted.decision_function(probe)
    )
    assert restored.threshold_ == fitted.threshold_
    assert restored.n_estimators == fitted.n_estimators
    assert restored.threshold_strategy == fitted.threshold_strategy


def test_explain_points_at_the_feature_that_is_off(fitted: IsolationForestDetector) -> None:
    row = np.full((1, N_FEATURES), 5.0)
    row[0, 2] = 60.0
    contributions = fitted.explain(row)
    assert contributions.shape == (1, N_FEATURES)
    assert int(np.argmax(contributions[0])) == 2
