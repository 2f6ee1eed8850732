"""Timing: the Isolation Forest over how a key's submissions are spread in time, and only that.

Bots are regular and never sleep; people are bursty and keep hours. A key polling every
few minutes around the clock is unremarkable in volume, cost or failures, so among two
dozen features its rhythm is a small part of any distance; on the timing features alone
it is far from everyone. This family reads inter-arrival regularity over the last hour
and the last day (on a log scale, see `features.definitions`), the hours of the day a
key is active, its daily volume and its burstiness.
"""

from __future__ import annotations

from models.isolation_forest import IsolationForestDetector, load, save
from models.registry import DetectorFamily, register_family

TIMING_FEATURES = (
    "interarrival_regularity_1h",
    "interarrival_regularity_24h",
    "active_hours_24h",
    "submissions_24h",
    "submissions_per_min_1h",
    "burstiness_1h",
)

FAMILY = register_family(
    DetectorFamily(
        name="timing_isolation_forest",
        input_kind="rows",
        entity="api_key",
        feature_service="api_key_timing_v1",
        feature_names=TIMING_FEATURES,
        detector=IsolationForestDetector,
        save=save,
        load=load,
        description="Isolation Forest over the api key's rhythm: inter-arrival regularity "
        "over the hour and the day, "
        "active hours of the day, daily volume, burstiness.",
        params={"n_estimators": 200, "random_state": 0},
    )
)
