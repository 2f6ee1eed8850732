"""Request and response shapes of the scoring endpoint, shared by service and client."""

from __future__ import annotations

from pydantic import BaseModel, Field

from qabuse_dagster.telemetry.contract import HEX_HASH_PATTERN

HEX_ID_PATTERN = HEX_HASH_PATTERN


class ScoreResponse(BaseModel):
    """What ``POST /score`` answers."""

    api_key_id: str
    score: float = Field(description="Anomaly score; higher is more anomalous.")
    anomalous: bool = Field(description="score > threshold: the key should be mitigated.")
    threshold: float
    model_name: str
    model_version: str = Field(description="The exact registry version that scored.")
    feature_service: str
    features: dict[str, float] = Field(description="The online feature values used.")
    stale: bool = Field(
        description="The features are older than the staleness bound (QABUSE_ONLINE_MAX_AGE_S): "
        "the key was scored anyway, on what it did then, not now."
    )
    feature_age_s: float | None = Field(
        description="Seconds since the event time of the oldest feature used; null when "
        "the store gave no event time.",
        # BentoML publishes only the first branch of anyOf; say that null is allowed.
        json_schema_extra={"nullable": True},
    )
