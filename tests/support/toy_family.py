"""A toy detector family, added the way a deployment adds one: this module and its registration.

Its score is the key's submission rate in units of the training rows' typical rate:
nothing else in qabuse knows of it. ``QABUSE_DETECTOR_MODULES=tests.support.toy_family``
makes every process (the scoring server included) import and register it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from models import BaseDetector
from models.persistence import read_metadata, write_metadata
from models.registry import DetectorFamily, register_family, unregister_family
from models.thresholds import ThresholdStrategy

NAME = "toy_rate"
FEATURES = ("submissions_1m", "submissions_per_min_5m")


class ToyRateDetector(BaseDetector):
    """Submissions per minute over their typical (median + spread) training value."""

    def __init__(
        self, spread_floor: float = 1.0, threshold_strategy: ThresholdStrategy | None = None
    ):
        super().__init__(threshold_strategy)
        self.spread_floor = spread_floor

    def _fit(self, X: NDArray[np.float64]) -> None:
        self.center_ = np.median(X, axis=0)
        self.spread_ = np.maximum(np.quantile(X, 0.9, axis=0) - self.center_, self.spread_floor)

    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray(((X - self.center_) / self.spread_).max(axis=1), dtype=np.float64)

    def _explain(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray((X - self.center_) / self.spread_, dtype=np.float64)


def save(detector: BaseDetector, directory: Path) -> None:
    write_metadata(detector, directory, state=("center_", "spread_"))
    (directory / "toy.json").write_text(json.dumps({"family": NAME}))


def load(directory: Path) -> ToyRateDetector:
    detector, _ = read_metadata(directory, ToyRateDetector)
    return detector


FAMILY = register_family(
    DetectorFamily(
        name=NAME,
        input_kind="rows",
        entity="api_key",
        feature_service="api_key_isolation_forest_v1",
        feature_names=FEATURES,
        detector=ToyRateDetector,
        save=save,
        load=load,
        description="Toy: the key's submission rate against the typical training rate.",
    )
)


@contextlib.contextmanager
def registered() -> Iterator[str]:
    """The family registered for a test, and taken out again after it (yields its name).

    Importing this module registers it once per process; a test that leaves it registered
    would add it to every later test's families, in whatever order a worker runs them.
    """
    register_family(FAMILY)
    try:
        yield NAME
    finally:
        unregister_family(NAME)
