"""The mitigation in force on each api key, in memory, kept current from the ledger.

The gateway answers every submission from a :class:`DecisionTable`: a lookup is a dict
read and a few comparisons, with no model, database or network on the request path. The
table is a fold over the ledger's records, applied in ``seq`` order (:meth:`~DecisionTable.
apply` skips a ``seq`` it has already seen, so replaying is harmless):

* ``throttle``, ``cap`` and ``challenge`` entries put their rung in force from ``at_ms``
  until ``expires_at_ms`` (None: until released); a newer entry of a rung replaces the
  older one.
* ``rotate`` and ``revoke`` are proposals: they wait for an ``approve`` entry that refers
  to them (``refers_to``) from a principal other than the proposer (maker-checker), and
  take effect from the approval. An approval by the proposer, or by ``system``, is
  ignored and flagged; a ``deny`` cancels the proposal. A rotation or revocation that a
  ``review`` held back, entered with ``refers_to`` = that review once another principal
  approved it, takes effect at once: the review's approval was the check.
* ``release`` lifts everything on the key (an enforce release lifts shadow state too);
  ``uphold_appeal`` releases the key; ``challenge_solved`` lifts the challenge it refers
  to; ``deny`` on an action already in force lifts it.
* ``review`` restricts nothing; it stays visible in :meth:`~DecisionTable.state` until an
  ``approve`` or ``deny`` refers to it (the action it held back, if approved, comes as an
  entry of its own) or a release. Appeals stay open there until upheld or rejected.
* ``shadow`` entries never restrict. The table keeps them as a second layer and reports
  what they would have done as :attr:`Verdict.shadow_action`.

What :meth:`~DecisionTable.lookup` answers, most severe rung first:

* ``revoke`` / ``rotate`` in force: 403.
* ``challenge`` in force: 403, unless the request proves it solved this very challenge
  decision (``solved_challenge`` is its ``seq``; a proof of an older challenge does not
  count).
* ``cap`` in force and the job larger than ``max_shots`` or ``max_circuits``: 403, or
  200 with ``params["reroute_backend"]`` when the cap names a simulator to reroute to.
* ``throttle`` (or a ``cap`` carrying ``jobs_per_minute``): a token bucket per key of
  ``jobs_per_minute`` tokens, refilled at that rate; 429 with ``retry_after_s`` (at least
  1) once it is empty. ``max_concurrent`` is passed along in ``params`` but not counted
  here: the gateway sees submissions, never completions.

Example:
    >>> from qabuse_dagster.response.records import LedgerEntry, LedgerRecord
    >>> entry = LedgerEntry(at_ms=0, api_key_id="ab" * 8, action="throttle", actor="system",
    ...                     reason="score 0.9", params={"jobs_per_minute": 1})
    >>> table = DecisionTable.from_records([LedgerRecord(1, entry, "0" * 64, "1" * 64, 0)])
    >>> table.lookup("ab" * 8, 1_000).status, table.lookup("ab" * 8, 2_000).status
    (200, 429)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qabuse_dagster.response.decisions import HIGH_IMPACT_ACTIONS
from qabuse_dagster.response.records import MODEL_EVENTS, LedgerEntry, LedgerRecord, Mode

__all__ = [
    "ALLOW",
    "DEFAULT_JOBS_PER_MINUTE",
    "DecisionTable",
    "KeyState",
    "Mitigation",
    "Verdict",
]

logger = logging.getLogger(__name__)

#: A throttle whose entry lacks a usable ``jobs_per_minute`` still brakes, at the ladder's
#: default rate, rather than letting everything through.
DEFAULT_JOBS_PER_MINUTE = 6.0

_MINUTE_MS = 60_000
_RESTRICTING = ("throttle", "cap", "challenge", "rotate", "revoke")
#: Rungs that refuse outright, most severe first.
_BLOCKING = ("revoke", "rotate")
#: Rungs whose ``jobs_per_minute`` rate-limits the key.
_RATED = ("cap", "throttle")
_FLAGS_KEPT = 32

_CAP_LIMITS = ("max_shots", "max_circuits")
_REFUSALS = {
    "revoke": "the api key is revoked",
    "rotate": "the api key was rotated: use its replacement",
    "challenge": "the api key is challenged: its owner must solve the challenge",
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gateway should answer for one submission.

    Attributes:
        action: ``allow``, or the rung that decided (``throttle``, ``cap``, ...).
        status: 200, 429 (rate) or 403 (refused).
        retry_after_s: For a 429, whole seconds until the next token (at least 1).
        params: The deciding entry's parameters, e.g. ``reroute_backend`` for a cap.
        reason: Why, in words for the caller.
        seq: Ledger ``seq`` of the deciding entry.
        shadow_action: What a rung in shadow mode, or a shadow entry, would have done.
        disabled_action: A rung in force that the kill switch turned off.
    """

    action: str
    status: int = 200
    retry_after_s: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""
    seq: int | None = None
    shadow_action: str | None = None
    disabled_action: str | None = None

    @property
    def reroute_backend(self) -> str | None:
        """The backend a capped job goes to instead, for a 200 that reroutes."""
        if self.status != 200 or self.action != "cap":
            return None
        backend = self.params.get("reroute_backend")
        return str(backend) if backend else None


