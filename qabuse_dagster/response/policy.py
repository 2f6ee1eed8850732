"""Graduated mitigation: from one key's alerts to throttle, challenge, revoke or release.

The ladder, per api key:

1. The first alert throttles the key (a cheap, reversible brake).
2. An alert ``escalate_after_s`` or more after the throttle, so the key stays anomalous
   under the brake, challenges it: a person re-authenticates, automation cannot.
3. Under a challenge, ``revoke_after_refusals`` refused ``challenge_required``
   submissions (the key keeps failing its challenge) propose a revocation; it is the
   high-impact step, so it waits ``review_delay_s`` for a person to confirm.
4. ``release_after_s`` without an alert lifts a throttle or challenge. A revocation is
   not lifted automatically.

The policy is a pure function of a key's alert instants, refusal instants and the
decisions already taken, so the same inputs give the same decision (and the twin's
closed loop can ask it again after every change).

Example:
    >>> policy = MitigationPolicy()
    >>> first = policy.next_decision("k", alerts_ms=[60_000, 120_000], refusals_ms=[],
    ...                              decisions=[], after_ms=0)
    >>> (first.action, first.at_ms)
    ('throttle', 60000)
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from qabuse_dagster.response.decisions import Decision

__all__ = ["MitigationPolicy"]

_S = 1000


@dataclass(frozen=True)
class MitigationPolicy:
    """When to throttle, challenge, revoke or release a key (see the module docstring).

    Attributes:
        escalate_after_s: Alerting this long after a throttle escalates to a challenge.
        revoke_after_refusals: Failed challenges that propose a revocation.
        review_delay_s: Time a person takes to confirm a proposed revocation.
        release_after_s: Quiet time (no alert) that lifts a throttle or challenge.
    """

    escalate_after_s: float = 600.0
    revoke_after_refusals: int = 20
    review_delay_s: float = 900.0
    release_after_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("escalate_after_s", "review_delay_s", "release_after_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.revoke_after_refusals < 1:
            raise ValueError(
                f"revoke_after_refusals must be at least 1, got {self.revoke_after_refusals}"
            )

    def next_decision(
        self,
        api_key_id: str,
        *,
        alerts_ms: Sequence[int],
        refusals_ms: Sequence[int],
        decisions: Sequence[Decision],
        after_ms: int,
    ) -> Decision | None:
        """The key's first decision strictly after ``after_ms``, or None.

        Args:
            api_key_id: The key.
            alerts_ms: Sorted instants at which the key alerted.
            refusals_ms: Sorted instants of its ``challenge_required`` refusals.
            decisions: Decisions already taken on it, in time order.
            after_ms: Only decide after this instant.
        """
        level, since = "none", 0
        if decisions:
            last = decisions[-1]
            level = "none" if last.action == "release" else last.action
            since = last.at_ms
        if level == "revoke":
            return None
        if level == "none":
            alert = _first_after(alerts_ms, after_ms)
            if alert is None:
                return None
            return Decision(alert, api_key_id, "throttle", "alert above the threshold")
        candidates: list[Decision] = []
        release = self._release_at(alerts_ms, since, after_ms)
        if release is not None:
            quiet = f"no alert for {self.release_after_s:.0f} s"
            candidates.append(Decision(release, api_key_id, "release", quiet))
        if level == "throttle":
            escalate_from = since + round(self.escalate_after_s * _S)
            alert = _first_after(alerts_ms, max(after_ms, escalate_from - 1))
            if alert is not None:
                reason = f"still alerting {self.escalate_after_s:.0f} s into the throttle"
                candidates.append(Decision(alert, api_key_id, "challenge", reason))
        else:  # challenge
            failed = [t for t in refusals_ms if t >= since]
            if len(failed) >= self.revoke_after_refusals:
                confirmed = failed[self.revoke_after_refusals - 1] + round(self.review_delay_s * _S)
                if confirmed > after_ms:
                    reason = (
                        f"{self.revoke_after_refusals} failed challenges, confirmed after "
                        f"{self.review_delay_s:.0f} s of review"
                    )
                    candidates.append(Decision(confirmed, api_key_id, "revoke", reason))
        return min(candidates, key=lambda d: d.at_ms, default=None)

    def _release_at(self, alerts_ms: Sequence[int], since: int, after_ms: int) -> int | None:
        """First instant after ``after_ms`` that ends ``release_after_s`` without an alert."""
        quiet_ms = round(self.release_after_s * _S)
        i = bisect.bisect_right(alerts_ms, since)
        previous = since
        while True:
            candidate = max(previous + quiet_ms, after_ms + 1)
            if i >= len(alerts_ms) or alerts_ms[i] > candidate:
                return candidate if candidate - previous >= quiet_ms else None
            previous = alerts_ms[i]
            i += 1


def _first_after(instants: Sequence[int], after_ms: int) -> int | None:
    i = bisect.bisect_right(instants, after_ms)
    return int(instants[i]) if i < len(instants) else None
