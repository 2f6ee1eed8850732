"""The people around the automation: approvals (maker-checker), reviews and appeals.

Every step is a ledger entry, so the review queue is a fold over the ledger and the
audit trail is the ledger itself:

* A **revocation or rotation** is a proposal (``params.requires_approval``). It takes
  effect when a principal with the ``approver`` role, other than its proposer, appends
  an ``approve`` entry that refers to it; ``deny`` drops it. The gateway's decision
  table applies the same rule, so an approval the proposer forged is ignored there too.
* A **review** (the engine held back a challenge on a high-impact key) is resolved by
  an approver: ``approve`` applies the held action, ``deny`` dismisses it.
* An **appeal** comes from the key's owner, with proof of the key: the raw key, which
  must hash (with the deployment's keyed hash) to the api key id. An ``analyst``
  upholds it (the key is released, and a benign ``label`` entry records that the
  restricted window was a false alarm, for training and evaluation) or rejects it.

Example:
    >>> from qabuse_dagster.response.records import LedgerEntry
    >>> pending_kind(LedgerEntry(0, "ab" * 8, "revoke", "system", "x",
    ...                          params={"requires_approval": True}))
    'approval'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from qabuse_dagster.response.auth import Principal
from qabuse_dagster.response.decisions import HIGH_IMPACT_ACTIONS
from qabuse_dagster.response.ledger import Ledger
from qabuse_dagster.response.records import LedgerEntry, LedgerRecord
from qabuse_dagster.telemetry.labels import BENIGN_LABEL_KIND

__all__ = [
    "BENIGN_LABEL_KIND",
    "QueueItem",
    "ReviewError",
    "appeal",
    "approve",
    "benign_labels",
    "deny",
    "pending_kind",
    "propose",
    "reject_appeal",
    "review_queue",
    "uphold_appeal",
]

_RESTRICTIONS = ("throttle", "cap", "challenge", "rotate", "revoke")
_RESOLVES = {
    "approval": ("approve", "deny"),
    "review": ("approve", "deny"),
    "appeal": ("uphold_appeal", "reject_appeal"),
}


class ReviewError(ValueError):
    """A step the workflow refuses: wrong role, own proposal, nothing pending, bad proof."""


@dataclass(frozen=True)
class QueueItem:
    """One thing waiting for a person.

    Attributes:
        kind: ``approval`` (a proposed revocation or rotation), ``review`` or ``appeal``.
        record: The ledger record that waits.
    """

    kind: str
    record: LedgerRecord

    @property
    def seq(self) -> int:
        return self.record.seq

    @property
    def api_key_id(self) -> str:
        return self.record.entry.api_key_id


def pending_kind(entry: LedgerEntry) -> str | None:
    """The queue an entry waits in until someone resolves it, or None."""
    if entry.mode != "enforce":
        return None
    # Every revocation or rotation waits for a second principal, flagged or not, as the
    # gateway's decision table has it; one that a review's approval applied (it refers to
    # the review) was that check already.
    if entry.action in HIGH_IMPACT_ACTIONS and entry.refers_to is None:
        return "approval"
    if entry.action == "review":
        return "review"
    if entry.action == "appeal":
        return "appeal"
    return None


def review_queue(ledger: Ledger) -> list[QueueItem]:
    """Entries still waiting for a person, oldest first."""
    waiting: dict[int, QueueItem] = {}
    for record in ledger.records():
        entry = record.entry
        kind = pending_kind(entry)
        if kind is not None:
            waiting[record.seq] = QueueItem(kind, record)
        target = waiting.get(entry.refers_to) if entry.refers_to is not None else None
        if target is not None and entry.action in _RESOLVES[target.kind]:
            if entry.action == "approve" and entry.actor in (target.record.entry.actor, "system"):
                # Maker-checker, as the gateway's table has it: an approval by the proposer,
                # or by no person at all, resolves nothing.
                continue
            del waiting[target.seq]
    return list(waiting.values())


def propose(
    ledger: Ledger,
    principal: Principal,
    api_key_id: str,
    action: str,
    reason: str,
    *,
    now_ms: int | None = None,
) -> LedgerRecord:
    """An analyst proposes a revocation or rotation; a different approver must confirm it."""
    _require(principal, "analyst", "approver")
    if action not in HIGH_IMPACT_ACTIONS:
        raise ReviewError(f"only {sorted(HIGH_IMPACT_ACTIONS)} are proposed, not {action!r}")
    return ledger.append(
        LedgerEntry(
            _now(now_ms),
            api_key_id,
            action,
            principal.name,
            reason,
            params={"requires_approval": True},
        )
    )


def approve(
    ledger: Ledger, principal: Principal, seq: int, reason: str, *, now_ms: int | None = None
) -> list[LedgerRecord]:
    """Approve a proposal (it takes effect) or a review (its held action is applied).

    Raises:
        ReviewError: The principal is no approver, proposed it, or nothing waits at ``seq``.
    """
    _require(principal, "approver")
    item = _waiting(ledger, seq, ("approval", "review"))
    if item.record.entry.actor == principal.name:
        raise ReviewError(
            f"{principal.name} proposed entry {seq}: a second principal must approve it"
        )
    at = _now(now_ms)
    written = [
        ledger.append(
            LedgerEntry(at, item.api_key_id, "approve", principal.name, reason, refers_to=item.seq)
        )
    ]
    if item.kind == "review":
        held = str(item.record.entry.params.get("instead_of", "challenge"))
        written.append(
            ledger.append(
                LedgerEntry(
                    at,
                    item.api_key_id,
                    held,
                    principal.name,
                    f"review {seq} approved: {reason}",
                    refers_to=item.seq,
                )
            )
        )
    return written


def deny(
    ledger: Ledger, principal: Principal, seq: int, reason: str, *, now_ms: int | None = None
) -> LedgerRecord:
    """Refuse a proposal or dismiss a review: it never takes effect."""
    _require(principal, "approver", "analyst")
    item = _waiting(ledger, seq, ("approval", "review"))
    return ledger.append(
        LedgerEntry(_now(now_ms), item.api_key_id, "deny", principal.name, reason, refers_to=seq)
    )


def appeal(
    ledger: Ledger,
    principal: Principal,
    api_key_id: str,
    raw_key: str,
    reason: str,
    *,
    hash_key: Callable[[str], str],
    now_ms: int | None = None,
) -> LedgerRecord:
    """The key's owner contests the restriction in force on it.

    Args:
        ledger: The decision ledger.
        principal: An owner bound to ``api_key_id``.
        api_key_id: The restricted key (keyed hash).
        raw_key: The key itself, as proof: it must hash to ``api_key_id``.
        reason: The owner's words.
        hash_key: The deployment's keyed hash of a raw api key.
        now_ms: When (default: now).

    Raises:
        ReviewError: Not the key's owner, a wrong proof, or no restriction to appeal.
    """
    if not principal.owns(api_key_id):
        raise ReviewError(f"{principal.name} is not an owner of key {api_key_id}")
    if not raw_key or hash_key(raw_key) != api_key_id:
        raise ReviewError(f"the key given as proof does not hash to {api_key_id}")
    at = _now(now_ms)
    restriction = _latest_restriction(ledger.records(), api_key_id, at)
    if restriction is None:
        raise ReviewError(f"key {api_key_id} has no restriction in force to appeal")
    return ledger.append(
        LedgerEntry(
            at,
            api_key_id,
            "appeal",
            principal.name,
            reason[:2000],
            refers_to=restriction.seq,
        )
    )


def uphold_appeal(
    ledger: Ledger, principal: Principal, seq: int, reason: str, *, now_ms: int | None = None
) -> list[LedgerRecord]:
    """An analyst agrees with the owner: release the key and label the window benign."""
    _require(principal, "analyst")
    item = _waiting(ledger, seq, ("appeal",))
    at = _now(now_ms)
    restricted = ledger.get(item.record.entry.refers_to or 0)
    start = restricted.entry.at_ms if restricted is not None else item.record.entry.at_ms
    key = item.api_key_id
    return [
        ledger.append(LedgerEntry(at, key, "uphold_appeal", principal.name, reason, refers_to=seq)),
        ledger.append(LedgerEntry(at, key, "release", principal.name, reason, refers_to=seq)),
        ledger.append(
            LedgerEntry(
                at,
                key,
                "label",
                principal.name,
                reason,
                params={"kind": BENIGN_LABEL_KIND, "start_ms": start, "end_ms": at},
                refers_to=seq,
            )
        ),
    ]


def reject_appeal(
    ledger: Ledger, principal: Principal, seq: int, reason: str, *, now_ms: int | None = None
) -> LedgerRecord:
    """An analyst keeps the restriction the owner appealed."""
    _require(principal, "analyst")
    item = _waiting(ledger, seq, ("appeal",))
    return ledger.append(
        LedgerEntry(
            _now(now_ms), item.api_key_id, "reject_appeal", principal.name, reason, refers_to=seq
        )
    )


def benign_labels(records: Iterable[LedgerRecord]) -> list[dict[str, Any]]:
    """Upheld appeals as incident-label lines (kind :data:`BENIGN_LABEL_KIND`).

    ``qabuse evaluate`` reads them as confirmed false alarms: the key-days they cover
    count as benign, whatever the detector said.
    """
    labels = []
    for record in records:
        entry = record.entry
        if entry.action != "label" or entry.params.get("kind") != BENIGN_LABEL_KIND:
            continue
        start, end = int(entry.params["start_ms"]), int(entry.params["end_ms"])
        labels.append(
            {
                "incident_id": f"ledger-{record.seq}",
                "kind": BENIGN_LABEL_KIND,
                "start": _iso(start),
                "end": _iso(max(end, start + 1)),
                "api_key_ids": [entry.api_key_id],
                "notes": entry.reason[:2000] or None,
            }
        )
    return labels


def _require(principal: Principal, *roles: str) -> None:
    if not principal.has_role(*roles):
        raise ReviewError(f"{principal.name} needs the role {' or '.join(roles)}")


def _waiting(ledger: Ledger, seq: int, kinds: tuple[str, ...]) -> QueueItem:
    for item in review_queue(ledger):
        if item.seq == seq:
            if item.kind not in kinds:
                raise ReviewError(f"entry {seq} waits for {item.kind}, not {' or '.join(kinds)}")
            return item
    raise ReviewError(f"nothing waits at entry {seq}: it does not exist or was resolved")


def _latest_restriction(
    records: Iterable[LedgerRecord], api_key_id: str, now_ms: int
) -> LedgerRecord | None:
    """The restriction on the key at ``now_ms``: the last one, unless released or expired."""
    latest: LedgerRecord | None = None
    for record in records:
        entry = record.entry
        if entry.api_key_id != api_key_id or entry.mode != "enforce":
            continue
        if entry.action in _RESTRICTIONS:
            latest = record
        elif entry.action in ("release", "uphold_appeal"):
            latest = None
    expires = None if latest is None else latest.entry.expires_at_ms
    return None if expires is not None and expires <= now_ms else latest


def _now(now_ms: int | None) -> int:
    return now_ms if now_ms is not None else int(datetime.now(UTC).timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")
