"""The mitigation ladder's settings: one typed object holds every rung's knobs.

A provider configures how qabuse answers abuse here, and nowhere else: the policy engine
(:mod:`qabuse_dagster.response.policy`), the gateway and the twin's closed loop all read
the same :class:`Ladder`. Load one from JSON or YAML with ``Ladder.model_validate``; an
unknown knob or an out-of-range value is refused with the knob's name.

The rungs, mildest first:

1. **throttle**: ``jobs_per_minute`` (and optionally ``max_concurrent``); the gateway
   answers 429 with ``Retry-After`` past it.
2. **cap**: the throttle's rate plus a shot and circuit cap; a larger job is rerouted to
   ``reroute_backend`` (a simulator), or refused when that is None. Quantum-specific: a
   generic rate limiter cannot tell one job of five million shots from one of a hundred.
3. **challenge**: every submission needs a solved, signed, expiring challenge.
4. **revoke** (or **rotate**): proposed after failed challenges; it waits for a second
   principal's approval.
5. **review**: instead of proposing a revocation on its own, the engine asks a person
   to look at the whole key when it is high-impact (a large legitimate history), and
   instead of a challenge when the evidence is weak (every alert only just over the
   threshold).

Example:
    >>> ladder = Ladder.model_validate({"throttle": {"jobs_per_minute": 10}})
    >>> ladder.throttle.jobs_per_minute, ladder.rungs
    (10.0, ('throttle', 'cap', 'challenge', 'revoke'))
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "CapRung",
    "ChallengeRung",
    "Ladder",
    "ReviewRung",
    "RevocationRung",
    "Rung",
    "ThrottleRung",
]

Rung = Literal["throttle", "cap", "challenge", "revoke"]
_HOUR = 3600.0


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ThrottleRung(_Settings):
    """A rate (and concurrency) cap; refused submissions get ``Retry-After``."""

    jobs_per_minute: float = Field(default=6.0, gt=0, le=10_000)
    max_concurrent: int | None = Field(default=None, ge=1)
    lasts_s: float = Field(
        default=6 * _HOUR, gt=0, description="Expiry, if no release comes first."
    )


class CapRung(_Settings):
    """The throttle's rate plus a cap on each job's size.

    The cap bites, and the rung is used, only when one of the key's jobs within
    ``lookback_s`` before the decision went over it; otherwise a throttle does the same.
    """

    max_shots: int = Field(default=10_000, ge=1)
    max_circuits: int = Field(default=100, ge=1)
    reroute_backend: str | None = Field(
        default="aer_simulator", min_length=1, max_length=128, description="None refuses instead."
    )
    lookback_s: float = Field(default=_HOUR, gt=0)
    lasts_s: float = Field(default=6 * _HOUR, gt=0)


class ChallengeRung(_Settings):
    """Re-authentication: a signed token the owner completes; automation cannot."""

    token_ttl_s: float = Field(default=900.0, gt=0, le=86_400)
    lasts_s: float = Field(default=24 * _HOUR, gt=0)


class RevocationRung(_Settings):
    """The high-impact step, proposed after failed challenges; a second principal approves."""

    action: Literal["revoke", "rotate"] = "revoke"
    after_refusals: int = Field(default=20, ge=1, description="Failed challenges that propose it.")


class ReviewRung(_Settings):
    """When the engine asks a person to look at a key instead of acting on its own.

    A high-impact key (a long history) is reviewed instead of revoked; a key whose alerts
    were all weak (low confidence) is reviewed instead of challenged.
    """

    history_jobs: int = Field(
        default=5_000, ge=1, description="Jobs before the first alert that make a key high-impact."
    )
    low_confidence_margin: float = Field(
        default=0.1,
        ge=0,
        description="An alert whose score is over the threshold by at most this fraction of "
        "the threshold's size is weak; a key with only weak alerts is reviewed, not challenged.",
    )


class Ladder(_Settings):
    """Every knob of graduated mitigation (see the module docstring).

    Attributes:
        rungs: The rungs in use, mildest first; leave one out to skip it.
        escalate_after_s: Still alerting this long into a rung climbs to the next.
        release_after_s: This long without an alert lifts any rung short of revocation.
    """

    rungs: tuple[Rung, ...] = ("throttle", "cap", "challenge", "revoke")
    escalate_after_s: float = Field(default=600.0, gt=0)
    release_after_s: float = Field(default=_HOUR, gt=0)
    throttle: ThrottleRung = ThrottleRung()
    cap: CapRung = CapRung()
    challenge: ChallengeRung = ChallengeRung()
    revocation: RevocationRung = RevocationRung()
    review: ReviewRung = ReviewRung()

    @model_validator(mode="after")
    def _ordered(self) -> Ladder:
        order = ("throttle", "cap", "challenge", "revoke")
        if not self.rungs:
            raise ValueError("rungs: give at least one rung")
        if len(set(self.rungs)) != len(self.rungs):
            raise ValueError(f"rungs: {self.rungs} names a rung twice")
        if list(self.rungs) != sorted(self.rungs, key=order.index):
            raise ValueError(f"rungs: {self.rungs} is not mildest first ({order})")
        return self

    def lasts_s(self, rung: str) -> float | None:
        """How long ``rung`` lasts when nothing releases it; None: until released."""
        lasting = {
            "throttle": self.throttle.lasts_s,
            "cap": self.cap.lasts_s,
            "challenge": self.challenge.lasts_s,
        }
        return lasting.get(rung)
