"""Feast feature services: the exact feature set each model version reads.

A service is versioned with the model that reads it and never changes once a model
depends on it: a model with other inputs gets a new service (``_v2``), and the old one
stays for the models registered against it.
"""

from feast import FeatureService, FeatureView
from feature_views import (
    api_key_1h_fv,
    api_key_1m_fv,
    api_key_5m_fv,
    api_key_sequence_fv,
    user_1h_fv,
    user_1m_fv,
    user_5m_fv,
)

from qabuse_dagster.features.definitions import DETECTOR_FEATURES


def _detector_inputs(view: FeatureView) -> FeatureView:
    """The projection of ``view`` onto the detector's features, in `DETECTOR_FEATURES` order."""
    names = {field.name for field in view.features}
    return view[[name for name in DETECTOR_FEATURES if name in names]]


api_key_detector_v1 = FeatureService(
    name="api_key_detector_v1",
    # The 9 inputs of the Isolation Forest detector, exactly: its models were trained on
    # these, so the service stays as it is while the views widen.
    features=[_detector_inputs(view) for view in (api_key_1m_fv, api_key_5m_fv, api_key_1h_fv)],
    description="Features of the per-api-key anomaly detector, version 1.",
    tags={"entity": "api_key"},
)

api_key_features_v2 = FeatureService(
    name="api_key_features_v2",
    features=[api_key_1m_fv, api_key_5m_fv, api_key_1h_fv],
    description="Every window feature of an api key (1 minute, 5 minutes, 1 hour): the "
    "inputs of the next api-key models.",
    tags={"entity": "api_key"},
)

api_key_sequence_v1 = FeatureService(
    name="api_key_sequence_v1",
    features=[api_key_sequence_fv],
    description="An api key's last 60 minutes of per-minute counts: the input of the "
    "sequence (GRU autoencoder) detector, version 1.",
    tags={"entity": "api_key"},
)

user_features_v1 = FeatureService(
    name="user_features_v1",
    features=[user_1m_fv, user_5m_fv, user_1h_fv],
    description="Every window feature of a user (1 minute, 5 minutes, 1 hour).",
    tags={"entity": "user"},
)
