"""The decision table: the mitigation in force per key, folded from ledger records."""

from __future__ import annotations

import threading

import pytest
from support.decision_records import KEY, MINUTE_MS, OTHER_KEY, Ledger

from qabuse_dagster.response.decision_table import ALLOW, DecisionTable


def _table(ledger: Ledger) -> DecisionTable:
    return DecisionTable.from_records(ledger.items)


def test_a_key_with_nothing_on_it_is_allowed() -> None:
    ledger = Ledger()
    ledger.add("throttle", key=OTHER_KEY, params={"jobs_per_minute": 1})
    assert _table(ledger).lookup(KEY, 1_000) is ALLOW


def test_a_throttle_answers_429_past_its_rate_with_retry_after() -> None:
    ledger = Ledger()
    ledger.add("throttle", params={"jobs_per_minute": 5}, reason="score 0.93 over 0.72")
    table = _table(ledger)
    answers = [table.lookup(KEY, 10_000) for _ in range(6)]
    assert [a.status for a in answers] == [200] * 5 + [429]
    refused = answers[-1]
    assert refused.action == "throttle" and refused.seq == 1
    assert refused.retry_after_s is not None and refused.retry_after_s >= 1
    assert "5 jobs a minute" in refused.reason and "score 0.93" in refused.reason


def test_a_throttle_refills_at_its_rate() -> None:
    ledger = Ledger()
    ledger.add("throttle", params={"jobs_per_minute": 6})  # a token every 10 s
    table = _table(ledger)
    for _ in range(6):
        assert table.lookup(KEY, 0).status == 200
    refused = table.lookup(KEY, 1_000)
    assert (refused.status, refused.retry_after_s) == (429, 9)
    assert table.lookup(KEY, 10_000).status == 200
    assert table.lookup(KEY, 10_000).status == 429


def test_a_throttle_under_one_job_a_minute_still_lets_one_through() -> None:
    ledger = Ledger()
    ledger.add("throttle", params={"jobs_per_minute": 0.5})
    table = _table(ledger)
    assert table.lookup(KEY, 0).status == 200
    refused = table.lookup(KEY, 0)
    assert (refused.status, refused.retry_after_s) == (429, 120)


def test_a_throttle_without_a_rate_brakes_at_the_default_and_is_flagged() -> None:
    ledger = Ledger()
    ledger.add("throttle")
    table = _table(ledger)
    assert [table.lookup(KEY, 0).status for _ in range(7)] == [200] * 6 + [429]
    assert any("jobs_per_minute" in flag for flag in table.state(KEY, 0).flags)


def test_an_action_applies_from_at_ms_until_expires_at_ms() -> None:
    ledger = Ledger()
    ledger.add("revoke", at_ms=MINUTE_MS, expires_at_ms=3 * MINUTE_MS)
    ledger.add("approve", at_ms=MINUTE_MS, actor="bob", refers_to=1)
    table = _table(ledger)
    assert table.lookup(KEY, MINUTE_MS - 1).status == 200
    assert table.lookup(KEY, MINUTE_MS).status == 403
    assert table.lookup(KEY, 3 * MINUTE_MS - 1).status == 403
    assert table.lookup(KEY, 3 * MINUTE_MS).status == 200


def test_a_throttle_expires() -> None:
    ledger = Ledger()
    ledger.add("throttle", params={"jobs_per_minute": 1}, expires_at_ms=MINUTE_MS)
    table = _table(ledger)
    assert table.lookup(KEY, 0).status == 200
    assert table.lookup(KEY, 1).status == 429
    assert table.lookup(KEY, MINUTE_MS).status == 200
    assert table.lookup(KEY, MINUTE_MS).status == 200


def test_a_cap_refuses_larger_jobs_and_lets_smaller_ones_through() -> None:
    ledger = Ledger()
    ledger.add("cap", params={"max_shots": 10_000, "max_circuits": 100})
    table = _table(ledger)
    assert table.lookup(KEY, 0, shots=10_000, circuits=100).status == 200
    too_many_shots = table.lookup(KEY, 0, shots=10_001, circuits=1)
    assert (too_many_shots.status, too_many_shots.action) == (403, "cap")
    assert "max_shots=10000" in too_many_shots.reason
    assert table.lookup(KEY, 0, shots=1, circuits=101).status == 403
    assert table.lookup(KEY, 0).status == 200  # a size the gateway did not send is not over


