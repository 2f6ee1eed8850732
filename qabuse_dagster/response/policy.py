"""The policy engine: from one key's alerts to the next rung of the ladder, or a release.

Per api key, with the knobs of a :class:`~qabuse_dagster.response.ladder.Ladder`:

1. The first alert puts the key on the mildest rung that bites: a **cap** when one of
   its recent jobs went over the cap (the cap includes the throttle's rate), else a
   **throttle**.
2. An alert ``escalate_after_s`` or more into a throttle or cap climbs: to the cap when
   it now bites, else to a **challenge**, unless every alert since was only just over the
   threshold: then a person **reviews** the key instead (low confidence).
3. Under a challenge, ``after_refusals`` refused ``challenge_required`` submissions
   propose a **revocation** (or rotation); it takes effect when a second principal
   approves it (the gateway's decision table enforces that, not the engine). For a
   high-impact key (a large legitimate history) the engine asks for a **review** of the
   whole key instead, whose approval applies the revocation.
4. ``release_after_s`` without an alert lifts a throttle, cap or challenge, and so does
   its expiry; a revocation is not lifted automatically.

The engine is a pure function of a key's alert instants, refusal instants, usage and
the decisions already taken, so the same inputs give the same decision: the live
decision service asks it after every score, the twin's closed loop after every change.

Example:
    >>> policy = MitigationPolicy()
    >>> first = policy.next_decision("k", alerts_ms=[60_000, 120_000], refusals_ms=[],
    ...                              decisions=[], after_ms=0)
    >>> (first.action, first.at_ms, first.params["jobs_per_minute"])
    ('throttle', 60000, 6.0)
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from qabuse_dagster.response.decisions import Action, Decision
from qabuse_dagster.response.ladder import CapRung, Ladder

__all__ = ["FeatureUsage", "JobUsage", "KeyUsage", "MitigationPolicy"]

_S = 1000


class KeyUsage(Protocol):
    """What the engine needs to know of a key's use, besides its alerts."""

    def over_cap(self, at_ms: int, cap: CapRung) -> bool:
        """Whether a job within ``cap.lookback_s`` before ``at_ms`` went over the cap."""
        ...

    def history_jobs(self, at_ms: int) -> int:
        """Jobs the key ran before ``at_ms``."""
        ...


@dataclass(frozen=True)
class JobUsage:
    """A key's usage from its jobs (the twin's closed loop, a replay).

    Attributes:
        submit_ms: Submission instants, sorted.
        shots: Shots per circuit of each job.
        circuits: Circuits of each job.
    """

    submit_ms: np.ndarray
    shots: np.ndarray
    circuits: np.ndarray

    def over_cap(self, at_ms: int, cap: CapRung) -> bool:
        lo = np.searchsorted(self.submit_ms, at_ms - round(cap.lookback_s * _S), side="left")
        hi = np.searchsorted(self.submit_ms, at_ms, side="right")
        over = (self.shots[lo:hi] > cap.max_shots) | (self.circuits[lo:hi] > cap.max_circuits)
        return bool(over.any())

    def history_jobs(self, at_ms: int) -> int:
        return int(np.searchsorted(self.submit_ms, at_ms, side="left"))


@dataclass(frozen=True)
class FeatureUsage:
    """A key's usage from its online features (the live decision service).

    Attributes:
        features: The key's feature vector; ``max_shots_1h`` decides whether a cap bites.
        jobs_before: Jobs the key ran before now (from the offline store or the ledger).
    """

    features: Mapping[str, float]
    jobs_before: int = 0

    def over_cap(self, at_ms: int, cap: CapRung) -> bool:
        return float(self.features.get("max_shots_1h", 0.0)) > cap.max_shots

    def history_jobs(self, at_ms: int) -> int:
        # The day's submissions are a floor on the key's history when nothing longer is known.
        return max(self.jobs_before, int(self.features.get("submissions_24h", 0.0)))


