"""Isolation Forest detector: the first, fast baseline of qabuse."""

from __future__ import annotations

from typing import Self

import numpy as np
from numpy.typing import NDArray
from sklearn.ensemble import IsolationForest
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler

from models.base import BaseDetector
from models.fast_forest import CompiledForest


class IsolationForestDetector(BaseDetector):
    """Isolation Forest over window features.

    Rows that few random splits isolate score high. Counts and rates are
    log-transformed first (``log1p`` of the magnitude, sign kept) so that a key
    doing 60 jobs a minute is not only "a bit more" than one doing 6.

    An Isolation Forest cannot rank rows beyond its training range: every split is
    drawn inside it, so a key at ten times the busiest benign rate lands in the same
    leaf, and gets the same score, as the busiest benign row. The score therefore
    adds ``extrapolation_weight`` times the distance beyond the training range,
    summed over features, in units of each feature's training range (zero for any
    row inside it, so the threshold, set on training rows, is the forest's own).

    Args:
        n_estimators: number of trees.
        max_samples: rows drawn per tree (int) or share of rows (float), as in scikit-learn.
        contamination: expected anomalous share of training rows; sets ``threshold_``.
        random_state: seed for the forest.
        extrapolation_weight: weight of the beyond-the-range term; 0 gives the bare forest.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> normal = rng.normal(size=(500, 3))
        >>> det = IsolationForestDetector(random_state=0).fit(normal)
        >>> bool(det.decision_function([[8.0, 8.0, 8.0]])[0] > det.threshold_)
        True
        >>> edge, far = det.decision_function([[3.0, 0.0, 0.0], [30.0, 0.0, 0.0]])
        >>> bool(far > edge)
        True
    """

    def __init__(
        self,
        n_estimators: int = 200,
        max_samples: int | float | str = "auto",
        contamination: float = 0.01,
        random_state: int | None = 0,
        extrapolation_weight: float = 1.0,
    ) -> None:
        super().__init__(contamination=contamination)
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.random_state = random_state
        self.extrapolation_weight = extrapolation_weight

    @staticmethod
    def transform(X: NDArray[np.float64]) -> NDArray[np.float64]:
        """The signed log scaling applied before the forest sees the rows."""
        return np.sign(X) * np.log1p(np.abs(X))

    def _fit(self, X: NDArray[np.float64]) -> None:
        # The scaler does not change the forest (splits are scale-free); it records each
        # feature's training range for the extrapolation term, in a type skops trusts.
        self.estimator_ = Pipeline(
            [
                ("range", MinMaxScaler()),
                (
                    "forest",
                    IsolationForest(
                        n_estimators=self.n_estimators,
                        max_samples=self.max_samples,
                        random_state=self.random_state,
                    ),
                ),
            ]
        ).fit(self.transform(X))
        self._compiled: CompiledForest | None = None

    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        scaled = self.estimator_["range"].transform(self.transform(X))
        compiled = getattr(self, "_compiled", None)
        if compiled is None:
            # A cache of estimator_, rebuilt after fit or load; equals sklearn's scores.
            compiled = self._compiled = CompiledForest(self.estimator_["forest"])
        # score_samples is higher for normal rows; negate so higher means anomalous.
        forest = -compiled.score_samples(scaled)
        beyond = np.clip(scaled - 1.0, 0.0, None) + np.clip(-scaled, 0.0, None)
        return forest + self.extrapolation_weight * beyond.sum(axis=1)

    @classmethod
    def from_fitted(
        cls,
        estimator: Pipeline,
        threshold: float,
        n_features: int,
        extrapolation_weight: float = 1.0,
    ) -> Self:
        """Rebuild a detector around a pipeline loaded from the model registry."""
        forest = estimator["forest"]
        detector = cls(
            n_estimators=forest.n_estimators,
            max_samples=forest.max_samples,
            random_state=forest.random_state,
            extrapolation_weight=extrapolation_weight,
        )
        detector.estimator_ = estimator
        detector.threshold_ = float(threshold)
        detector.n_features_in_ = int(n_features)
        return detector