#: The verdict for a key with nothing on it.
ALLOW = Verdict("allow")


@dataclass(frozen=True, slots=True)
class Mitigation:
    """One action entry as the table holds it.

    Attributes:
        seq: The entry's ledger ``seq``.
        action: ``throttle``, ``cap``, ``challenge``, ``rotate``, ``revoke`` or ``review``.
        actor: Who took or proposed it.
        reason: Why (the ledger's words).
        params: Its parameters.
        mode: ``enforce`` or ``shadow``.
        at_ms: When it takes effect; for an approved proposal, the approval if later.
        until_ms: When it stops: its expiry or a release, whichever comes first; None for
            never.
        approved_by: The approving principal of a rotation or revocation.
    """

    seq: int
    action: str
    actor: str
    reason: str
    params: Mapping[str, Any]
    mode: Mode
    at_ms: int
    until_ms: int | None
    approved_by: str | None = None

    @classmethod
    def of(cls, seq: int, entry: LedgerEntry) -> Mitigation:
        return cls(
            seq,
            entry.action,
            entry.actor,
            entry.reason,
            entry.params,
            entry.mode,
            entry.at_ms,
            entry.expires_at_ms,
        )

    def in_force(self, now_ms: int) -> bool:
        """Whether it applies at ``now_ms``: started, not expired, not lifted."""
        return self.at_ms <= now_ms and (self.until_ms is None or now_ms < self.until_ms)

    def lifted(self, at_ms: int) -> Mitigation:
        """The same mitigation, ending at ``at_ms`` at the latest."""
        until = at_ms if self.until_ms is None else min(self.until_ms, at_ms)
        return dataclasses.replace(self, until_ms=until)


@dataclass(frozen=True)
class KeyState:
    """One key's part of the table at an instant, for people and tests.

    Attributes:
        api_key_id: The key.
        in_force: Enforced mitigations in force, in ledger order.
        shadow: Shadow mitigations that would be in force.
        proposals: Rotations and revocations waiting for a second principal.
        reviews: Requests for a person to look at the key.
        appeals: ``seq`` of the owner's open appeals.
        flags: Entries the table ignored and why (e.g. a self-approval), newest last.
    """

    api_key_id: str
    in_force: tuple[Mitigation, ...] = ()
    shadow: tuple[Mitigation, ...] = ()
    proposals: tuple[Mitigation, ...] = ()
    reviews: tuple[Mitigation, ...] = ()
    appeals: tuple[int, ...] = ()
    flags: tuple[str, ...] = ()


class _Bucket:
    """A token bucket of ``capacity`` tokens refilled at ``rate_per_ms``."""

    __slots__ = ("capacity", "rate_per_ms", "tokens", "updated_ms")

    def __init__(self, jobs_per_minute: float, now_ms: int) -> None:
        # At least one token, or a rate under one a minute would never let a job through.
        self.capacity = max(1.0, jobs_per_minute)
        self.rate_per_ms = jobs_per_minute / _MINUTE_MS
        self.tokens = self.capacity
        self.updated_ms = now_ms

    def refill(self, now_ms: int) -> None:
        if now_ms > self.updated_ms:  # a clock that steps back refills nothing
            elapsed = now_ms - self.updated_ms
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate_per_ms)
            self.updated_ms = now_ms

    def wait_s(self) -> int:
        """Whole seconds until the next token; at least 1, as ``Retry-After`` needs."""
        return max(1, math.ceil((1.0 - self.tokens) / self.rate_per_ms / 1000))