@dataclass(frozen=True)
class MitigationPolicy:
    """When to throttle, cap, challenge, review, revoke or release a key (module docstring).

    Attributes:
        ladder: Every knob of the ladder.
    """

    ladder: Ladder = field(default_factory=lambda: Ladder())

    def next_decision(
        self,
        api_key_id: str,
        *,
        alerts_ms: Sequence[int],
        refusals_ms: Sequence[int],
        decisions: Sequence[Decision],
        after_ms: int,
        usage: KeyUsage | None = None,
        weak_alerts_ms: Collection[int] | None = None,
    ) -> Decision | None:
        """The key's first decision strictly after ``after_ms``, or None.

        Args:
            api_key_id: The key.
            alerts_ms: Sorted instants at which the key alerted.
            refusals_ms: Sorted instants of its ``challenge_required`` refusals.
            decisions: Decisions already taken on it, in time order.
            after_ms: Only decide after this instant.
            usage: The key's usage (cap and review rules); None: no cap bites, and no
                key is high-impact.
            weak_alerts_ms: The alerts whose score was only just over the threshold
                (within `ReviewRung.low_confidence_margin`). When every alert since the
                throttle or cap was weak, a person reviews the key instead of it being
                challenged. None: every alert counts as confident.
        """
        level, since, expires = "none", 0, None
        if decisions:
            last = decisions[-1]
            level = "none" if last.action == "release" else last.action
            since, expires = last.at_ms, last.expires_at_ms
        if level in ("revoke", "rotate"):
            return None
        if level == "none":
            alert = _first_after(alerts_ms, after_ms)
            if alert is None:
                return None
            rung = self._entry_rung(alert, usage)
            return self.decide(api_key_id, rung, alert, "alert above the threshold")
        candidates: list[Decision] = []
        release = self._release_at(alerts_ms, since, after_ms)
        if expires is not None and expires > after_ms and (release is None or expires < release):
            candidates.append(Decision(expires, api_key_id, "release", f"the {level} expired"))
        elif release is not None:
            quiet = f"no alert for {self.ladder.release_after_s:.0f} s"
            candidates.append(Decision(release, api_key_id, "release", quiet))
        if level in ("throttle", "cap"):
            escalate_from = since + round(self.ladder.escalate_after_s * _S)
            alert = _first_after(alerts_ms, max(after_ms, escalate_from - 1))
            climb = None if alert is None else self._climb(level, alert, usage)
            if alert is not None and climb is not None:
                reason = f"still alerting {self.ladder.escalate_after_s:.0f} s into the {level}"
                lo = bisect.bisect_left(alerts_ms, since)
                hi = bisect.bisect_right(alerts_ms, alert)
                weak = weak_alerts_ms is not None and all(
                    t in weak_alerts_ms for t in alerts_ms[lo:hi]
                )
                if climb == "challenge" and weak:
                    why = f"{reason}, every alert only just over the threshold: a person looks"
                    params = {"instead_of": "challenge", "low_confidence": True}
                    candidates.append(Decision(alert, api_key_id, "review", why, params))
                else:
                    candidates.append(self.decide(api_key_id, climb, alert, reason))
        elif level == "challenge" and "revoke" in self.ladder.rungs:
            needed = self.ladder.revocation.after_refusals
            failed = [t for t in refusals_ms if t >= since]
            if len(failed) >= needed and failed[needed - 1] > after_ms:
                reason = f"{needed} failed challenges"
                candidates.append(self._revocation(api_key_id, failed[needed - 1], reason, usage))
        return min(candidates, key=lambda d: d.at_ms, default=None)

    def _entry_rung(self, at_ms: int, usage: KeyUsage | None) -> Action:
        rungs = self.ladder.rungs
        if "cap" in rungs and usage is not None and usage.over_cap(at_ms, self.ladder.cap):
            return "cap"
        return next(r for r in rungs if r != "cap" or len(rungs) == 1)

    def _climb(self, level: str, at_ms: int, usage: KeyUsage | None) -> Action | None:
        """The rung above ``level`` that the key needs at ``at_ms``, or None (top reached)."""
        rungs = self.ladder.rungs
        bites = usage is not None and usage.over_cap(at_ms, self.ladder.cap)
        if level == "throttle" and "cap" in rungs and bites:
            return "cap"
        return "challenge" if "challenge" in rungs else None

    def _revocation(
        self, api_key_id: str, at_ms: int, reason: str, usage: KeyUsage | None
    ) -> Decision:
        """The revocation proposal, or a review of it when the key is high-impact."""
        action = self.ladder.revocation.action
        history = 0 if usage is None else usage.history_jobs(at_ms)
        if history < self.ladder.review.history_jobs:
            return self.decide(api_key_id, action, at_ms, reason)
        params = {"instead_of": action, "history_jobs": history}
        why = f"{reason}; {history} jobs of history: a person reviews the key first"
        return Decision(at_ms, api_key_id, "review", why, params)

    def decide(self, api_key_id: str, action: Action, at_ms: int, reason: str) -> Decision:
        """A decision of ``action`` at ``at_ms``, with the ladder's parameters and expiry."""
        lasts = self.ladder.lasts_s(action)
        expires = None if lasts is None else at_ms + round(lasts * _S)
        return Decision(at_ms, api_key_id, action, reason, self.params(action), expires)

    def params(self, action: str) -> dict[str, Any]:
        """The parameters a decision of ``action`` carries to the gateway."""
        ladder = self.ladder
        throttle: dict[str, Any] = {"jobs_per_minute": ladder.throttle.jobs_per_minute}
        if ladder.throttle.max_concurrent is not None:
            throttle["max_concurrent"] = ladder.throttle.max_concurrent
        if action == "throttle":
            return throttle
        if action == "cap":
            cap = ladder.cap
            return {
                **throttle,
                "max_shots": cap.max_shots,
                "max_circuits": cap.max_circuits,
                "reroute_backend": cap.reroute_backend,
            }
        if action == "challenge":
            return {"token_ttl_s": ladder.challenge.token_ttl_s}
        if action in ("revoke", "rotate"):
            return {"requires_approval": True}
        return {}

    def _release_at(self, alerts_ms: Sequence[int], since: int, after_ms: int) -> int | None:
        """First instant after ``after_ms`` that ends ``release_after_s`` without an alert."""
        quiet_ms = round(self.ladder.release_after_s * _S)
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
