"""Request and response shapes of the scoring endpoint, shared by service and client."""

from __future__ import annotations

from pydantic import BaseModel, Field

from qabuse_dagster.telemetry.contract import HEX_HASH_PATTERN

HEX_ID_PATTERN = HEX_HASH_PATTERN


class FeatureContribution(BaseModel):
    """One feature's part in a family's score."""

    feature: str
    contribution: float = Field(description="The family's own attribution (SHAP for trees).")
    value: float | None = Field(
        description="The feature's value (null for a sequence channel).",
        json_schema_extra={"nullable": True},
    )


class ScoreResponse(BaseModel):
    """What ``POST /score`` answers."""

    api_key_id: str
    score: float = Field(description="Anomaly score; higher is more anomalous.")
    anomalous: bool = Field(
        description="score > threshold and the key asked for service in its last hour "
        "(demand): the key should be mitigated."
    )
    threshold: float
    model_name: str
    model_version: str = Field(description="The exact registry version that scored.")
    feature_service: str = Field(description="The Feast feature services read (comma-separated).")
    family_scores: dict[str, float] = Field(
        description="Each detector family's own score (its units; higher is more anomalous)."
    )
    family_standardised: dict[str, float] = Field(
        description="Each family's score on the ensemble's common scale: 1.0 is the family's "
        "own alert level. The ensemble score is the mean of the largest few of them."
    )
    family_versions: dict[str, str] = Field(description="Registry version of each family.")
    top_family: str = Field(description="The family with the largest standardised score.")
    top_features: list[FeatureContribution] = Field(
        description="The features that drove the top family's score, largest first."
    )
    features: dict[str, float] = Field(description="The online scalar feature values used.")
    demand: bool = Field(
        default=True,
        description="The key submitted (or failed to authenticate) in the hour its features "
        "cover. Without demand its features only report older jobs finishing: it is "
        "never anomalous, there is nothing to mitigate.",
    )
    stale: bool = Field(
        description="The features are older than the staleness bound (QABUSE_ONLINE_MAX_AGE_S): "
        "the key was scored anyway, on what it did then, not now."
    )
    feature_age_s: float | None = Field(
        description="Seconds since the event time of the oldest feature used that the "
        "stream worker keeps current (all of them when none is); null when the store gave "
        "no event time. `stale` is judged on it.",
        # BentoML publishes only the first branch of anyOf; say that null is allowed.
        json_schema_extra={"nullable": True},
    )
    batch_feature_age_s: float | None = Field(
        default=None,
        description="Seconds since the event time of the oldest feature used that only the "
        "batch job writes (the campaign graph views): as fresh as the last "
        "materialisation; null when the model reads none or the store holds none.",
        json_schema_extra={"nullable": True},
    )