class _Layer:
    """One mode's state on one key: enforced, or shadow."""

    __slots__ = ("buckets", "proposals", "reviews", "rungs")

    def __init__(self) -> None:
        self.rungs: dict[str, Mitigation] = {}
        self.proposals: dict[int, Mitigation] = {}
        self.reviews: dict[int, Mitigation] = {}
        self.buckets: dict[str, tuple[int, _Bucket]] = {}

    def lift_all(self, at_ms: int) -> None:
        self.rungs = {rung: m.lifted(at_ms) for rung, m in self.rungs.items()}
        self.proposals.clear()
        self.reviews.clear()

    def lift_seq(self, seq: int, at_ms: int) -> bool:
        """Cancel or lift the entry ``seq`` holds here; whether it was here."""
        if self.proposals.pop(seq, None) is not None or self.reviews.pop(seq, None) is not None:
            return True
        for rung, m in self.rungs.items():
            if m.seq == seq:
                self.rungs[rung] = m.lifted(at_ms)
                return True
        return False

    def judge(
        self,
        now_ms: int,
        shots: int | None,
        circuits: int | None,
        solved_challenge: int | None,
        shadow: Collection[str],
        disabled: Collection[str],
    ) -> tuple[Verdict | None, str | None, str | None]:
        """(the refusal or reroute, or None to allow; first shadowed rung; first disabled rung).

        A rung in ``shadow`` that would refuse is noted and skipped, so a milder enforced
        rung still applies; a rung in ``disabled`` is skipped as if it were not in force.
        """
        shadowed: str | None = None
        switched_off: str | None = None
        rungs = self.rungs
        for rung in (*_BLOCKING, "challenge"):
            m = rungs.get(rung)
            if m is None or not m.in_force(now_ms):
                continue
            if rung in disabled:
                switched_off = switched_off or rung
            elif rung == "challenge" and solved_challenge == m.seq:
                continue
            elif rung in shadow:
                shadowed = shadowed or rung
            else:
                return Verdict(rung, 403, None, m.params, _reason(m), m.seq), shadowed, switched_off
        reroute: Mitigation | None = None
        cap = rungs.get("cap")
        if (
            cap is not None
            and cap.in_force(now_ms)
            and "cap" not in disabled  # noted with the rates below
            and _over_cap(cap.params, shots, circuits)
        ):
            if "cap" in shadow:
                shadowed = shadowed or "cap"
            elif cap.params.get("reroute_backend"):
                reroute = cap
            else:
                verdict = Verdict("cap", 403, None, cap.params, _reason(cap), cap.seq)
                return verdict, shadowed, switched_off
        taking: list[_Bucket] = []
        for rung in _RATED:
            m = rungs.get(rung)
            if m is None or not m.in_force(now_ms):
                continue
            if rung in disabled:
                switched_off = switched_off or rung
                continue
            bucket = self._bucket(m, now_ms)
            if bucket is None:
                continue
            bucket.refill(now_ms)
            if bucket.tokens >= 1.0:
                taking.append(bucket)
            elif rung in shadow:
                shadowed = shadowed or rung
            else:
                reason = _reason(m, over_rate=True)
                verdict = Verdict(rung, 429, bucket.wait_s(), m.params, reason, m.seq)
                return verdict, shadowed, switched_off
        for bucket in taking:  # only once every rate passed: a refused job costs no token
            bucket.tokens -= 1.0
        if reroute is not None:
            verdict = Verdict("cap", 200, None, reroute.params, _reason(reroute), reroute.seq)
            return verdict, shadowed, switched_off
        return None, shadowed, switched_off

    def _bucket(self, m: Mitigation, now_ms: int) -> _Bucket | None:
        held = self.buckets.get(m.action)
        if held is not None and held[0] == m.seq:
            return held[1]
        rate = _jobs_per_minute(m)
        if rate is None:
            return None
        bucket = _Bucket(rate, now_ms)  # a new throttle starts with a full minute's worth
        self.buckets[m.action] = (m.seq, bucket)
        return bucket


class _Key:
    __slots__ = ("appeals", "approved_reviews", "enforce", "flags", "shadow")

    def __init__(self) -> None:
        self.enforce = _Layer()
        self.shadow = _Layer()
        self.appeals: dict[int, int | None] = {}
        self.approved_reviews: dict[int, str] = {}  # review seq -> its approver
        self.flags: deque[str] = deque(maxlen=_FLAGS_KEPT)


