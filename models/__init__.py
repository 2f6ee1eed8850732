"""Detectors: pure machine learning, no Dagster, Feast or MLflow.

Every detector follows scikit-learn's estimator contract and pyod's vocabulary:
higher score means more anomalous, ``threshold_`` separates alerts from the rest.
"""

from models.base import BaseDetector
from models.baseline import TutorialBaselineDetector
from models.isolation_forest import IsolationForestDetector

__all__ = ["BaseDetector", "IsolationForestDetector", "TutorialBaselineDetector"]
