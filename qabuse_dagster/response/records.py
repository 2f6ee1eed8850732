"""What the decision ledger holds: one entry per step that changes a key's access or billing.

An entry is a mitigation taken or proposed (a :data:`~qabuse_dagster.response.decisions.ACTIONS`
action) or a step of the workflow around one (:data:`WORKFLOW_EVENTS`: an approval, a
denial, an appeal and its outcome, a label, an escalation). It records who did it, why,
and what the model saw: the score, the model name and version, the feature service and
the feature values. The ledger (:mod:`qabuse_dagster.response.ledger`) stores entries append-only,
each chained to the previous one by hash.

Example:
    >>> entry = LedgerEntry(at_ms=60_000, api_key_id="ab" * 8, action="throttle",
    ...                     actor="system", reason="score 0.91 over 0.72")
    >>> entry.canonical()[:30]
    b'{"action":"throttle","actor":"'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from qabuse_dagster.response.decisions import ACTIONS

__all__ = [
    "ENTRY_ACTIONS",
    "MODEL_EVENTS",
    "WORKFLOW_EVENTS",
    "LedgerEntry",
    "LedgerRecord",
    "Mode",
    "model_subject",
]

Mode = Literal["enforce", "shadow"]
#: Steps of the workflow around an action; ``refers_to`` names the entry they act on.
WORKFLOW_EVENTS = (
    "approve",  # a second principal approves a proposed high-impact action
    "deny",  # a principal refuses a proposed action: it never takes effect
    "appeal",  # the key's owner contests an action
    "uphold_appeal",  # an analyst agrees with the owner: the key is released, labelled benign
    "reject_appeal",  # an analyst keeps the action
    "challenge_solved",  # the owner completed a challenge
    "label",  # a ground-truth label for training and evaluation
    # an analyst hands a key to someone more senior; access is unchanged, the audit
    # trail shows who escalated it and why
    "escalate",
)
#: A person moving the served model's @champion by hand: ``api_key_id`` is
#: `model_subject` of the registered model, ``model_version`` the version now champion.
MODEL_EVENTS = ("promote_model", "rollback_model")
ENTRY_ACTIONS: tuple[str, ...] = (*ACTIONS, *WORKFLOW_EVENTS, *MODEL_EVENTS)


def model_subject(model_name: str) -> str:
    """What a model event names in place of an api key."""
    return f"model:{model_name}"


@dataclass(frozen=True)
class LedgerEntry:
    """One step, as the caller submits it to the ledger.

    Attributes:
        at_ms: When it happened or takes effect (epoch milliseconds).
        api_key_id: The key it concerns (keyed hash, as in the telemetry contract).
        action: One of :data:`ENTRY_ACTIONS`.
        actor: ``system`` or the named principal who did it.
        reason: Why, in words a person reads in the audit trail.
        params: The action's parameters (JSON values), e.g. ``{"jobs_per_minute": 6}``.
        mode: ``enforce``, or ``shadow`` for a would-be action the gateway ignores.
        expires_at_ms: When the action lapses by itself, or None.
        refers_to: Sequence number of the entry this one acts on (an approval's
            proposal, an appeal's action), or None.
        score: The detector's score that led to it, if a model decided.
        model_name: The registered model that produced the score.
        model_version: Its exact version.
        feature_service: The Feast feature service(s) it read.
        features: The feature values it scored.
    """

    at_ms: int
    api_key_id: str
    action: str
    actor: str
    reason: str
    params: Mapping[str, Any] = field(default_factory=dict)
    mode: Mode = "enforce"
    expires_at_ms: int | None = None
    refers_to: int | None = None
    score: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    feature_service: str | None = None
    features: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action not in ENTRY_ACTIONS:
            raise ValueError(f"unknown ledger action {self.action!r}; expected {ENTRY_ACTIONS}")
        if self.mode not in ("enforce", "shadow"):
            raise ValueError(f"mode must be enforce or shadow, got {self.mode!r}")
        if not self.actor:
            raise ValueError("a ledger entry needs an actor: 'system' or a principal's name")
        if self.expires_at_ms is not None and self.expires_at_ms <= self.at_ms:
            raise ValueError(f"expires_at_ms {self.expires_at_ms} is not after {self.at_ms}")
        if self.score is not None and not math.isfinite(self.score):
            raise ValueError(f"score must be finite, got {self.score}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, ``params`` and ``features`` as dicts."""
        out = asdict(self)
        out["params"], out["features"] = dict(self.params), dict(self.features)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        """The entry that :meth:`to_dict` gave, e.g. a stored ledger row parsed from JSON.

        Raises:
            ValueError: If a field is missing or unknown, or the values make no valid entry.
        """
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"not a ledger entry: unknown field(s) {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise ValueError(f"not a ledger entry: {exc}") from None

    def canonical(self) -> bytes:
        """The entry as canonical JSON (sorted keys, no spaces): what the chain hashes.

        Raises:
            ValueError: If a parameter or feature is not a finite JSON value.
        """
        try:
            text = json.dumps(
                self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ledger entry is not plain, finite JSON: {exc}") from exc
        return text.encode()


@dataclass(frozen=True)
class LedgerRecord:
    """An entry as stored: its place in the chain and the hashes that link it.

    Attributes:
        seq: Position in the ledger, from 1, without gaps.
        entry: What was recorded.
        prev_hash: The previous record's ``hash`` (hex), or 64 zeros for the first.
        hash: MAC of ``seq``, ``prev_hash``, ``recorded_at_ms`` and the entry's canonical
            JSON (hex).
        recorded_at_ms: When the ledger stored it (epoch milliseconds).
    """

    seq: int
    entry: LedgerEntry
    prev_hash: str
    hash: str
    recorded_at_ms: int