def test_a_cap_with_a_simulator_reroutes_larger_jobs() -> None:
    ledger = Ledger()
    ledger.add("cap", params={"max_shots": 100, "reroute_backend": "aer_simulator"})
    table = _table(ledger)
    small = table.lookup(KEY, 0, shots=100)
    assert (small.action, small.reroute_backend) == ("allow", None)
    large = table.lookup(KEY, 0, shots=5_000_000)
    assert (large.status, large.action, large.reroute_backend) == (200, "cap", "aer_simulator")


def test_a_cap_carries_the_throttles_rate() -> None:
    ledger = Ledger()
    ledger.add("cap", params={"jobs_per_minute": 2, "max_shots": 100, "reroute_backend": "sim"})
    table = _table(ledger)
    assert table.lookup(KEY, 0, shots=1).status == 200
    assert table.lookup(KEY, 0, shots=10_000).reroute_backend == "sim"
    refused = table.lookup(KEY, 0, shots=1)
    assert (refused.status, refused.action) == (429, "cap")
    assert "over its rate of 2 jobs a minute" in refused.reason


def test_a_refused_job_costs_no_token() -> None:
    ledger = Ledger()
    ledger.add("cap", params={"jobs_per_minute": 1, "max_shots": 100})
    table = _table(ledger)
    assert table.lookup(KEY, 0, shots=1_000).status == 403
    assert table.lookup(KEY, 0, shots=10).status == 200


def test_a_challenge_refuses_until_that_challenge_is_solved() -> None:
    ledger = Ledger()
    ledger.add("challenge", params={"token_ttl_s": 900})
    table = _table(ledger)
    refused = table.lookup(KEY, 0)
    assert (refused.status, refused.action, refused.seq) == (403, "challenge", 1)
    assert table.lookup(KEY, 0, solved_challenge=1).status == 200
    ledger.add("challenge", at_ms=MINUTE_MS)  # a new challenge voids proofs of the old one
    table.apply(ledger.items[-1])
    assert table.lookup(KEY, MINUTE_MS, solved_challenge=1).status == 403
    assert table.lookup(KEY, MINUTE_MS, solved_challenge=2).status == 200


def test_challenge_solved_lifts_the_challenge() -> None:
    ledger = Ledger()
    ledger.add("challenge")
    ledger.add("challenge_solved", at_ms=MINUTE_MS, actor="owner-1", refers_to=1)
    table = _table(ledger)
    assert table.lookup(KEY, MINUTE_MS - 1).status == 403
    assert table.lookup(KEY, MINUTE_MS).status == 200


def test_a_revocation_is_only_a_proposal_until_another_principal_approves() -> None:
    ledger = Ledger()
    ledger.add("revoke", actor="alice", reason="leaked key")
    table = _table(ledger)
    assert table.lookup(KEY, 0).status == 200
    assert [m.seq for m in table.state(KEY, 0).proposals] == [1]

    table.apply(ledger.add("approve", at_ms=10, actor="alice", refers_to=1))
    assert table.lookup(KEY, 20).status == 200, "the proposer approved their own revocation"
    assert any("proposer" in flag for flag in table.state(KEY, 20).flags)

    table.apply(ledger.add("approve", at_ms=30, actor="system", refers_to=1))
    assert table.lookup(KEY, 40).status == 200, "an automated approval is no second person"

    table.apply(ledger.add("approve", at_ms=50, actor="bob", refers_to=1))
    refused = table.lookup(KEY, 50)
    assert (refused.status, refused.action, refused.seq) == (403, "revoke", 1)
    assert "revoked" in refused.reason and "leaked key" in refused.reason
    state = table.state(KEY, 50)
    assert state.proposals == ()
    assert [(m.action, m.approved_by) for m in state.in_force] == [("revoke", "bob")]
    assert table.lookup(KEY, 49).status == 200, "in force from the approval, not the proposal"


def test_a_denied_proposal_never_takes_effect() -> None:
    ledger = Ledger()
    ledger.add("rotate", actor="system")
    ledger.add("deny", at_ms=5, actor="bob", refers_to=1)
    ledger.add("approve", at_ms=10, actor="carol", refers_to=1)
    table = _table(ledger)
    assert table.lookup(KEY, 20).status == 200
    assert table.state(KEY, 20).proposals == ()


