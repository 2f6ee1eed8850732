"""The mitigation ladder: throttle, challenge, revoke after review, release when quiet."""

from __future__ import annotations

import pytest

from qabuse_dagster.response.decisions import Decision
from qabuse_dagster.response.policy import MitigationPolicy

MIN = 60_000
POLICY = MitigationPolicy(
    escalate_after_s=600, revoke_after_refusals=3, review_delay_s=900, release_after_s=3600
)


def _next(
    alerts: list[int], decisions: list[Decision], after: int, refusals: list[int] | None = None
) -> Decision | None:
    return POLICY.next_decision(
        "k", alerts_ms=alerts, refusals_ms=refusals or [], decisions=decisions, after_ms=after
    )


def test_no_alert_no_decision() -> None:
    assert _next([], [], 0) is None


def test_the_first_alert_after_the_start_throttles() -> None:
    decision = _next([5 * MIN, 6 * MIN], [], 5 * MIN)
    assert decision is not None
    assert (decision.action, decision.at_ms, decision.api_key_id) == ("throttle", 6 * MIN, "k")


def test_alerting_past_the_escalation_delay_challenges() -> None:
    throttle = Decision(MIN, "k", "throttle")
    alerts = [MIN + k * MIN for k in range(30)]
    decision = _next(alerts, [throttle], MIN)
    assert decision is not None
    assert decision.action == "challenge"
    assert decision.at_ms == MIN + 10 * MIN  # the first alert 600 s into the throttle


def test_a_quiet_hour_releases_a_throttle() -> None:
    throttle = Decision(MIN, "k", "throttle")
    decision = _next([MIN, 2 * MIN, 3 * MIN], [throttle], MIN)
    assert decision is not None
    assert (decision.action, decision.at_ms) == ("release", 3 * MIN + 3600 * 1000)


def test_an_alert_inside_the_quiet_hour_postpones_the_release() -> None:
    throttle = Decision(0, "k", "throttle")
    alerts = [5 * MIN, 50 * MIN]  # 50 min: before the hour after 5 min is over
    decision = _next(alerts, [throttle], 0)
    assert decision is not None
    # 50 min is 50 min into the throttle: past the 10-minute escalation delay.
    assert decision.action == "challenge" and decision.at_ms == 50 * MIN
    quiet_alerts = [5 * MIN, 8 * MIN]
    released = _next(quiet_alerts, [throttle], 0)
    assert released is not None
    assert (released.action, released.at_ms) == ("release", 8 * MIN + 60 * MIN)


def test_failed_challenges_propose_a_revocation_that_waits_for_review() -> None:
    decisions = [Decision(0, "k", "throttle"), Decision(10 * MIN, "k", "challenge")]
    alerts = [k * MIN for k in range(0, 120)]
    refusals = [11 * MIN, 12 * MIN, 13 * MIN, 14 * MIN]
    decision = _next(alerts, decisions, 10 * MIN, refusals)
    assert decision is not None
    assert decision.action == "revoke"
    assert decision.at_ms == 13 * MIN + 900 * 1000  # the third refusal, then the review
    assert "review" in decision.reason


def test_refusals_before_the_challenge_do_not_count() -> None:
    decisions = [Decision(10 * MIN, "k", "challenge")]
    alerts = [k * MIN for k in range(0, 120)]
    decision = _next(alerts, decisions, 10 * MIN, [1 * MIN, 2 * MIN, 3 * MIN])
    assert decision is None or decision.action != "revoke"


def test_a_revoked_key_gets_no_further_decision() -> None:
    decisions = [Decision(0, "k", "revoke")]
    assert _next([k * MIN for k in range(100)], decisions, 0) is None


def test_after_a_release_the_ladder_starts_again() -> None:
    decisions = [Decision(0, "k", "throttle"), Decision(70 * MIN, "k", "release")]
    decision = _next([5 * MIN, 80 * MIN], decisions, 70 * MIN)
    assert decision is not None
    assert (decision.action, decision.at_ms) == ("throttle", 80 * MIN)


@pytest.mark.parametrize(
    "knobs",
    [
        {"escalate_after_s": 0},
        {"review_delay_s": -1},
        {"release_after_s": 0},
        {"revoke_after_refusals": 0},
    ],
)
def test_bad_knobs_are_refused(knobs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(knobs))):
        MitigationPolicy(**knobs)  # type: ignore[arg-type]
