"""The vocabulary of mitigation: what can be done to an api key, and one decision to do it.

The rungs of the ladder, mildest first (``release`` lifts any of them):

* ``throttle``: a rate and concurrency cap; refused submissions get ``Retry-After``.
* ``cap``: a shot and circuit cap; larger jobs are rerouted to a simulator backend.
* ``challenge``: every submission needs a solved challenge (a signed, expiring token
  that the key's owner completes), standing in for 2FA/CAPTCHA.
* ``rotate``: the key is replaced; the owner gets a new one, the old one stops.
* ``revoke``: the key stops for good.
* ``review``: a person looks at the key before anything high-impact happens.

Production (the gateway, the ledger) and the twin's closed loop use this same
:class:`Decision`, so a decision taken in the twin reads exactly like one taken live.

Example:
    >>> Decision(60_000, "ab" * 8, "throttle", "score 0.91 over 0.72").action
    'throttle'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ACTIONS", "HIGH_IMPACT_ACTIONS", "Action", "Decision"]

Action = Literal["throttle", "cap", "challenge", "rotate", "revoke", "review", "release"]
#: Every action, mildest first; ``release`` lifts any of them.
ACTIONS: tuple[Action, ...] = (
    "throttle",
    "cap",
    "challenge",
    "rotate",
    "revoke",
    "review",
    "release",
)
#: Actions that cut a key's owner off: they need a second principal's approval.
HIGH_IMPACT_ACTIONS: frozenset[Action] = frozenset({"rotate", "revoke"})


@dataclass(frozen=True)
class Decision:
    """One mitigation decision on one api key.

    Attributes:
        at_ms: When it takes effect (epoch milliseconds).
        api_key_id: The key it applies to.
        action: One of :data:`ACTIONS`.
        reason: Why, for the audit trail, e.g. the score that crossed the threshold.
        params: The action's parameters, e.g. ``{"jobs_per_minute": 6}`` for a throttle
            or ``{"max_shots": 100000, "reroute_backend": "aer_simulator"}`` for a cap.
        expires_at_ms: When the action lapses by itself (epoch milliseconds), or None
            for an action that lasts until released (a revocation, a release itself).
    """

    at_ms: int
    api_key_id: str
    action: Action
    reason: str = ""
    params: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    expires_at_ms: int | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; expected one of {ACTIONS}")
        if self.expires_at_ms is not None and self.expires_at_ms <= self.at_ms:
            raise ValueError(
                f"{self.action} on {self.api_key_id} expires at {self.expires_at_ms}, "
                f"not after it takes effect at {self.at_ms}"
            )
