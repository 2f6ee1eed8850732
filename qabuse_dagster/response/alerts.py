"""The alert: what an analyst needs to judge one mitigation in seconds.

When the policy engine acts on a key (or would, in shadow mode), the stream worker
writes an `Alert`: the decision and the exact model version behind it, the score
explained (each family's score; the top features with their values, the key's usual
values and their contributions), the key's last hour (a per-minute series of
submissions and failures, and its last jobs), the code-hash cluster it sits in (other
keys and users that ran the same scripts in the last day) and links to the Dagster run,
the MLflow model version and the ledger entries.

The alert is a public record, versioned like the telemetry contract: `ALERT_SCHEMA_PATH`
is its JSON Schema (draft 2020-12), generated from `Alert` (`alert_json_schema`) and
checked against it by the tests, and ``schema_version`` names the version.

Example:
    >>> alert = Alert.model_validate(example_alert())
    >>> alert.action, alert.top_features[0].feature
    ('throttle', 'submissions_5m')
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ALERT_SCHEMA_ID",
    "ALERT_SCHEMA_PATH",
    "ALERT_SCHEMA_VERSION",
    "Alert",
    "ClusterHash",
    "Contribution",
    "FamilyScore",
    "JobSummary",
    "Links",
    "MinuteCounts",
    "alert_id",
    "alert_json_schema",
    "example_alert",
]

ALERT_SCHEMA_VERSION = 1
ALERT_SCHEMA_ID = f"qabuse/alert/v{ALERT_SCHEMA_VERSION}"
ALERT_SCHEMA_PATH = Path(__file__).parent / "schemas" / f"alert.v{ALERT_SCHEMA_VERSION}.schema.json"

_HEX_ID = r"^[0-9a-f]{16,64}$"
_Strict = ConfigDict(extra="forbid", frozen=True)


class FamilyScore(BaseModel):
    """One detector family's part in the ensemble's score."""

    model_config = _Strict

    family: str
    score: float = Field(description="The family's own score (its units; higher is worse).")
    standardised: float = Field(
        description="On the ensemble's common scale: 1.0 is the family's own alert level."
    )
    version: str | None = Field(default=None, description="The family's registry version.")


class Contribution(BaseModel):
    """One feature's part in the explained family's score."""

    model_config = _Strict

    feature: str
    value: float | None = Field(description="Its value in the scored row (null: a sequence).")
    usual: float | None = Field(
        description="The key's usual value: the median of its own rows over the last days, "
        "or the training population's median for a key without history (see usual_from)."
    )
    usual_from: Literal["key", "population", "none"] = "none"
    contribution: float = Field(description="Towards anomalous: larger pushed the score up.")


class MinuteCounts(BaseModel):
    """One minute of the key's last hour."""

    model_config = _Strict

    minute: datetime
    submissions: int = Field(ge=0)
    failures: int = Field(ge=0)


class JobSummary(BaseModel):
    """One of the key's last jobs, at its latest known status."""

    model_config = _Strict

    job_id: str
    status: str
    submitted_at: datetime
    shots: int | None = None
    backend: str | None = None


class ClusterHash(BaseModel):
    """One code hash the key ran, and who else ran it in the last 24 hours."""

    model_config = _Strict

    code_hash: str
    other_keys: int = Field(ge=0, description="Other api keys that ran it.")
    other_users: int = Field(ge=0, description="Other users that ran it.")
    key_ids: list[str] = Field(description="Up to 10 of those keys (hashed ids).")
    user_ids: list[str] = Field(description="Up to 10 of those users (hashed ids).")


class Links(BaseModel):
    """Where to look further."""

    model_config = _Strict

    triage: str | None = Field(default=None, description="The alert on the triage page.")
    dagster_run: str | None = Field(default=None, description="The run that trained the model.")
    mlflow_model_version: str | None = Field(default=None, description="The model version.")
    ledger_seqs: list[int] = Field(
        default_factory=list, description="The ledger entries of this decision."
    )


