"""The base class of every qabuse detector: scikit-learn's contract, pyod's vocabulary.

``fit(X, y=None, groups=None)`` learns normal behaviour, stores the training rows'
scores in ``decision_scores_`` and sets ``threshold_`` through the detector's
`ThresholdStrategy` (`models.thresholds`), given the rows' group ids (api key, UTC day)
when the strategy is a key-day budget. Higher scores are more anomalous. ``explain``
returns per-feature contributions to each row's score.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator

from models.thresholds import Contamination, ThresholdStrategy

#: What a detector reads: rows (entity x features), sequences (entity x minutes x
#: channels) or a graph (co-activity of entities, as rows of campaign features).
InputKind = Literal["rows", "sequences", "graph"]


class BaseDetector(BaseEstimator, ABC):  # type: ignore[misc]
    """An unsupervised anomaly detector: fit on normal-looking history, score new rows.

    Subclasses implement ``_fit`` and ``_score`` (and ``_explain``). Their ``__init__``
    stores its arguments unchanged, as scikit-learn requires, with ``threshold_strategy``
    among them.

    Attributes:
        threshold_strategy: how ``fit`` sets ``threshold_`` (default: 1% contamination).
        decision_scores_: scores of the training rows (set by ``fit``).
        threshold_: scores above it are alerts (set by ``fit`` only).
        score_floor_: the lowest training score: the score of an entity with no input
            (a key without user rows, or without campaign rows).
        n_features_in_: number of feature columns (channels for sequences) seen by ``fit``.
    """

    input_ndim: ClassVar[int] = 2

    def __init__(self, threshold_strategy: ThresholdStrategy | None = None) -> None:
        self.threshold_strategy = threshold_strategy

    def fit(
        self, X: ArrayLike, y: ArrayLike | None = None, groups: ArrayLike | None = None
    ) -> Self:
        """Learn normal behaviour from ``X`` and set ``threshold_`` from its scores.

        Args:
            X: training rows (rows x features; rows x minutes x channels for sequences).
            y: ignored (unsupervised), present for the scikit-learn contract.
            groups: one group id per row, e.g. from `models.thresholds.key_day_groups`,
                for a key-day budget strategy.
        """
        data = self._check_array(X, fitting=True)
        self._fit(data)
        if data.ndim == 2:
            # The typical training row: what an explanation compares a row against.
            self.reference_ = np.median(data, axis=0)
        self.decision_scores_ = self._training_scores(data)
        self.score_floor_ = float(np.min(self.decision_scores_))
        self.threshold_ = float(self._strategy().threshold(self.decision_scores_, groups))
        return self

    def decision_function(self, X: ArrayLike) -> NDArray[np.float64]:
        """Anomaly score of each row: higher means more anomalous."""
        self._check_fitted()
        return self._score(self._check_array(X, fitting=False))

    def predict(self, X: ArrayLike) -> NDArray[np.int_]:
        """1 for rows scoring above ``threshold_`` (alerts), else 0."""
        return (self.decision_function(X) > self.threshold_).astype(np.int_)

    def explain(self, X: ArrayLike) -> NDArray[np.float64]:
        """Per-feature contributions to each row's score (rows x features).

        Larger means the feature pushed the row further towards anomalous; the
        family's own attribution (SHAP values for tree models).
        """
        self._check_fitted()
        return self._explain(self._check_array(X, fitting=False))

    @abstractmethod
    def _fit(self, X: NDArray[np.float64]) -> None: ...

    @abstractmethod
    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]: ...

    @abstractmethod
    def _explain(self, X: NDArray[np.float64]) -> NDArray[np.float64]: ...

    def _strategy(self) -> ThresholdStrategy:
        return self.threshold_strategy or Contamination()

    def _training_scores(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """Scores of the training rows (a family may score them out of sample)."""
        return self._score(X)

    def _check_array(self, X: ArrayLike, *, fitting: bool) -> NDArray[np.float64]:
        data = np.asarray(X, dtype=np.float64)
        shape = "rows x features" if self.input_ndim == 2 else "rows x minutes x channels"
        if data.ndim != self.input_ndim:
            raise ValueError(f"expected a {self.input_ndim}-D array of {shape}, got {data.shape}")
        if data.shape[0] == 0:
            raise ValueError("expected at least one row, got none")
        if not np.isfinite(data).all():
            bad = np.argwhere(~np.isfinite(data))[0]
            raise ValueError(f"features contain NaN or infinite values (first at {bad.tolist()})")
        width = data.shape[-1]
        if fitting:
            self.n_features_in_ = width
        elif width != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} features as in fit, got {width}")
        return data

    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit first")


def signed_log(X: NDArray[np.float64]) -> NDArray[np.float64]:
    """``sign(x) * log1p(|x|)``: counts and rates on a scale where x10 is a step, not a leap."""
    return np.sign(X) * np.log1p(np.abs(X))


def deviation_contributions(
    X: NDArray[np.float64], center: NDArray[np.float64], scale: NDArray[np.float64]
) -> NDArray[np.float64]:
    """How far each feature lies from its training centre, in units of its training spread.

    The attribution of families without one of their own: a row's unusual features are
    those furthest from typical, on the scale the detector saw them.
    """
    return np.abs(X - center) / np.where(scale > 0, scale, 1.0)


def score_floor(detector: BaseDetector) -> float:
    """The detector's lowest training score (`BaseDetector.score_floor_`)."""
    floor = getattr(detector, "score_floor_", None)
    if floor is None:
        floor = float(np.min(detector.decision_scores_))
    return float(floor)
