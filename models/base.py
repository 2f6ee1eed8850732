"""The base class every qabuse detector shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self

import numpy as np
from numpy.typing import ArrayLike, NDArray


class BaseDetector(ABC):
    """An unsupervised anomaly detector: fit on normal-looking history, score new rows.

    Subclasses implement ``_fit`` and ``_score``. ``fit`` then sets ``threshold_``
    to the ``1 - contamination`` quantile of the training scores, so ``predict``
    flags about ``contamination`` of rows like the training data.

    Attributes:
        contamination: expected share of anomalous rows in training data, in (0, 0.5].
        threshold_: scores above it are alerts (set by ``fit``).
        n_features_in_: number of feature columns seen by ``fit``.
    """

    def __init__(self, contamination: float = 0.01) -> None:
        self.contamination = contamination

    def fit(self, X: ArrayLike) -> Self:
        """Learn normal behaviour from ``X`` (rows x features) and set ``threshold_``."""
        if not 0.0 < self.contamination <= 0.5:
            raise ValueError(f"contamination must be in (0, 0.5], got {self.contamination}")
        data = self._check_array(X, fitting=True)
        self._fit(data)
        train_scores = self._score(data)
        self.threshold_ = float(np.quantile(train_scores, 1.0 - self.contamination))
        return self

    def decision_function(self, X: ArrayLike) -> NDArray[np.float64]:
        """Anomaly score of each row: higher means more anomalous."""
        self._check_fitted()
        return self._score(self._check_array(X, fitting=False))

    def predict(self, X: ArrayLike) -> NDArray[np.int_]:
        """1 for rows scoring above ``threshold_`` (alerts), else 0."""
        return (self.decision_function(X) > self.threshold_).astype(np.int_)

    @abstractmethod
    def _fit(self, X: NDArray[np.float64]) -> None: ...

    @abstractmethod
    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]: ...

    def _check_array(self, X: ArrayLike, *, fitting: bool) -> NDArray[np.float64]:
        data = np.asarray(X, dtype=np.float64)
        if data.ndim != 2:
            raise ValueError(f"expected a 2-D array of rows x features, got shape {data.shape}")
        if data.shape[0] == 0:
            raise ValueError("expected at least one row, got none")
        if not np.isfinite(data).all():
            raise ValueError("features contain NaN or infinite values")
        if fitting:
            self.n_features_in_ = data.shape[1]
        elif data.shape[1] != self.n_features_in_:
            raise ValueError(
                f"expected {self.n_features_in_} features as in fit, got {data.shape[1]}"
            )
        return data

    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit first")
