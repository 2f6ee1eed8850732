"""The ensemble champion: the families' scores, standardised and combined.

As pyod's ``combination`` module does, each family's score is first put on a common
scale, then combined. The scale is the family's own alert level: a family's score
``s`` becomes ``(s - median) / (reference - median)``, with the median and the
reference (the score at the key-day alert budget) taken from its training scores, so
0 is a typical row and 1 a row at the family's own alert threshold whatever units the
family scores in. The combined score is the mean of the ``top_k`` largest standardised
scores of the row (``top_k=1`` is pyod's *maximization*, all members its *average*):
one family far out still carries the row, while one family's marginal novelty (a
benign tenant doing something new in one family's eyes) needs others to agree. Its
threshold is calibrated with the same key-day budget on the combined scores of rows the
families did not train on (`qabuse_dagster.evaluation.families.calibration_start`).

The explanation names, per row, each family's standardised score; the family with the
largest one drove the alert.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from models.base import BaseDetector
from models.persistence import read_metadata, write_metadata
from models.thresholds import KeyDayBudget, ThresholdStrategy

__all__ = ["EnsembleDetector", "load", "save"]


class EnsembleDetector(BaseDetector):
    """Combines the scores of ``members`` (columns of X, in that order).

    Args:
        members: family names, one per column of the score matrix.
        top_k: how many of a row's largest standardised scores are averaged.
        reference_budget: key-day budget whose family score is the unit (1.0) of each
            standardised score.
        threshold_strategy: how ``fit`` sets the combined threshold (a key-day budget).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> S = rng.normal(size=(1000, 2))
        >>> det = EnsembleDetector(["a", "b"], top_k=1).fit(S)
        >>> bool(det.decision_function([[0.0, 9.0]])[0] > det.threshold_)
        True
    """

    def __init__(
        self,
        members: Sequence[str] = (),
        top_k: int = 3,
        reference_budget: float = 0.01,
        threshold_strategy: ThresholdStrategy | None = None,
    ) -> None:
        super().__init__(threshold_strategy)
        self.members = members
        self.top_k = top_k
        self.reference_budget = reference_budget

    def fit(
        self, X: ArrayLike, y: ArrayLike | None = None, groups: ArrayLike | None = None
    ) -> EnsembleDetector:
        self._groups = groups
        try:
            return super().fit(X, y, groups)
        finally:
            del self._groups

    def _fit(self, X: NDArray[np.float64]) -> None:
        if X.shape[1] != len(self.members):
            raise ValueError(f"{X.shape[1]} score columns for {len(self.members)} members")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        budget = KeyDayBudget(self.reference_budget)
        self.center_ = np.median(X, axis=0)
        reference = np.array([budget.threshold(X[:, j], self._groups) for j in range(X.shape[1])])
        spread = reference - self.center_
        # A family whose alert level equals its median (constant scores) gets unit spread.
        self.scale_ = np.where(spread > 1e-12, spread, 1.0)

    def standardise(self, X: ArrayLike) -> NDArray[np.float64]:
        """Each family's score on the common scale (rows x members)."""
        self._check_fitted()
        data = self._check_array(X, fitting=False)
        return np.asarray((data - self.center_) / self.scale_, dtype=np.float64)

    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        return combine(np.asarray((X - self.center_) / self.scale_), self.top_k)

    def _explain(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray((X - self.center_) / self.scale_, dtype=np.float64)


def combine(standardised: NDArray[np.float64], top_k: int) -> NDArray[np.float64]:
    """The mean of each row's ``top_k`` largest standardised scores.

    >>> combine(np.array([[0.0, 4.0, 1.0], [1.0, 1.0, 1.0]]), 2).tolist()
    [2.5, 1.0]
    """
    k = min(top_k, standardised.shape[1])
    largest = -np.partition(-standardised, k - 1, axis=1)[:, :k]
    return np.asarray(largest.mean(axis=1), dtype=np.float64)


def save(detector: BaseDetector, directory: Path) -> None:
    write_metadata(detector, directory, state=("center_", "scale_"))


def load(directory: Path) -> EnsembleDetector:
    detector, _ = read_metadata(directory, EnsembleDetector)
    detector.members = tuple(detector.members)
    return detector