class Alert(BaseModel):
    """One alert (``schema_version`` 1): a decision, why, and the key's context."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"$id": ALERT_SCHEMA_ID},
    )

    schema_version: Literal[1] = 1
    alert_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="See `alert_id`.")
    created_at: datetime = Field(description="When the alert was written.")
    decided_at: datetime = Field(description="The decision's instant (event time).")
    api_key_id: str = Field(pattern=_HEX_ID)
    user: str | None = Field(default=None, description="The key's user (hashed id).")
    action: str = Field(description="The action taken or proposed: throttle, cap, ...")
    mode: Literal["enforce", "shadow"]
    requires_approval: bool = Field(
        default=False, description="A proposal: a second person must approve it."
    )
    reason: str
    score: float
    threshold: float
    model_name: str
    model_version: str
    feature_service: str | None = None
    stale: bool = Field(default=False, description="The features were older than the bound.")
    family_scores: list[FamilyScore]
    top_family: str | None = Field(description="The family whose score drove the ensemble's.")
    explainer: str = Field(description="How the contributions were computed.")
    top_features: list[Contribution] = Field(max_length=5)
    minutes: list[MinuteCounts] = Field(
        max_length=60, description="The key's last 60 minutes, oldest first."
    )
    recent_jobs: list[JobSummary] = Field(max_length=10, description="Newest first.")
    code_hash_cluster: list[ClusterHash] = Field(max_length=10)
    campaign: dict[str, Any] | None = Field(
        default=None,
        description="The coordinated group the campaign detector places the key in, if any.",
    )
    links: Links = Field(default_factory=Links)

    @property
    def submissions_last_hour(self) -> int:
        return sum(m.submissions for m in self.minutes)

    @property
    def failures_last_hour(self) -> int:
        return sum(m.failures for m in self.minutes)

    def to_json(self) -> str:
        """Compact JSON, the form sinks and the store keep."""
        return self.model_dump_json()


def alert_id(api_key_id: str, action: str, decided_at_ms: int) -> str:
    """A stable id of the alert of one decision: a restart that replays it writes it once.

    >>> alert_id("ab" * 8, "throttle", 60_000) == alert_id("ab" * 8, "throttle", 60_000)
    True
    """
    text = f"{api_key_id}|{action}|{decided_at_ms}".encode()
    return hashlib.sha256(text).hexdigest()[:32]


def alert_json_schema() -> dict[str, Any]:
    """The JSON Schema of `Alert`, as `ALERT_SCHEMA_PATH` holds it."""
    schema = Alert.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": ALERT_SCHEMA_ID,
        "title": f"qabuse alert, version {ALERT_SCHEMA_VERSION}",
        **{k: v for k, v in schema.items() if k not in ("$id", "title")},
    }


def write_alert_schema(path: Path = ALERT_SCHEMA_PATH) -> Path:
    """Regenerate the committed schema file (run after changing `Alert`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(alert_json_schema(), indent=2, sort_keys=True) + "\n")
    return path


def example_alert() -> dict[str, Any]:
    """A small valid alert, as JSON values: the README's example and the tests' seed."""
    decided = datetime(2026, 3, 2, 14, 7, tzinfo=UTC)
    key, user = "3f" * 8, "9a" * 8
    minutes = [
        {
            "minute": datetime.fromtimestamp(decided.timestamp() - 60 * (60 - i), UTC).isoformat(),
            "submissions": 2 if i < 50 else 40,
            "failures": 0 if i < 50 else 3,
        }
        for i in range(60)
    ]
    return {
        "schema_version": ALERT_SCHEMA_VERSION,
        "alert_id": alert_id(key, "throttle", int(decided.timestamp() * 1000)),
        "created_at": decided.isoformat(),
        "decided_at": decided.isoformat(),
        "api_key_id": key,
        "user": user,
        "action": "throttle",
        "mode": "enforce",
        "requires_approval": False,
        "reason": "anomalous score (score 2.310, threshold 1.000)",
        "score": 2.31,
        "threshold": 1.0,
        "model_name": "qabuse-api-key-detector",
        "model_version": "3",
        "feature_service": "api_key_detector_v1",
        "stale": False,
        "family_scores": [
            {"family": "isolation_forest", "score": 0.71, "standardised": 2.9, "version": "3"},
            {"family": "lof", "score": 1.4, "standardised": 1.7, "version": "3"},
        ],
        "top_family": "isolation_forest",
        "explainer": "shap.TreeExplainer",
        "top_features": [
            {
                "feature": "submissions_5m",
                "value": 196.0,
                "usual": 9.0,
                "usual_from": "key",
                "contribution": 0.42,
            }
        ],
        "minutes": minutes,
        "recent_jobs": [
            {
                "job_id": f"job-{i}",
                "status": "completed",
                "submitted_at": decided.isoformat(),
                "shots": 1024,
                "backend": "ibm_torino",
            }
            for i in range(10)
        ],
        "code_hash_cluster": [
            {
                "code_hash": "c0" * 16,
                "other_keys": 0,
                "other_users": 0,
                "key_ids": [],
                "user_ids": [],
            }
        ],
        "campaign": None,
        "links": {"ledger_seqs": [12]},
    }
