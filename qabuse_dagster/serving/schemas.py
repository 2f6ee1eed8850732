"""Request and response shapes of the scoring endpoint, shared by service and client."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from qabuse_dagster.telemetry.contract import HEX_HASH_PATTERN

HEX_ID_PATTERN = HEX_HASH_PATTERN
#: Keys one ``POST /score/batch`` may ask for: a request is answered whole, so its size
#: bounds how long it holds a worker (about a millisecond a key) and its answer's size.
MAX_BATCH_KEYS = 256

ApiKeyId = Annotated[
    str,
    Field(
        pattern=HEX_ID_PATTERN,
        description="Keyed hash of the API key's id, as in the telemetry contract.",
        examples=["0123456789abcdef" * 4],
    ),
]
UserId = Annotated[
    str | None,
    Field(
        pattern=HEX_ID_PATTERN,
        description="Keyed hash of the submitting user, when the caller knows it: "
        "the user-level family then scores the user's rows too.",
        json_schema_extra={"nullable": True},
    ),
]


class ScoreRequest(BaseModel):
    """One key to score, as ``POST /score`` takes it."""

    api_key_id: ApiKeyId
    user: UserId = None


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


class BatchScoreResponse(BaseModel):
    """What ``POST /score/batch`` answers."""

    answers: list[ScoreResponse] = Field(
        description="One answer per key the online store holds features for, in the order "
        "asked; each is what POST /score answers for that key."
    )
    not_online: list[str] = Field(
        description="The keys asked for that have no online features (POST /score answers "
        "them 404), in the order asked."
    )
