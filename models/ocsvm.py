"""One-Class SVM that scales: a Nystroem kernel approximation and ``SGDOneClassSVM``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import SGDOneClassSVM
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import RobustScaler

from models.base import BaseDetector, deviation_contributions, signed_log
from models.features import ROW_FEATURES
from models.persistence import load_skops, save_skops
from models.registry import DetectorFamily, register_family
from models.thresholds import ThresholdStrategy

TRUSTED_TYPES: tuple[str, ...] = ()
_CHUNK = 1 << 14


class OneClassSvmDetector(BaseDetector):
    """A linear One-Class SVM on an RBF kernel's Nystroem features: O(n) to fit and score.

    The RBF kernel vanishes far from every training row, so the SVM alone scores every
    distant row alike; as for the forest, the score adds ``extrapolation_weight`` times
    the row's distance beyond the training range (in units of that range), zero inside it.

    Args:
        nu: upper bound on the share of training rows outside the learned support.
        n_components: Nystroem landmarks (kernel approximation rank).
        gamma: RBF width, on robust-scaled signed-log features (None: 1 / features).
        max_train_rows: training rows kept at most (seeded subsample).
        random_state: seed of the subsample, the landmarks and SGD.
        extrapolation_weight: weight of the beyond-the-range term.
        threshold_strategy: how ``fit`` sets ``threshold_``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> det = OneClassSvmDetector(n_components=50).fit(rng.normal(5, 1, (1000, 3)))
        >>> bool(det.decision_function([[20.0, 20.0, 20.0]])[0] > det.threshold_)
        True
    """

    def __init__(
        self,
        nu: float = 0.05,
        n_components: int = 200,
        gamma: float | None = None,
        max_train_rows: int = 50_000,
        random_state: int | None = 0,
        extrapolation_weight: float = 1.0,
        threshold_strategy: ThresholdStrategy | None = None,
    ) -> None:
        super().__init__(threshold_strategy)
        self.nu = nu
        self.n_components = n_components
        self.gamma = gamma
        self.max_train_rows = max_train_rows
        self.random_state = random_state
        self.extrapolation_weight = extrapolation_weight

    def _fit(self, X: NDArray[np.float64]) -> None:
        data = signed_log(X)
        if len(data) > self.max_train_rows:
            rng = np.random.default_rng(self.random_state)
            data = data[rng.choice(len(data), self.max_train_rows, replace=False)]
        gamma = self.gamma if self.gamma is not None else 1.0 / data.shape[1]
        self.estimator_ = Pipeline(
            [
                ("scale", RobustScaler(quantile_range=(5.0, 95.0))),
                (
                    "kernel",
                    Nystroem(
                        gamma=gamma,
                        n_components=min(self.n_components, len(data)),
                        random_state=self.random_state,
                    ),
                ),
                ("svm", SGDOneClassSVM(nu=self.nu, random_state=self.random_state, tol=1e-4)),
            ]
        ).fit(data)
        scaled = self.estimator_["scale"].transform(data)
        self.low_, self.high_ = scaled.min(axis=0), scaled.max(axis=0)

    def _beyond(self, scaled: NDArray[np.float64]) -> NDArray[np.float64]:
        # In units of each feature's training range, as the forest's term: a rare event
        # (a feature at 0 in nearly every row) is not a leap because its spread is 0.
        span = np.where(self.high_ - self.low_ > 0, self.high_ - self.low_, 1.0)
        beyond = np.clip(scaled - self.high_, 0.0, None) + np.clip(self.low_ - scaled, 0.0, None)
        return np.asarray(beyond / span, dtype=np.float64)

    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        # The pipeline's decision function on its fitted state, without scikit-learn's
        # per-call validation (a single row in microseconds, for /score), in chunks so
        # the kernel features of a million rows never sit in memory at once.
        scale, kernel, svm = (self.estimator_[step] for step in ("scale", "kernel", "svm"))
        landmarks = kernel.components_
        landmark_sq = (landmarks**2).sum(axis=1)
        weights = kernel.normalization_.T @ svm.coef_.ravel()
        out = np.empty(len(X), dtype=np.float64)
        for lo in range(0, len(X), _CHUNK):
            scaled = (signed_log(X[lo : lo + _CHUNK]) - scale.center_) / scale.scale_
            sq = (scaled**2).sum(axis=1)[:, None] - 2.0 * scaled @ landmarks.T + landmark_sq
            k = np.exp(-kernel.gamma * np.maximum(sq, 0.0))
            margin = k @ weights - svm.offset_[0]
            out[lo : lo + _CHUNK] = -margin + self.extrapolation_weight * self._beyond(scaled).sum(
                axis=1
            )
        return out

    def _explain(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """Each feature's robust-scaled distance from typical, plus its beyond-range term."""
        scaled = self.estimator_["scale"].transform(signed_log(X))
        typical = deviation_contributions(
            scaled, np.zeros(scaled.shape[1]), np.ones(scaled.shape[1])
        )
        return typical + self.extrapolation_weight * self._beyond(scaled)


def save(detector: BaseDetector, directory: Path) -> None:
    save_skops(detector, directory, state=("low_", "high_"))


def load(directory: Path) -> OneClassSvmDetector:
    return load_skops(directory, OneClassSvmDetector, TRUSTED_TYPES)


FAMILY = register_family(
    DetectorFamily(
        name="ocsvm",
        input_kind="rows",
        entity="api_key",
        feature_service="api_key_ocsvm_v1",
        feature_names=ROW_FEATURES,
        detector=OneClassSvmDetector,
        save=save,
        load=load,
        description="One-Class SVM (Nystroem RBF features + SGDOneClassSVM) over the api "
        "key's window features.",
        params={"nu": 0.05, "n_components": 200, "random_state": 0},
    )
)