class DecisionTable:
    """The mitigation in force per api key (see the module docstring). Thread-safe.

    Example:
        >>> DecisionTable().lookup("ab" * 8, 0) is ALLOW
        True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._last_seq = 0

    @classmethod
    def from_records(cls, records: Iterable[LedgerRecord]) -> DecisionTable:
        """A table holding every record of ``records`` (in ``seq`` order)."""
        table = cls()
        table.apply_all(records)
        return table

    @property
    def last_seq(self) -> int:
        """The highest ``seq`` applied so far (0 for none): where a refresher resumes."""
        return self._last_seq

    def apply_all(self, records: Iterable[LedgerRecord]) -> int:
        """Apply each record in turn; how many were new."""
        return sum(self.apply(record) for record in records)

    def apply(self, record: LedgerRecord) -> bool:
        """Fold one ledger record into the table; False if its ``seq`` was already applied.

        Records must come in ``seq`` order: one at or below :attr:`last_seq` is skipped.
        """
        with self._lock:
            if record.seq <= self._last_seq:
                return False
            if record.seq != self._last_seq + 1:
                logger.warning("ledger records jump from seq %d to %d", self._last_seq, record.seq)
            self._last_seq = record.seq
            self._fold(record.seq, record.entry)
            return True

    def lookup(
        self,
        api_key_id: str,
        now_ms: int,
        *,
        shots: int | None = None,
        circuits: int | None = None,
        solved_challenge: int | None = None,
        shadow: Collection[str] = (),
        disabled: Collection[str] = (),
    ) -> Verdict:
        """The verdict for one submission of ``api_key_id`` at ``now_ms``.

        Constant time and free of I/O. An allowed submission takes a token from the key's
        rate bucket, if it is throttled.

        Args:
            api_key_id: The submitting key.
            now_ms: The submission's instant (epoch milliseconds).
            shots: Shots the job asks for, when known (the cap's check).
            circuits: Circuits in the job, when known.
            solved_challenge: ``seq`` of the challenge decision the request proves it
                solved (a verified proof's ``decision_seq``).
            shadow: Rungs the gateway runs in shadow mode: they only report.
            disabled: Rungs the kill switch turned off: as if not in force.
        """
        key = self._keys.get(api_key_id)
        if key is None:  # most keys: a dict read (atomic under the GIL), no lock
            return ALLOW
        with self._lock:
            verdict, shadowed, switched_off = key.enforce.judge(
                now_ms, shots, circuits, solved_challenge, shadow, disabled
            )
            if shadowed is None and (verdict is None or verdict.status == 200):
                would, _, _ = key.shadow.judge(
                    now_ms, shots, circuits, solved_challenge, (), disabled
                )
                shadowed = None if would is None else would.action
        if verdict is None:
            if shadowed is None and switched_off is None:
                return ALLOW
            return Verdict("allow", shadow_action=shadowed, disabled_action=switched_off)
        return dataclasses.replace(verdict, shadow_action=shadowed, disabled_action=switched_off)

    def state(self, api_key_id: str, now_ms: int) -> KeyState:
        """What is in force, proposed, under review and flagged on ``api_key_id`` at ``now_ms``."""
        with self._lock:
            key = self._keys.get(api_key_id)
            if key is None:
                return KeyState(api_key_id)
            layers = (key.enforce, key.shadow)
            return KeyState(
                api_key_id,
                in_force=_in_force(key.enforce, now_ms),
                shadow=_in_force(key.shadow, now_ms),
                proposals=_by_seq(m for held in layers for m in held.proposals.values()),
                reviews=_by_seq(m for held in layers for m in held.reviews.values()),
                appeals=tuple(sorted(key.appeals)),
                flags=tuple(key.flags),
            )

    def api_keys(self) -> list[str]:
        """Every key the ledger has named so far."""
        with self._lock:
            return sorted(self._keys)

    def _fold(self, seq: int, entry: LedgerEntry) -> None:
        if entry.action in MODEL_EVENTS:
            return  # about the served model, not a key's access
        key = self._keys.get(entry.api_key_id)
        if key is None:
            key = self._keys[entry.api_key_id] = _Key()
        layer = key.shadow if entry.mode == "shadow" else key.enforce
        action = entry.action
        if action in HIGH_IMPACT_ACTIONS:
            ref = entry.refers_to
            reviewer = None if ref is None else key.approved_reviews.pop(ref, None)
            if reviewer is None:
                layer.proposals[seq] = Mitigation.of(seq, entry)
            else:
                checked = Mitigation.of(seq, entry)
                layer.rungs[action] = dataclasses.replace(checked, approved_by=reviewer)
        elif action in _RESTRICTING:
            if action == "throttle" and _stated_rate(entry.params) is None:
                _flag(
                    key,
                    seq,
                    f"throttle without a usable jobs_per_minute: "
                    f"{DEFAULT_JOBS_PER_MINUTE:g} a minute",
                )
            layer.rungs[action] = Mitigation.of(seq, entry)
        elif action == "review":
            layer.reviews[seq] = Mitigation.of(seq, entry)
        elif action == "release":
            for lifted in (key.shadow,) if entry.mode == "shadow" else (key.enforce, key.shadow):
                lifted.lift_all(entry.at_ms)
        elif action == "approve":
            self._approve(key, seq, entry)
        elif action == "deny":
            ref = entry.refers_to
            if ref is None or not (
                key.enforce.lift_seq(ref, entry.at_ms) or key.shadow.lift_seq(ref, entry.at_ms)
            ):
                _flag(key, seq, f"deny refers to {entry.refers_to}, nothing on this key")
        elif action == "appeal":
            key.appeals[seq] = entry.refers_to
        elif action in ("uphold_appeal", "reject_appeal"):
            ref = entry.refers_to
            for appeal, target in list(key.appeals.items()):
                if ref in (appeal, target):
                    del key.appeals[appeal]
            if action == "uphold_appeal":
                key.enforce.lift_all(entry.at_ms)
                key.shadow.lift_all(entry.at_ms)
        elif action == "challenge_solved":
            for held in (key.enforce, key.shadow):
                challenge = held.rungs.get("challenge")
                if challenge is not None and entry.refers_to in (None, challenge.seq):
                    held.rungs["challenge"] = challenge.lifted(entry.at_ms)
        # "label" changes nothing in force: it is for training and evaluation.

    def _approve(self, key: _Key, seq: int, entry: LedgerEntry) -> None:
        ref = entry.refers_to
        for layer in (key.enforce, key.shadow):
            proposal = None if ref is None else layer.proposals.get(ref, layer.reviews.get(ref))
            if proposal is not None:
                break
        else:
            _flag(key, seq, f"approval of {ref}, which is no pending proposal or review here")
            return
        if entry.actor in (proposal.actor, "system"):
            # Maker-checker: the second pair of eyes must be a second person.
            who = "its proposer" if entry.actor == proposal.actor else "system"
            _flag(
                key,
                seq,
                f"approval of {proposal.action} {ref} by {who} "
                f"({entry.actor}) ignored: it needs another principal",
            )
            logger.warning(
                "ledger seq %d: %s approved %s %d, proposed by %s; not enforced",
                seq,
                entry.actor,
                proposal.action,
                ref,
                proposal.actor,
            )
            return
        if proposal.action == "review":
            # Resolved; what it held back comes as an entry of its own, referring to it.
            del layer.reviews[proposal.seq]
            key.approved_reviews[proposal.seq] = entry.actor
            return
        del layer.proposals[proposal.seq]
        layer.rungs[proposal.action] = dataclasses.replace(
            proposal, at_ms=max(proposal.at_ms, entry.at_ms), approved_by=entry.actor
        )


def _flag(key: _Key, seq: int, text: str) -> None:
    key.flags.append(f"seq {seq}: {text}")


def _in_force(layer: _Layer, now_ms: int) -> tuple[Mitigation, ...]:
    return _by_seq(m for m in layer.rungs.values() if m.in_force(now_ms))


def _by_seq(mitigations: Iterable[Mitigation]) -> tuple[Mitigation, ...]:
    return tuple(sorted(mitigations, key=lambda m: m.seq))


def _reason(m: Mitigation, *, over_rate: bool = False) -> str:
    """Why ``m`` refuses, for the caller: the rung's refusal, then the ledger's reason."""
    if over_rate:
        rate = _jobs_per_minute(m) or DEFAULT_JOBS_PER_MINUTE
        base = f"the api key is over its rate of {rate:g} jobs a minute"
    elif m.action == "cap":
        limits = [f"{name}={m.params[name]}" for name in _CAP_LIMITS if name in m.params]
        base = "the job is larger than the api key's cap"
        base = f"{base} ({', '.join(limits)})" if limits else base
    else:
        base = _REFUSALS.get(m.action, m.action)
    return f"{base}: {m.reason}" if m.reason else base


def _stated_rate(params: Mapping[str, Any]) -> float | None:
    """``params["jobs_per_minute"]`` if it is a positive, finite number."""
    rate = params.get("jobs_per_minute")
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        return None
    return float(rate) if 0 < rate < math.inf else None


def _jobs_per_minute(m: Mitigation) -> float | None:
    """The rate ``m`` limits the key to: a cap's if it states one; a throttle's, always."""
    rate = _stated_rate(m.params)
    return DEFAULT_JOBS_PER_MINUTE if rate is None and m.action == "throttle" else rate


def _over_cap(params: Mapping[str, Any], shots: int | None, circuits: int | None) -> bool:
    """Whether a job of ``shots`` and ``circuits`` exceeds the cap (unknown sizes do not)."""
    for size, name in zip((shots, circuits), _CAP_LIMITS, strict=True):
        limit = params.get(name)
        if size is not None and isinstance(limit, int | float) and size > limit:
            return True
    return False
