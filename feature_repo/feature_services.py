"""Feast feature services: the exact feature set each model version reads."""

from feast import FeatureService
from feature_views import api_key_1m_fv, api_key_5m_fv

api_key_detector_v1 = FeatureService(
    name="api_key_detector_v1",
    features=[api_key_1m_fv, api_key_5m_fv],
    description="Features of the per-api-key anomaly detector, version 1.",
)
