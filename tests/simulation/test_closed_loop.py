"""The twin's closed loop: how actors react to throttle, challenge, revoke and release."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from qabuse_dagster.response.decisions import Decision
from qabuse_dagster.simulation import simulate
from qabuse_dagster.simulation.closed_loop import (
    MAX_RETRIES,
    REACTIONS,
    THROTTLE_JOBS_PER_MINUTE,
    Plan,
    realize_key,
    run_closed_loop,
)
from qabuse_dagster.simulation.jobs import MINUTE_MS, JobBatch, epoch_ms, sample_jobs
from qabuse_dagster.simulation.tenants import make_identity
from qabuse_dagster.telemetry.hashing import KeyedHasher

HASHER = KeyedHasher(b"test-hash-key-for-the-closed-loop-0123")
T0 = datetime(2026, 11, 2, tzinfo=UTC)
T0_MS = epoch_ms(T0)
_SCHEMA = (
    Path(__file__).resolve().parents[2]
    / "qabuse_dagster"
    / "telemetry"
    / "schemas"
    / "telemetry-record.v1.schema.json"
)


def _jobs(per_minute: float, minutes: int, seed: int = 0, key: str = "k") -> JobBatch:
    """A steady stream of small jobs from one key over ``minutes``."""
    rng = np.random.default_rng(seed)
    identity = make_identity(HASHER, rng, raw_api_key=key, raw_users=[f"{key}@x"], n_scripts=1)
    n = round(per_minute * minutes)
    submit_ms = np.sort(rng.integers(T0_MS, T0_MS + minutes * MINUTE_MS, size=n))
    return sample_jobs(
        identity,
        rng,
        submit_ms=submit_ms,
        circuit=np.zeros(n, dtype=np.int64),
        shots=np.full(n, 100, dtype=np.int64),
        num_circuits=np.ones(n, dtype=np.int64),
        code_index=np.zeros(n, dtype=np.int64),
        failure_rate=0.0,
    )


def _realize(jobs: JobBatch, kind: str, decisions: Sequence[Decision]) -> JobBatch:
    happened, actor = realize_key(
        jobs, np.zeros(len(jobs), dtype=np.int64), (kind,), decisions, hasher=HASHER, seed=1
    )
    assert len(actor) == len(happened)
    return happened


def _at(minutes: float, action: str, key: str) -> Decision:
    return Decision(T0_MS + round(minutes * MINUTE_MS), key, action)  # type: ignore[arg-type]


def _key(jobs: JobBatch) -> str:
    return str(jobs.api_key_id[0])


def test_no_decision_leaves_the_plan_alone() -> None:
    jobs = _jobs(10, 30)
    assert _realize(jobs, "runaway_ci", []) is jobs


def test_nothing_before_a_decision_changes() -> None:
    jobs = _jobs(60, 60)
    decision = _at(20, "challenge", _key(jobs))
    happened = _realize(jobs, "runaway_ci", [decision])
    before = happened.submit_ms < decision.at_ms
    planned_before = jobs.submit_ms < decision.at_ms
    np.testing.assert_array_equal(happened.submit_ms[before], jobs.submit_ms[planned_before])
    assert not happened.rejected[before].any()
    assert (happened.retry_count[before] == 0).all()


def test_a_throttled_loop_is_held_to_the_rate_and_its_excess_refused() -> None:
    jobs = _jobs(60, 60)
    throttle = _at(10, "throttle", _key(jobs))
    happened = _realize(jobs, "runaway_ci", [throttle])

    after = happened.submit_ms >= throttle.at_ms
    ran = after & ~happened.rejected
    refused = after & happened.rejected
    # A loop does not back off: every attempt is made once, the excess refused.
    assert after.sum() == (jobs.submit_ms >= throttle.at_ms).sum()
    assert set(happened.error_code[refused]) == {"rate_limited"}
    assert (happened.retry_count == 0).all()
    minutes = (happened.submit_ms[ran] - throttle.at_ms) // MINUTE_MS
    per_minute = np.bincount(minutes)
    # A full bucket (one minute's worth) at the start, then the refill rate.
    assert per_minute.max() <= 2 * THROTTLE_JOBS_PER_MINUTE
    assert ran.sum() <= THROTTLE_JOBS_PER_MINUTE * (len(per_minute) + 1)
    assert refused.sum() > 30 * 40


def test_a_throttled_person_backs_off_and_loses_no_job_below_the_rate() -> None:
    # Bursty, but on average under the throttle's rate: backing off absorbs the bursts.
    jobs = _jobs(0.8 * THROTTLE_JOBS_PER_MINUTE, 60, seed=2)
    throttle = _at(5, "throttle", _key(jobs))
    happened = _realize(jobs, "research_group", [throttle])

    ran = happened.take(~happened.rejected)
    refused = happened.take(happened.rejected)
    assert len(ran) == len(jobs)  # each job runs, some later
    assert len(refused) > 0 and set(refused.error_code) == {"rate_limited"}
    assert (ran.retry_count > 0).any()
    assert ran.submit_ms.max() >= jobs.submit_ms.max()


def test_a_person_over_the_rate_abandons_jobs_after_the_last_retry() -> None:
    jobs = _jobs(3 * THROTTLE_JOBS_PER_MINUTE, 30, seed=2)
    throttle = _at(0, "throttle", _key(jobs))
    happened = _realize(jobs, "research_group", [throttle])

    ran = happened.take(~happened.rejected)
    assert happened.retry_count.max() == MAX_RETRIES
    assert len(ran) < len(jobs)
    # Attempts of one job: the first and at most MAX_RETRIES more.
    assert len(happened) <= len(jobs) * (MAX_RETRIES + 1)


def test_a_challenge_stops_a_bot_that_gives_up() -> None:
    jobs = _jobs(30, 60, seed=3)
    challenge = _at(10, "challenge", _key(jobs))
    happened = _realize(jobs, "credential_stuffing", [challenge])

    after = happened.take(happened.submit_ms >= challenge.at_ms)
    assert after.rejected.all()
    assert set(after.error_code) == {"challenge_required"}
    assert len(after) == REACTIONS["credential_stuffing"].gives_up_after


def test_a_person_solves_a_challenge_and_works_on() -> None:
    jobs = _jobs(6, 120, seed=4)
    challenge = _at(30, "challenge", _key(jobs))
    happened = _realize(jobs, "research_group", [challenge])

    ran = happened.take(~happened.rejected & (happened.submit_ms >= challenge.at_ms))
    refused = happened.take(happened.rejected)
    low, high = REACTIONS["research_group"].solves_challenge_s or (0.0, 0.0)
    delay_s = (ran.submit_ms.min() - challenge.at_ms) / 1000.0
    assert low <= delay_s <= high + 60.0  # the solve time, then up to a minute's jitter
    assert set(refused.error_code) == {"challenge_required"}
    assert len(ran) == (jobs.submit_ms >= challenge.at_ms).sum()


def test_a_revoked_owner_moves_to_a_new_key_and_abusers_stop() -> None:
    jobs = _jobs(6, 12 * 60, seed=5)
    key = _key(jobs)
    revoke = _at(30, "revoke", key)

    owner = _realize(jobs, "research_group", [revoke])
    new_keys = set(owner.api_key_id.tolist()) - {key}
    assert len(new_keys) == 1
    on_old = owner.take((owner.api_key_id == key) & (owner.submit_ms >= revoke.at_ms))
    assert on_old.rejected.all() and set(on_old.error_code) == {"key_revoked"}
    on_new = owner.take(owner.api_key_id != key)
    low, _ = REACTIONS["research_group"].rotates_key_s or (0.0, 0.0)
    assert on_new.submit_ms.min() >= revoke.at_ms + low * 1000
    assert not on_new.rejected.any()

    drained = _realize(jobs, "credit_drain", [revoke])
    after = drained.take(drained.submit_ms >= revoke.at_ms)
    assert set(after.api_key_id) == {key}
    assert len(after) == REACTIONS["credit_drain"].gives_up_after


def test_release_lets_a_loop_that_never_gave_up_run_again() -> None:
    jobs = _jobs(30, 90, seed=6)
    key = _key(jobs)
    decisions = [_at(10, "challenge", key), _at(40, "release", key)]
    happened = _realize(jobs, "runaway_ci", decisions)

    released = happened.take(happened.submit_ms >= decisions[1].at_ms)
    challenged = happened.take(
        (happened.submit_ms >= decisions[0].at_ms) & (happened.submit_ms < decisions[1].at_ms)
    )
    assert challenged.rejected.all()
    assert not released.rejected.any()


def test_realizing_is_deterministic() -> None:
    jobs = _jobs(20, 60, seed=7)
    decisions = [_at(5, "throttle", _key(jobs)), _at(25, "challenge", _key(jobs))]
    a = _realize(jobs, "ci_suite", decisions)
    b = _realize(jobs, "ci_suite", decisions)
    np.testing.assert_array_equal(a.submit_ms, b.submit_ms)
    np.testing.assert_array_equal(a.error_code, b.error_code)


class ScriptedController:
    """A fake controller: replays fixed decisions per key, one after the other."""

    def __init__(self, script: dict[str, list[Decision]]) -> None:
        self.script = script
        self.seen: list[tuple[str, int]] = []

    def next_decision(
        self, api_key_id: str, jobs: JobBatch, decisions: Sequence[Decision], after_ms: int
    ) -> Decision | None:
        self.seen.append((api_key_id, len(jobs)))
        queue = self.script.get(api_key_id, [])
        return queue[len(decisions)] if len(decisions) < len(queue) else None


def _plan() -> Plan:
    loop = _jobs(40, 60, seed=8, key="loop")
    person = _jobs(4, 60, seed=9, key="person")
    return Plan(
        jobs=JobBatch.concat([loop, person]),
        actor=np.repeat([0, 1], [len(loop), len(person)]),
        actor_kinds=("runaway_ci", "research_group"),
        api_keys={_key(loop): "runaway_ci", _key(person): "research_group"},
        labels=[],
        seed=1,
    )


def test_the_loop_applies_each_key_s_decisions_and_keeps_the_others_jobs() -> None:
    plan = _plan()
    loop_key = str(plan.jobs.api_key_id[0])
    script = {loop_key: [_at(10, "throttle", loop_key), _at(20, "challenge", loop_key)]}
    controller = ScriptedController(script)

    result = run_closed_loop(plan, controller, hasher=HASHER, start_ms=T0_MS)

    assert [d.action for d in result.decisions] == ["throttle", "challenge"]
    assert np.all(np.diff(result.jobs.submit_ms) >= 0)
    person = plan.jobs.take(plan.actor == 1)
    after = result.jobs.take(result.actor == 1)
    np.testing.assert_array_equal(np.sort(after.submit_ms), np.sort(person.submit_ms))
    loop_after = result.jobs.take(
        (result.actor == 0) & (result.jobs.submit_ms >= script[loop_key][1].at_ms)
    )
    assert loop_after.rejected.all()
    # Asked once per key at the start, then again after each of its decisions.
    assert len(controller.seen) == 2 + 2


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda key: Decision(T0_MS - 1, key, "throttle"), "in the past"),
        (lambda key: Decision(T0_MS + 1, "another-key", "throttle"), "decided on another-key"),
    ],
)
def test_a_controller_cannot_act_in_the_past_or_on_another_key(make, match) -> None:  # type: ignore[no-untyped-def]
    plan = _plan()
    key = str(plan.jobs.api_key_id[0])
    with pytest.raises(ValueError, match=match):
        run_closed_loop(plan, ScriptedController({key: [make(key)]}), hasher=HASHER, start_ms=T0_MS)


def test_an_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown action"):
        Decision(0, "k", "ban")  # type: ignore[arg-type]


class ThrottleRunaway:
    """A fake controller: throttles and then challenges the runaway CI key at fixed times."""

    def __init__(self, key: str, onset: datetime) -> None:
        self.key, self.onset_ms = key, epoch_ms(onset)

    def next_decision(
        self, api_key_id: str, jobs: JobBatch, decisions: Sequence[Decision], after_ms: int
    ) -> Decision | None:
        if api_key_id != self.key or len(decisions) >= 2:
            return None
        action = "throttle" if not decisions else "challenge"
        return Decision(self.onset_ms + (len(decisions) + 1) * MINUTE_MS, api_key_id, action)


def test_simulate_in_closed_loop_writes_contract_records_of_the_refusals(tmp_path: Path) -> None:
    open_loop = simulate(hours=6, seed=5, out=tmp_path / "open", hasher=HASHER)
    runaway = open_loop.incident_api_key_ids[0]
    onset = open_loop.incidents[0].start
    closed = simulate(
        hours=6,
        seed=5,
        out=tmp_path / "closed",
        hasher=HASHER,
        controller=ThrottleRunaway(runaway, onset),
        control_from=onset - timedelta(hours=1),
    )

    assert [d.action for d in closed.decisions] == ["throttle", "challenge"]
    validator = Draft202012Validator(json.loads(_SCHEMA.read_text()))
    records = [json.loads(line) for line in closed.telemetry_path.read_text().splitlines()]
    for record in records:
        validator.validate(record)
    codes = {r["error_code"] for r in records if r["api_key_id"] == runaway}
    assert {"rate_limited", "challenge_required"} <= codes
    ran_open = sum(
        1
        for line in open_loop.telemetry_path.read_text().splitlines()
        if runaway in line and '"status":"completed"' in line
    )
    ran_closed = sum(
        1 for r in records if r["api_key_id"] == runaway and r["status"] == "completed"
    )
    assert ran_closed < 0.1 * ran_open
    manifest = json.loads((tmp_path / "closed" / "twin.json").read_text())
    assert manifest["seed"] == 5 and manifest["scenarios"] is None


def _capped(minutes: float, key: str, reroute: str | None) -> Decision:
    params = {"jobs_per_minute": 1000.0, "max_shots": 1000, "max_circuits": 5}
    params["reroute_backend"] = reroute  # type: ignore[assignment]
    return Decision(T0_MS + round(minutes * MINUTE_MS), key, "cap", "test", params)


def test_a_cap_reroutes_the_oversized_jobs_to_a_simulator_and_leaves_the_rest() -> None:
    jobs = _jobs(2, 60)
    big = np.arange(len(jobs)) % 2 == 0
    jobs = dataclasses.replace(jobs, shots=np.where(big, 2_000_000, 100))
    cap = _capped(10, _key(jobs), "aer_simulator")
    happened = _realize(jobs, "credit_drain", [cap])
    after = happened.submit_ms >= cap.at_ms
    assert not happened.rejected.any()
    oversized = after & (happened.shots > 1000)
    assert oversized.sum() > 10
    assert set(happened.backend[oversized]) == {"aer_simulator"}
    assert "aer_simulator" not in set(happened.backend[~oversized])


def test_a_cap_without_a_simulator_refuses_the_oversized_jobs() -> None:
    jobs = _jobs(2, 60)
    jobs = dataclasses.replace(jobs, num_circuits=np.full(len(jobs), 50))
    cap = _capped(10, _key(jobs), None)
    happened = _realize(jobs, "research_group", [cap])
    after = happened.submit_ms >= cap.at_ms
    assert set(happened.error_code[after & happened.rejected]) == {"quota_exceeded"}
    assert (happened.rejected == after).all()


def test_an_expired_restriction_no_longer_refuses() -> None:
    jobs = _jobs(60, 60)
    key = _key(jobs)
    at, until = T0_MS + 10 * MINUTE_MS, T0_MS + 20 * MINUTE_MS
    throttle = Decision(at, key, "throttle", "test", {"jobs_per_minute": 1.0}, until)
    happened = _realize(jobs, "runaway_ci", [throttle])
    during = (happened.submit_ms >= at) & (happened.submit_ms < until)
    assert happened.rejected[during].sum() > 100
    assert not happened.rejected[happened.submit_ms >= until].any()


def test_a_rotation_gives_the_owner_a_new_key_as_a_revocation_does() -> None:
    jobs = _jobs(1, 24 * 60)
    rotate = _at(10, "rotate", _key(jobs))
    happened = _realize(jobs, "research_group", [rotate])
    assert len(set(happened.api_key_id.tolist())) == 2
    assert "key_revoked" in set(happened.error_code.tolist())
