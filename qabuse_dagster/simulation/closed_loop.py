"""The closed loop: mitigation decisions taken while the twin runs, and how actors react.

The twin first draws a :class:`Plan`: every actor's intended jobs, as if nobody
intervened. :func:`run_closed_loop` then lets a :class:`Controller` watch each api key's
telemetry and decide, at an instant, to ``throttle``, ``challenge`` or ``revoke`` the
key, or to ``release`` it. From that instant on, the actors who submit with the key
react the way their kind does (:data:`REACTIONS`):

* **throttle**: the key may submit :data:`THROTTLE_JOBS_PER_MINUTE` (a token bucket);
  a refused submission is a ``rejected`` record with ``rate_limited``. Well-behaved
  clients honour ``Retry-After`` and resubmit later, backing off exponentially, and
  abandon a job after :data:`MAX_RETRIES`; loops and bots hammer on.
* **challenge**: every submission needs a solved challenge (re-authentication). A
  person solves it after a few minutes and then works on (refused submissions are
  resubmitted); automation without a person (a CI suite) waits for one; an abuser
  cannot, and stops after a few ``challenge_required`` refusals, or never (a loop).
* **cap**: the throttle's bucket (at the decision's ``jobs_per_minute``), and a job over
  its ``max_shots`` or ``max_circuits`` runs on the ``reroute_backend`` simulator
  instead, or is refused with ``quota_exceeded`` when there is none.
* **revoke** (and **rotate**): every submission with the key is refused
  (``key_revoked``). A legitimate owner gets a new key after hours and resubmits with
  it; abusers stop.

A decision past its ``expires_at_ms`` restricts nothing; a ``review`` restricts nothing
by itself (it asks a person, whose answer is a later decision).

The loop is a discrete-event simulation ordered by decision time. A key's jobs are a
pure function of its plan and its decisions (:func:`realize_key`), and the draws of its
actors come from a stream seeded by the key, so a decision at ``t`` changes nothing
before ``t``. A controller sees one key at a time and must decide at ``t`` only from
that key's records before ``t``.

Queue times of the jobs a controller sees are those of the plan (the twin recomputes
the shared queue once the loop has run); only the refused, delayed and dropped jobs
differ, and those are the key's own.

Example:
    >>> REACTIONS["runaway_ci"].solves_challenge_s is None
    True
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from qabuse_dagster.response.decisions import Decision
from qabuse_dagster.simulation.jobs import MINUTE_MS, JobBatch
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.labels import IncidentLabel

__all__ = [
    "MAX_RETRIES",
    "REACTIONS",
    "THROTTLE_JOBS_PER_MINUTE",
    "ClosedLoopResult",
    "Controller",
    "Plan",
    "Reaction",
    "realize_key",
    "run_closed_loop",
]

#: Submissions a throttled key may make per minute (the bucket holds a minute's worth).
THROTTLE_JOBS_PER_MINUTE = 6
#: Refused attempts after which a well-behaved client abandons a job.
MAX_RETRIES = 8
#: Most decisions on one key: a controller that goes past it is looping.
MAX_DECISIONS_PER_KEY = 1000
_SECOND_MS = 1000


@dataclass(frozen=True)
class Reaction:
    """How one kind of actor responds to mitigation.

    Attributes:
        honours_rate_limit: Refused with ``rate_limited``, it waits and resubmits;
            otherwise it keeps submitting at its own pace.
        solves_challenge_s: Range of seconds it takes to solve a challenge, or None if
            it never can.
        rotates_key_s: Range of seconds until a revoked owner submits with a new key,
            or None if it never gets one.
        gives_up_after: Refusals (that it does not retry) after which it stops using
            the key for good; None: it never stops.
    """

    honours_rate_limit: bool
    solves_challenge_s: tuple[float, float] | None
    rotates_key_s: tuple[float, float] | None
    gives_up_after: int | None


_PERSON = Reaction(True, (60.0, 600.0), (2 * 3600.0, 8 * 3600.0), None)
#: Reactions by actor kind (a tenant's or a scenario's ``kind``).
REACTIONS: Mapping[str, Reaction] = {
    "research_group": _PERSON,
    "variational_loop": _PERSON,
    "classroom": Reaction(True, (60.0, 300.0), (3600.0, 4 * 3600.0), None),
    "benchmarking": Reaction(True, (300.0, 1800.0), (2 * 3600.0, 8 * 3600.0), None),
    # Nobody watches a CI suite: a challenge waits for a maintainer to notice.
    "ci_suite": Reaction(True, (1800.0, 7200.0), (2 * 3600.0, 8 * 3600.0), None),
    # A loop never reads its errors: it neither backs off nor stops.
    "runaway_ci": Reaction(False, None, None, None),
    "credential_stuffing": Reaction(False, None, None, 20),
    "key_leak": Reaction(True, None, None, 10),
    "credit_drain": Reaction(True, None, None, 5),
    "coordinated_botnet": Reaction(False, None, None, 30),
    "quota_farming": Reaction(True, None, None, 10),
    "low_and_slow": Reaction(True, None, None, 10),
}
#: Reaction of an actor kind missing from :data:`REACTIONS`: a person.
DEFAULT_REACTION = _PERSON


@dataclass(frozen=True)
class Plan:
    """What every actor of the twin intends to do, before anyone intervenes.

    Attributes:
        jobs: All intended jobs.
        actor: For each job, the index of its actor in ``actor_kinds``.
        actor_kinds: Kind of each actor (a tenant's or a scenario's ``kind``).
        api_keys: Hashed api key to the kind of tenant that owns it.
        labels: The incidents' ground truth.
        seed: The simulation seed (it also seeds the actors' reactions).
    """

    jobs: JobBatch
    actor: np.ndarray
    actor_kinds: tuple[str, ...]
    api_keys: dict[str, str]
    labels: list[IncidentLabel]
    seed: int


class Controller(Protocol):
    """Watches one api key at a time and decides mitigations."""

    def next_decision(
        self, api_key_id: str, jobs: JobBatch, decisions: Sequence[Decision], after_ms: int
    ) -> Decision | None:
        """The first decision on ``api_key_id`` strictly after ``after_ms``, or None.

        Args:
            api_key_id: The key.
            jobs: The key's jobs as they stand under ``decisions``.
            decisions: Decisions already taken on the key, in time order.
            after_ms: The last decision's instant (or the start of control, less 1).

        Returns:
            A decision at some ``t > after_ms`` that only depends on the key's records
            before ``t``, or None when the key needs none.
        """
        ...


@dataclass(frozen=True)
class ClosedLoopResult:
    """The jobs as they happened under the controller, and its decisions."""

    jobs: JobBatch
    actor: np.ndarray
    decisions: list[Decision] = field(default_factory=list)


def run_closed_loop(
    plan: Plan,
    controller: Controller,
    *,
    hasher: KeyedHasher,
    start_ms: int,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> ClosedLoopResult:
    """Run ``plan`` with ``controller`` deciding mitigations from ``start_ms`` on.

    Args:
        plan: The actors' intended jobs.
        controller: Decides, key by key, what to do and when.
        hasher: Hashes the new keys that revoked owners get.
        start_ms: First instant the controller may act at.
        progress: Progress callback factory (``progress(description, total)``).

    Returns:
        Every job as it happened (refusals, delays, new keys included), its actor, and
        the decisions in time order.

    Raises:
        ValueError: If the controller decides on another key, in the past, or loops.
    """
    jobs = plan.jobs
    order = np.argsort(jobs.api_key_id, kind="stable")
    keys, first = np.unique(jobs.api_key_id[order], return_index=True)
    bounds = [*first.tolist(), len(order)]
    positions = {str(k): np.sort(order[bounds[i] : bounds[i + 1]]) for i, k in enumerate(keys)}
    advance = progress("closing the loop", len(positions)) if progress else None
    heap: list[tuple[int, int, Decision]] = []
    for n, (key, where) in enumerate(positions.items()):
        decision = controller.next_decision(key, jobs.take(where), (), start_ms - 1)
        if decision is not None:
            _check_decision(decision, key, start_ms - 1)
            heapq.heappush(heap, (decision.at_ms, n, decision))
        if advance:
            advance(1)
    taken: dict[str, list[Decision]] = {}
    realized: dict[str, tuple[JobBatch, np.ndarray]] = {}
    timeline: list[Decision] = []
    while heap:
        at_ms, n, decision = heapq.heappop(heap)
        key = decision.api_key_id
        history = taken.setdefault(key, [])
        history.append(decision)
        timeline.append(decision)
        if len(history) > MAX_DECISIONS_PER_KEY:
            raise ValueError(f"controller took over {MAX_DECISIONS_PER_KEY} decisions on {key}")
        where = positions[key]
        realized[key] = realize_key(
            jobs.take(where),
            plan.actor[where],
            plan.actor_kinds,
            history,
            hasher=hasher,
            seed=plan.seed,
        )
        own, _ = realized[key]
        own = own.take(own.api_key_id == key)  # a new key starts with a clean record
        following = controller.next_decision(key, own, tuple(history), at_ms)
        if following is not None:
            _check_decision(following, key, at_ms)
            heapq.heappush(heap, (following.at_ms, n, following))
    untouched = np.sort(np.concatenate([positions[k] for k in positions if k not in realized]))
    parts = [jobs.take(untouched), *(batch for batch, _ in realized.values())]
    actors = [plan.actor[untouched], *(actor for _, actor in realized.values())]
    merged = JobBatch.concat(parts)
    by_time = np.argsort(merged.submit_ms, kind="stable")
    return ClosedLoopResult(
        jobs=merged.take(by_time), actor=np.concatenate(actors)[by_time], decisions=timeline
    )


def _check_decision(decision: Decision, key: str, after_ms: int) -> None:
    if decision.api_key_id != key:
        raise ValueError(f"asked about key {key}, the controller decided on {decision.api_key_id}")
    if decision.at_ms <= after_ms:
        raise ValueError(
            f"decision {decision.action} on {key} at {decision.at_ms} is not after {after_ms}: "
            "a controller cannot act in the past"
        )


@dataclass
class _ActorState:
    refused: int = 0
    gave_up: bool = False
    solved_at: dict[int, int] = field(default_factory=dict)  # challenge start -> solved
    new_key_at: dict[int, int] = field(default_factory=dict)  # revocation -> new key


def realize_key(
    jobs: JobBatch,
    actor: np.ndarray,
    actor_kinds: Sequence[str],
    decisions: Sequence[Decision],
    *,
    hasher: KeyedHasher,
    seed: int,
) -> tuple[JobBatch, np.ndarray]:
    """One key's jobs as they happen under ``decisions``: a pure function of its inputs.

    Args:
        jobs: The key's intended jobs (one api key).
        actor: Each job's actor, an index into ``actor_kinds``.
        actor_kinds: Kind of each actor; its :data:`REACTIONS` entry decides what it does.
        decisions: The decisions on the key, in time order.
        hasher: Hashes the new key a revoked owner gets.
        seed: The simulation seed; with the key, it seeds the actors' draws.

    Returns:
        The jobs that happened (refused attempts are ``rejected`` jobs with
        ``rate_limited``, ``challenge_required`` or ``key_revoked``; resubmissions carry
        a ``retry_count``) and each one's actor, in submission order.
    """
    if len(jobs) == 0 or not decisions:
        return jobs, actor
    realizer = _KeyRealizer(jobs, actor, actor_kinds, decisions, hasher=hasher, seed=seed)
    return realizer.run()


class _KeyRealizer:
    """The event loop of `realize_key`: one key's submissions in time order."""

    def __init__(
        self,
        jobs: JobBatch,
        actor: np.ndarray,
        actor_kinds: Sequence[str],
        decisions: Sequence[Decision],
        *,
        hasher: KeyedHasher,
        seed: int,
    ) -> None:
        self.jobs, self.actor, self.actor_kinds = jobs, actor, actor_kinds
        self.decisions = decisions
        self.times = [d.at_ms for d in decisions]
        self.key = str(jobs.api_key_id[0])
        self.hasher = hasher
        self.rng = np.random.default_rng([seed, zlib.crc32(self.key.encode())])
        self.rate_per_ms = THROTTLE_JOBS_PER_MINUTE / MINUTE_MS
        self.tokens, self.refilled_at, self.bucket_of = 0.0, 0, -1
        self.states: dict[int, _ActorState] = {}
        self.new_keys: dict[int, str] = {}
        self.pending = [(int(t), j, 0) for j, t in enumerate(jobs.submit_ms.tolist())]
        heapq.heapify(self.pending)
        # One entry per job that happened: (plan row, submit, refusal code, retry, new key).
        self.happened: list[tuple[int, int, str | None, int, str | None]] = []
        # Entries (by position in happened) that a cap rerouted, to which backend.
        self.rerouted: dict[int, str] = {}

    def level_at(self, t: int) -> tuple[str, int, Decision | None]:
        """The mitigation in force at ``t``, when it began, and the decision."""
        i = bisect.bisect_right(self.times, t) - 1
        while i >= 0 and self.decisions[i].action == "review":
            i -= 1  # a review asks a person; it restricts nothing by itself
        if i < 0 or self.decisions[i].action == "release":
            return "none", 0, None
        decision = self.decisions[i]
        if decision.expires_at_ms is not None and decision.expires_at_ms <= t:
            return "none", 0, None
        # A rotation is a revocation whose owner gets a new key: the twin's revoke already.
        level = "revoke" if decision.action == "rotate" else decision.action
        return level, decision.at_ms, decision

    def draw_ms(self, bounds: tuple[float, float]) -> int:
        return round(float(self.rng.uniform(*bounds)) * _SECOND_MS)

    def jitter_ms(self) -> int:
        return int(self.rng.integers(0, MINUTE_MS))

    def run(self) -> tuple[JobBatch, np.ndarray]:
        while self.pending:
            t, j, retry = heapq.heappop(self.pending)
            who = int(self.actor[j])
            state = self.states.setdefault(who, _ActorState())
            if not state.gave_up:
                reaction = REACTIONS.get(self.actor_kinds[who], DEFAULT_REACTION)
                self.submit(t, j, retry, reaction, state)
        return self.collect()

    def submit(self, t: int, j: int, retry: int, reaction: Reaction, state: _ActorState) -> None:
        """One submission attempt of job ``j`` at ``t``, under the mitigation in force."""
        level, since, decision = self.level_at(t)
        if level == "cap" and decision is not None and self.over_cap(j, decision):
            backend = decision.params.get("reroute_backend")
            if backend is None:
                self.refuse(t, j, retry, "quota_exceeded", None, reaction, state)
                return
            self.rerouted[len(self.happened)] = str(backend)
        if level == "revoke":
            if reaction.rotates_key_s is None:
                self.refuse(t, j, retry, "key_revoked", None, reaction, state)
                return
            ready = state.new_key_at.setdefault(since, since + self.draw_ms(reaction.rotates_key_s))
            if t >= ready:
                if since not in self.new_keys:
                    raw = f"{self.key}|rotated|{since}"
                    self.new_keys[since] = self.hasher.hash(raw, domain="api_key")
                self.happened.append((j, t, None, retry, self.new_keys[since]))
            else:
                self.refuse(t, j, retry, "key_revoked", ready + self.jitter_ms(), reaction, state)
        elif level == "challenge":
            if reaction.solves_challenge_s is None:
                self.refuse(t, j, retry, "challenge_required", None, reaction, state)
                return
            solved = state.solved_at.setdefault(
                since, since + self.draw_ms(reaction.solves_challenge_s)
            )
            if t >= solved:
                self.happened.append((j, t, None, retry, None))
            else:
                retry_at = solved + self.jitter_ms()
                self.refuse(t, j, retry, "challenge_required", retry_at, reaction, state)
        elif level in ("throttle", "cap"):
            per_minute = float(THROTTLE_JOBS_PER_MINUTE)
            if decision is not None:
                per_minute = float(decision.params.get("jobs_per_minute", per_minute))
            self.rate_per_ms = per_minute / MINUTE_MS
            if self.bucket_of != since:  # a new throttle starts with a full minute's worth
                self.tokens, self.refilled_at, self.bucket_of = float(per_minute), since, since
            self.tokens = min(
                float(per_minute), self.tokens + (t - self.refilled_at) * self.rate_per_ms
            )
            self.refilled_at = t
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                self.happened.append((j, t, None, retry, None))
            elif reaction.honours_rate_limit:
                # Retry-After is the wait for the next token; clients back off
                # exponentially from it, with jitter, as HTTP client libraries do.
                wait_ms = int(np.ceil((1.0 - self.tokens) / self.rate_per_ms))
                retry_at = t + wait_ms * 2**retry + int(self.rng.integers(0, wait_ms + 1))
                self.refuse(t, j, retry, "rate_limited", retry_at, reaction, state)
            else:
                self.refuse(t, j, retry, "rate_limited", None, reaction, state)
        else:
            self.happened.append((j, t, None, retry, None))

    def over_cap(self, j: int, decision: Decision) -> bool:
        """Whether job ``j`` is larger than the cap ``decision`` puts on the key."""
        max_shots = decision.params.get("max_shots")
        max_circuits = decision.params.get("max_circuits")
        too_many_shots = max_shots is not None and int(self.jobs.shots[j]) > int(max_shots)
        too_many_circuits = max_circuits is not None and int(self.jobs.num_circuits[j]) > int(
            max_circuits
        )
        return too_many_shots or too_many_circuits

    def refuse(
        self,
        t: int,
        j: int,
        retry: int,
        code: str,
        retry_at: int | None,
        reaction: Reaction,
        state: _ActorState,
    ) -> None:
        """Refuse the attempt; the actor retries at ``retry_at``, or counts it and may quit."""
        self.happened.append((j, t, code, retry, None))
        if retry_at is not None:
            if retry < MAX_RETRIES:
                heapq.heappush(self.pending, (retry_at, j, retry + 1))
            return
        state.refused += 1
        if reaction.gives_up_after is not None and state.refused >= reaction.gives_up_after:
            state.gave_up = True

    def collect(self) -> tuple[JobBatch, np.ndarray]:
        """The jobs that happened, as a batch in submission order, and their actors."""
        source = np.array([h[0] for h in self.happened], dtype=np.int64)
        refusal = np.empty(len(self.happened), dtype=object)
        refusal[:] = [h[2] for h in self.happened]
        new_key = np.empty(len(self.happened), dtype=object)
        new_key[:] = [h[4] for h in self.happened]
        refused = np.array([h[2] is not None for h in self.happened], dtype=bool)
        moved = np.array([h[4] is not None for h in self.happened], dtype=bool)
        happened = self.jobs.take(source)
        backend = happened.backend.copy()
        for position, name in self.rerouted.items():
            if refusal[position] is None:  # a rerouted attempt that a throttle refused did not run
                backend[position] = name
        error_code = happened.error_code.copy()
        error_code[refused] = refusal[refused]
        api_key_id = happened.api_key_id.copy()
        api_key_id[moved] = new_key[moved]
        happened = dataclasses.replace(
            happened,
            submit_ms=np.array([h[1] for h in self.happened], dtype=np.int64),
            api_key_id=api_key_id,
            backend=backend,
            error_code=error_code,
            queue_ms=np.where(refused, 0, happened.queue_ms),
            runtime_ms=np.where(refused, 0, happened.runtime_ms),
            rejected=happened.rejected | refused,
            retry_count=np.array([h[3] for h in self.happened], dtype=np.int64),
        )
        by_time = np.argsort(happened.submit_ms, kind="stable")
        return happened.take(by_time), self.actor[source][by_time]