def test_an_approved_rotation_refuses_the_old_key() -> None:
    ledger = Ledger()
    ledger.add("rotate", actor="system")
    ledger.add("approve", actor="bob", refers_to=1)
    refused = _table(ledger).lookup(KEY, 0)
    assert (refused.status, refused.action) == (403, "rotate")
    assert "replacement" in refused.reason


def test_release_lifts_everything_on_the_key() -> None:
    ledger = Ledger()
    ledger.add("throttle", params={"jobs_per_minute": 1})
    ledger.add("challenge")
    ledger.add("revoke", actor="alice")
    ledger.add("review")
    ledger.add("release", at_ms=MINUTE_MS, actor="bob")
    table = _table(ledger)
    assert table.lookup(KEY, 0).status == 403
    for _ in range(3):
        assert table.lookup(KEY, MINUTE_MS).status == 200
    state = table.state(KEY, MINUTE_MS)
    assert (state.in_force, state.proposals, state.reviews) == ((), (), ())


def test_an_upheld_appeal_releases_the_key() -> None:
    ledger = Ledger()
    ledger.add("challenge")
    ledger.add("appeal", at_ms=10, actor="owner-1", refers_to=1)
    table = _table(ledger)
    assert table.state(KEY, 10).appeals == (2,)
    table.apply(ledger.add("uphold_appeal", at_ms=20, actor="bob", refers_to=2))
    assert table.lookup(KEY, 20).status == 200
    assert table.state(KEY, 20).appeals == ()


def test_a_rejected_appeal_keeps_the_action() -> None:
    ledger = Ledger()
    ledger.add("challenge")
    ledger.add("appeal", at_ms=10, actor="owner-1", refers_to=1)
    ledger.add("reject_appeal", at_ms=20, actor="bob", refers_to=2)
    table = _table(ledger)
    assert table.lookup(KEY, 30).status == 403
    assert table.state(KEY, 30).appeals == ()


def test_a_review_restricts_nothing_but_is_visible() -> None:
    ledger = Ledger()
    ledger.add("review", reason="high-impact key alerting")
    table = _table(ledger)
    assert table.lookup(KEY, 0) is ALLOW
    assert [m.reason for m in table.state(KEY, 0).reviews] == ["high-impact key alerting"]


def test_an_approved_review_is_resolved_and_its_held_action_applies() -> None:
    ledger = Ledger()
    ledger.add("review", params={"instead_of": "challenge"})
    ledger.add("review", at_ms=1)
    ledger.add("approve", at_ms=10, actor="bob", refers_to=1)
    ledger.add("challenge", at_ms=10, actor="bob", refers_to=1)
    ledger.add("deny", at_ms=10, actor="bob", refers_to=2)
    table = _table(ledger)
    state = table.state(KEY, 10)
    assert (state.reviews, state.flags) == ((), ())
    assert table.lookup(KEY, 10).action == "challenge"


def test_a_revocation_held_back_by_an_approved_review_takes_effect_at_once() -> None:
    ledger = Ledger()
    ledger.add("review", params={"instead_of": "revoke"})
    ledger.add("approve", at_ms=10, actor="bob", refers_to=1)
    ledger.add("revoke", at_ms=10, actor="bob", refers_to=1)  # what review.approve appends
    table = _table(ledger)
    refused = table.lookup(KEY, 10)
    assert (refused.status, refused.action, refused.seq) == (403, "revoke", 3)
    assert [m.approved_by for m in table.state(KEY, 10).in_force] == ["bob"]


def test_a_self_approved_review_lets_nothing_through_unchecked() -> None:
    ledger = Ledger()
    ledger.add("review", actor="alice", params={"instead_of": "revoke"})
    ledger.add("approve", actor="alice", refers_to=1)
    ledger.add("revoke", actor="alice", refers_to=1)
    ledger.add("revoke", key=OTHER_KEY, actor="alice", refers_to=1)  # another key's review
    table = _table(ledger)
    assert table.lookup(KEY, 0).status == 200
    state = table.state(KEY, 0)
    assert [m.seq for m in state.reviews] == [1] and [m.seq for m in state.proposals] == [3]
    assert any("proposer" in flag for flag in state.flags)
    assert table.lookup(OTHER_KEY, 0).status == 200


