"""The compiled forest must give scikit-learn's Isolation Forest scores exactly."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from models.fast_forest import CHUNK_ROWS, CompiledForest, _kernel, average_path_length


@pytest.mark.parametrize(
    ("max_features", "max_samples", "n_features"),
    [(1.0, "auto", 5), (0.6, 128, 9), (1.0, 64, 1)],
)
def test_scores_equal_sklearn(max_features: float, max_samples: object, n_features: int) -> None:
    rng = np.random.default_rng(7)
    train = rng.normal(size=(3000, n_features))
    forest = IsolationForest(
        n_estimators=60, max_features=max_features, max_samples=max_samples, random_state=3
    ).fit(train)
    # Beyond the training range, at it, and a batch larger than one chunk.
    probe = np.vstack([rng.normal(size=(CHUNK_ROWS + 17, n_features)) * 4, train[:5]])
    np.testing.assert_allclose(
        CompiledForest(forest).score_samples(probe), forest.score_samples(probe), atol=1e-12
    )


def test_single_row_and_constant_column() -> None:
    rng = np.random.default_rng(1)
    train = np.column_stack([rng.normal(size=500), np.full(500, 3.0)])
    forest = IsolationForest(n_estimators=30, random_state=0).fit(train)
    row = np.array([[10.0, 3.0]])
    assert CompiledForest(forest).score_samples(row)[0] == pytest.approx(
        forest.score_samples(row)[0], abs=1e-12
    )


def test_the_compiled_kernel_and_the_numpy_walk_agree() -> None:
    assert _kernel() is not None  # numba is installed (it comes with shap): /score uses it
    rng = np.random.default_rng(5)
    forest = IsolationForest(n_estimators=40, max_samples=100, random_state=1).fit(
        rng.normal(size=(800, 4))
    )
    compiled = CompiledForest(forest)
    probe = rng.normal(size=(300, 4)) * 3
    np.testing.assert_allclose(
        compiled.score_samples(probe), compiled._score_chunk_numpy(probe), atol=1e-12
    )


def test_average_path_length_matches_the_paper() -> None:
    values = average_path_length(np.array([0.0, 1.0, 2.0, 256.0]))
    expected_256 = 2 * (np.log(255) + np.euler_gamma) - 2 * 255 / 256
    np.testing.assert_allclose(values, [0.0, 0.0, 1.0, expected_256])
