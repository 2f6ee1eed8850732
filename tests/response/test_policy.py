"""The mitigation ladder: throttle, challenge, revoke after review, release when quiet."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from qabuse_dagster.response.decisions import Decision
from qabuse_dagster.response.ladder import Ladder
from qabuse_dagster.response.policy import FeatureUsage, JobUsage, MitigationPolicy

MIN = 60_000
POLICY = MitigationPolicy(
    Ladder.model_validate(
        {"escalate_after_s": 600, "release_after_s": 3600, "revocation": {"after_refusals": 3}}
    )
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


def test_failed_challenges_propose_a_revocation_that_needs_approval() -> None:
    decisions = [Decision(0, "k", "throttle"), Decision(10 * MIN, "k", "challenge")]
    alerts = [k * MIN for k in range(0, 120)]
    refusals = [11 * MIN, 12 * MIN, 13 * MIN, 14 * MIN]
    decision = _next(alerts, decisions, 10 * MIN, refusals)
    assert decision is not None
    assert decision.action == "revoke"
    assert decision.at_ms == 13 * MIN  # proposed at the third refusal
    assert decision.params["requires_approval"] is True
    assert decision.expires_at_ms is None


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
    ("knobs", "named"),
    [
        ({"escalate_after_s": 0}, "escalate_after_s"),
        ({"release_after_s": -1}, "release_after_s"),
        ({"revocation": {"after_refusals": 0}}, "after_refusals"),
        ({"throttle": {"jobs_per_minute": 0}}, "jobs_per_minute"),
        ({"cap": {"max_shots": 0}}, "max_shots"),
        ({"rungs": ["challenge", "throttle"]}, "mildest first"),
        ({"rungs": ["throttle", "throttle"]}, "twice"),
        ({"rungs": []}, "at least one"),
        ({"throttle": {"jobs_per_minit": 5}}, "jobs_per_minit"),
    ],
)
def test_bad_knobs_are_refused_by_name(knobs: dict[str, object], named: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=named):
        Ladder.model_validate(knobs)


def _usage(shots: list[int], every_min: float = 1.0) -> JobUsage:
    times = np.array([round(k * every_min * MIN) for k in range(len(shots))], dtype=np.int64)
    return JobUsage(times, np.array(shots, dtype=np.int64), np.ones(len(shots), dtype=np.int64))


def test_the_first_alert_caps_a_key_whose_recent_jobs_went_over_the_cap() -> None:
    usage = _usage([1_000, 2_000_000, 1_000])
    decision = POLICY.next_decision(
        "k", alerts_ms=[2 * MIN], refusals_ms=[], decisions=[], after_ms=0, usage=usage
    )
    assert decision is not None and decision.action == "cap"
    assert decision.params["max_shots"] == Ladder().cap.max_shots
    assert decision.params["reroute_backend"] == "aer_simulator"
    assert decision.params["jobs_per_minute"] == Ladder().throttle.jobs_per_minute
    small = POLICY.next_decision(
        "k", alerts_ms=[2 * MIN], refusals_ms=[], decisions=[], after_ms=0, usage=_usage([1] * 3)
    )
    assert small is not None and small.action == "throttle"


def test_a_throttled_key_that_turns_to_large_jobs_is_capped_before_a_challenge() -> None:
    usage = _usage([100] * 5 + [5_000_000] * 35)
    alerts = [k * MIN for k in range(40)]
    decision = POLICY.next_decision(
        "k",
        alerts_ms=alerts,
        refusals_ms=[],
        decisions=[Decision(0, "k", "throttle")],
        after_ms=0,
        usage=usage,
    )
    assert decision is not None
    assert (decision.action, decision.at_ms) == ("cap", 10 * MIN)


def test_a_key_with_a_large_history_is_reviewed_instead_of_revoked() -> None:
    history = Ladder().review.history_jobs
    decisions = [Decision(0, "k", "throttle"), Decision(10 * MIN, "k", "challenge")]
    alerts = [k * MIN for k in range(0, 120)]
    refusals = [11 * MIN, 12 * MIN, 13 * MIN]

    def decide(usage: JobUsage) -> Decision | None:
        return POLICY.next_decision(
            "k",
            alerts_ms=alerts,
            refusals_ms=refusals,
            decisions=decisions,
            after_ms=10 * MIN,
            usage=usage,
        )

    reviewed = decide(_usage([100] * (history + 30), every_min=0.001))
    assert reviewed is not None and reviewed.action == "review"
    assert reviewed.params["instead_of"] == "revoke"
    assert reviewed.params["history_jobs"] >= history
    young = decide(_usage([100] * 30))
    assert young is not None and young.action == "revoke"


def test_every_restriction_expires_and_the_expiry_releases_it() -> None:
    first = _next([MIN], [], 0)
    assert first is not None and first.expires_at_ms is not None
    assert first.expires_at_ms == MIN + round(Ladder().throttle.lasts_s * 1000)
    # Alerts every 30 min under a short-lived throttle with no escalation: the expiry
    # comes before any quiet hour does.
    policy = MitigationPolicy(
        Ladder.model_validate({"rungs": ["throttle"], "throttle": {"lasts_s": 7200}})
    )
    throttle = policy.next_decision("k", alerts_ms=[0], refusals_ms=[], decisions=[], after_ms=-1)
    assert throttle is not None
    alerts = [k * 30 * MIN for k in range(10)]
    released = policy.next_decision(
        "k", alerts_ms=alerts, refusals_ms=[], decisions=[throttle], after_ms=0
    )
    assert released is not None
    assert (released.action, released.at_ms) == ("release", 120 * MIN)
    assert "expired" in released.reason


def test_a_feature_vector_says_whether_a_cap_bites() -> None:
    cap = Ladder().cap
    assert FeatureUsage({"max_shots_1h": cap.max_shots + 1}).over_cap(0, cap)
    assert not FeatureUsage({"max_shots_1h": cap.max_shots}).over_cap(0, cap)


def test_only_weak_alerts_ask_a_person_instead_of_a_challenge() -> None:
    throttle = Decision(MIN, "k", "throttle")
    alerts = [MIN + k * MIN for k in range(30)]

    def decide(weak: set[int] | None) -> Decision | None:
        return POLICY.next_decision(
            "k",
            alerts_ms=alerts,
            refusals_ms=[],
            decisions=[throttle],
            after_ms=MIN,
            weak_alerts_ms=weak,
        )

    reviewed = decide(set(alerts))
    assert reviewed is not None and reviewed.action == "review"
    assert reviewed.params == {"instead_of": "challenge", "low_confidence": True}
    one_strong = decide(set(alerts) - {5 * MIN})
    assert one_strong is not None and one_strong.action == "challenge"
    assert (decide(None) or throttle).action == "challenge"
    # A reviewed key is not escalated further on its own; a quiet hour still releases it.
    after = POLICY.next_decision(
        "k",
        alerts_ms=[*alerts, 200 * MIN],
        refusals_ms=[],
        decisions=[throttle, reviewed],
        after_ms=reviewed.at_ms,
        weak_alerts_ms=set(alerts),
    )
    assert after is not None and after.action == "release"


def test_a_days_submissions_are_a_floor_on_a_live_keys_history() -> None:
    usage = FeatureUsage({"submissions_24h": 6_000.0}, jobs_before=10)
    assert usage.history_jobs(0) == 6_000
    assert FeatureUsage({}, jobs_before=7_000).history_jobs(0) == 7_000