def test_shadow_entries_never_restrict_but_report_what_they_would_do() -> None:
    ledger = Ledger()
    ledger.add("throttle", mode="shadow", params={"jobs_per_minute": 2})
    ledger.add("cap", mode="shadow", params={"max_shots": 10})
    table = _table(ledger)
    first, second, third = (table.lookup(KEY, 0, shots=1) for _ in range(3))
    assert [v.status for v in (first, second, third)] == [200, 200, 200]
    assert (first.shadow_action, second.shadow_action, third.shadow_action) == (
        None,
        None,
        "throttle",
    )
    assert table.lookup(KEY, 0, shots=100).shadow_action == "cap"
    assert [m.action for m in table.state(KEY, 0).shadow] == ["throttle", "cap"]
    assert table.state(KEY, 0).in_force == ()


def test_a_shadow_release_leaves_enforced_actions() -> None:
    ledger = Ledger()
    ledger.add("challenge")
    ledger.add("release", mode="shadow")
    assert _table(ledger).lookup(KEY, 0).status == 403


def test_a_rung_in_shadow_mode_reports_and_a_milder_enforced_rung_still_applies() -> None:
    ledger = Ledger()
    ledger.add("throttle", params={"jobs_per_minute": 1})
    ledger.add("challenge")
    table = _table(ledger)
    first = table.lookup(KEY, 0, shadow={"challenge"})
    assert (first.status, first.shadow_action) == (200, "challenge")
    second = table.lookup(KEY, 0, shadow={"challenge"})
    assert (second.status, second.action, second.shadow_action) == (429, "throttle", "challenge")


def test_the_kill_switch_turns_a_rung_off() -> None:
    ledger = Ledger()
    ledger.add("throttle", params={"jobs_per_minute": 1})
    table = _table(ledger)
    for _ in range(3):
        verdict = table.lookup(KEY, 0, disabled={"throttle"})
        assert (verdict.status, verdict.disabled_action) == (200, "throttle")
    assert table.lookup(KEY, 0).status == 200, "a switched-off rung spent no tokens"
    assert table.lookup(KEY, 0).status == 429


def test_the_kill_switch_on_a_cap_turns_off_its_size_and_its_rate() -> None:
    ledger = Ledger()
    ledger.add("cap", params={"jobs_per_minute": 1, "max_shots": 10})
    table = _table(ledger)
    for _ in range(3):
        verdict = table.lookup(KEY, 0, shots=100, disabled={"cap"})
        assert (verdict.status, verdict.disabled_action) == (200, "cap")


def test_apply_is_idempotent_per_seq_and_incremental_equals_batch() -> None:
    ledger = Ledger()
    ledger.add("throttle", params={"jobs_per_minute": 2})
    ledger.add("challenge", key=OTHER_KEY)
    ledger.add("revoke", actor="alice")
    ledger.add("approve", actor="bob", refers_to=3)
    incremental = DecisionTable()
    for record in ledger.items:
        assert incremental.apply(record)
        assert not incremental.apply(record)
    assert incremental.apply_all(ledger.items) == 0
    batch = _table(ledger)
    assert incremental.last_seq == batch.last_seq == 4
    for key in (KEY, OTHER_KEY):
        assert incremental.state(key, 0) == batch.state(key, 0)
    assert incremental.api_keys() == sorted([KEY, OTHER_KEY])


def test_concurrent_lookups_let_exactly_the_rate_through() -> None:
    ledger = Ledger()
    ledger.add("throttle", params={"jobs_per_minute": 50})
    table = _table(ledger)
    allowed: list[int] = []
    done = threading.Lock()

    def submit() -> None:
        mine = sum(table.lookup(KEY, 0).status == 200 for _ in range(40))
        with done:
            allowed.append(mine)

    def apply_more() -> None:  # a refresher applying records meanwhile
        for seq in range(20):
            table.apply(ledger.add("label", key=OTHER_KEY, at_ms=seq))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    threads.append(threading.Thread(target=apply_more))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 50
    assert table.last_seq == 21


@pytest.mark.parametrize("refers_to", [None, 99])
def test_a_deny_or_approval_of_nothing_is_flagged(refers_to: int | None) -> None:
    ledger = Ledger()
    ledger.add("deny", actor="bob", refers_to=refers_to)
    ledger.add("approve", actor="bob", refers_to=refers_to)
    flags = _table(ledger).state(KEY, 0).flags
    assert len(flags) == 2 and flags[0].startswith("seq 1:")
