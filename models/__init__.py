"""Detectors: pure machine learning, no Dagster, Feast or MLflow.

Every detector follows scikit-learn's estimator contract and pyod's vocabulary:
higher score means more anomalous, ``threshold_`` separates alerts from the rest and
is set inside ``fit`` by a threshold strategy. Detector families are registered in
`models.registry`; the ensemble champion combines them (`models.ensemble`).
"""

from models.base import BaseDetector
from models.baseline import TutorialBaselineDetector
from models.ensemble import EnsembleDetector
from models.isolation_forest import IsolationForestDetector
from models.registry import DetectorFamily, families, get_family, register_family
from models.thresholds import Contamination, KeyDayBudget, key_day_groups

__all__ = [
    "BaseDetector",
    "Contamination",
    "DetectorFamily",
    "EnsembleDetector",
    "IsolationForestDetector",
    "KeyDayBudget",
    "TutorialBaselineDetector",
    "families",
    "get_family",
    "key_day_groups",
    "register_family",
]
