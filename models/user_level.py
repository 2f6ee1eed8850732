"""User-level detection: the Isolation Forest over the *user* entity's window rows.

Abuse spread over one user's keys (each key quiet, the user busy) shows on the user's
rows. A user's score is given to each api key the user submits with, so user-level
alerts are judged, served and mitigated per key like the others.
"""

from __future__ import annotations

from models.features import ROW_FEATURES
from models.isolation_forest import IsolationForestDetector, load, save
from models.registry import DetectorFamily, register_family

FAMILY = register_family(
    DetectorFamily(
        name="user_isolation_forest",
        input_kind="rows",
        entity="user",
        feature_service="user_isolation_forest_v1",
        feature_names=ROW_FEATURES,
        detector=IsolationForestDetector,
        save=save,
        load=load,
        description="Isolation Forest over the user's window features (all of the user's "
        "keys together); each key gets its user's score.",
        params={"n_estimators": 200, "random_state": 0},
    )
)
