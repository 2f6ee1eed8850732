"""Local Outlier Factor: rows in sparse neighbourhoods of the key's peers score high."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sklearn.neighbors import LocalOutlierFactor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import RobustScaler

from models.base import BaseDetector, signed_log
from models.features import COMPACT_FEATURES
from models.persistence import load_skops, save_skops
from models.registry import DetectorFamily, register_family
from models.thresholds import ThresholdStrategy

#: Types a stored LOF needs beyond skops' defaults (its neighbour index).
_CHUNK = 1 << 16
TRUSTED_TYPES = (
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
)


class LocalOutlierFactorDetector(BaseDetector):
    """Local Outlier Factor (``novelty=True``) over signed-log, robust-scaled window features.

    A row's score is its local outlier factor against the training rows: about 1 inside
    a cluster of peers, higher the sparser its neighbourhood is relative to its
    neighbours'. Training rows are deduplicated first (busy entities repeat rows
    exactly, and ties of zero distance make densities infinite) and subsampled to
    ``max_train_rows`` (seeded), so fitting and scoring stay within seconds.

    Args:
        n_neighbors: neighbours defining a row's neighbourhood.
        max_train_rows: distinct training rows kept at most.
        random_state: seed of the subsample.
        threshold_strategy: how ``fit`` sets ``threshold_``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> det = LocalOutlierFactorDetector(n_neighbors=20).fit(rng.normal(5, 1, (500, 2)))
        >>> bool(det.decision_function([[30.0, 30.0]])[0] > det.threshold_)
        True
    """

    def __init__(
        self,
        n_neighbors: int = 20,
        max_train_rows: int = 5_000,
        random_state: int | None = 0,
        threshold_strategy: ThresholdStrategy | None = None,
    ) -> None:
        super().__init__(threshold_strategy)
        self.n_neighbors = n_neighbors
        self.max_train_rows = max_train_rows
        self.random_state = random_state

    def _fit(self, X: NDArray[np.float64]) -> None:
        distinct = np.unique(signed_log(X), axis=0)
        if len(distinct) > self.max_train_rows:
            rng = np.random.default_rng(self.random_state)
            distinct = distinct[rng.choice(len(distinct), self.max_train_rows, replace=False)]
        if len(distinct) < 2:
            raise ValueError("LOF needs at least 2 distinct training rows")
        neighbours = min(self.n_neighbors, len(distinct) - 1)
        self.estimator_ = Pipeline(
            [
                ("scale", RobustScaler(quantile_range=(5.0, 95.0))),
                (
                    "lof",
                    LocalOutlierFactor(
                        n_neighbors=neighbours, novelty=True, algorithm="kd_tree", leaf_size=40
                    ),
                ),
            ]
        ).fit(distinct)

    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        # scikit-learn's novelty LOF, computed on its fitted state without its per-call
        # validation (a single row in microseconds, for /score); equal to -score_samples.
        scale, lof = self.estimator_["scale"], self.estimator_["lof"]
        scaled = (signed_log(X) - scale.center_) / scale.scale_
        out = np.empty(len(scaled), dtype=np.float64)
        for lo in range(0, len(scaled), _CHUNK):
            dist, idx = lof._tree.query(scaled[lo : lo + _CHUNK], k=lof.n_neighbors_)
            k_dist = lof._distances_fit_X_[idx, lof.n_neighbors_ - 1]
            lrd = 1.0 / (np.maximum(dist, k_dist).mean(axis=1) + 1e-10)
            out[lo : lo + _CHUNK] = lof._lrd[idx].mean(axis=1) / lrd
        return out

    def _explain(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """Each feature's squared distance from the mean of the row's training neighbours."""
        scaled = self.estimator_["scale"].transform(signed_log(X))
        lof = self.estimator_["lof"]
        _, idx = lof._tree.query(scaled, k=lof.n_neighbors_)
        neighbours = lof._fit_X[idx].mean(axis=1)
        return np.asarray((scaled - neighbours) ** 2, dtype=np.float64)


def save(detector: BaseDetector, directory: Path) -> None:
    save_skops(detector, directory)


def load(directory: Path) -> LocalOutlierFactorDetector:
    return load_skops(directory, LocalOutlierFactorDetector, TRUSTED_TYPES)


FAMILY = register_family(
    DetectorFamily(
        name="lof",
        input_kind="rows",
        entity="api_key",
        feature_service="api_key_lof_v1",
        feature_names=COMPACT_FEATURES,
        detector=LocalOutlierFactorDetector,
        save=save,
        load=load,
        description="Local Outlier Factor (novelty) over a compact set of the api key's "
        "window features.",
        params={"n_neighbors": 20, "max_train_rows": 5_000, "random_state": 0},
    )
)
