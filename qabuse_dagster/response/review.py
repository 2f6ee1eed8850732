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
* **Triage** (an analyst judging an alert): :func:`release` lifts what is in force,
  :func:`escalate` hands the key on without touching its access, and
  :func:`mark_false_positive` / :func:`confirm_abuse` label the alert's window. A label
  is a ``label`` entry and, given a ``labels_path``, a line of the incident-labels file
  (incident id ``analyst-<seq>``, the seq of that entry) that evaluation and training read.

Who may take each step is :data:`STEP_ROLES`.

Example:
    >>> from qabuse_dagster.response.records import LedgerEntry
    >>> pending_kind(LedgerEntry(0, "ab" * 8, "revoke", "system", "x",
    ...                          params={"requires_approval": True}))
    'approval'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qabuse_dagster.response.alert_store import AlertStore
from qabuse_dagster.response.alerts import Alert
from qabuse_dagster.response.auth import Principal
from qabuse_dagster.response.decision_table import DecisionTable, Mitigation
from qabuse_dagster.response.decisions import HIGH_IMPACT_ACTIONS
from qabuse_dagster.response.ledger import Ledger
from qabuse_dagster.response.records import LedgerEntry, LedgerRecord
from qabuse_dagster.telemetry.labels import (
    BENIGN_LABEL_KIND,
    BENIGN_LABEL_KINDS,
    FALSE_POSITIVE_KIND,
    IncidentLabel,
    add_labels,
)

__all__ = [
    "ALERT_STEPS",
    "ALERT_STEP_STATUS",
    "BENIGN_LABEL_KIND",
    "CONFIRMED_ABUSE_KIND",
    "FALSE_POSITIVE_KIND",
    "STEP_ROLES",
    "QueueItem",
    "ReviewError",
    "act_on_alert",
    "appeal",
    "approve",
    "benign_labels",
    "confirm_abuse",
    "deny",
    "escalate",
    "mark_false_positive",
    "pending_kind",
    "propose",
    "reject_appeal",
    "release",
    "restrictions_in_force",
    "review_queue",
    "uphold_appeal",
]

#: The ``kind`` of the label an analyst's "confirm abuse" writes unless told another.
CONFIRMED_ABUSE_KIND = "confirmed_abuse"
#: The roles that may take each step (any one of them will do). The owner's appeal is
#: not here: it needs the key's owner, with proof of the key, not a role.
STEP_ROLES: Mapping[str, tuple[str, ...]] = {
    "propose": ("analyst", "approver"),
    "approve": ("approver",),
    "deny": ("approver", "analyst"),
    "uphold_appeal": ("analyst",),
    "reject_appeal": ("analyst",),
    "release": ("analyst", "approver"),
    "escalate": ("analyst",),
    "mark_false_positive": ("analyst",),
    "confirm_abuse": ("analyst",),
}

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
        if entry.mode == "enforce" and entry.action in ("release", "uphold_appeal"):
            # A release lifts everything on the key, its pending proposals and reviews
            # too, as the gateway's decision table has it: approving one later would
            # change nothing there.
            for seq, item in list(waiting.items()):
                if item.api_key_id == entry.api_key_id and item.kind in ("approval", "review"):
                    del waiting[seq]
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
    _require(principal, *STEP_ROLES["propose"])
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
    _require(principal, *STEP_ROLES["approve"])
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
    _require(principal, *STEP_ROLES["deny"])
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
    ledger: Ledger,
    principal: Principal,
    seq: int,
    reason: str,
    *,
    labels_path: Path | None = None,
    now_ms: int | None = None,
) -> list[LedgerRecord]:
    """An analyst agrees with the owner: release the key and label the window benign.

    Args:
        ledger: The decision ledger.
        principal: An analyst.
        seq: The appeal's entry.
        reason: Why, for the audit trail.
        labels_path: An incident-labels file to add the benign label to as well (kind
            :data:`BENIGN_LABEL_KIND`); None: the ledger's ``label`` entry only.
        now_ms: When (default: now).
    """
    _require(principal, *STEP_ROLES["uphold_appeal"])
    item = _waiting(ledger, seq, ("appeal",))
    at = _now(now_ms)
    restricted = ledger.get(item.record.entry.refers_to or 0)
    start = restricted.entry.at_ms if restricted is not None else item.record.entry.at_ms
    key = item.api_key_id
    written = [
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
    if labels_path is not None:
        # An appeal filed in the same millisecond as its restriction still labels a window.
        label = _incident_label(BENIGN_LABEL_KIND, key, start, max(at, start + 1), reason)
        _add_label(label, written[-1], labels_path)
    return written


def reject_appeal(
    ledger: Ledger, principal: Principal, seq: int, reason: str, *, now_ms: int | None = None
) -> LedgerRecord:
    """An analyst keeps the restriction the owner appealed."""
    _require(principal, *STEP_ROLES["reject_appeal"])
    item = _waiting(ledger, seq, ("appeal",))
    return ledger.append(
        LedgerEntry(
            _now(now_ms), item.api_key_id, "reject_appeal", principal.name, reason, refers_to=seq
        )
    )


def restrictions_in_force(ledger: Ledger, api_key_id: str, now_ms: int) -> list[Mitigation]:
    """What restricts the key at ``now_ms``, enforced or in shadow, as the gateway's table has it.

    Pending proposals and reviews restrict nothing and are not listed.
    """
    # The whole ledger, as the gateway folds it: the table expects seqs without gaps.
    state = DecisionTable.from_records(ledger.records()).state(api_key_id, now_ms)
    return [*state.in_force, *state.shadow]


def release(
    ledger: Ledger,
    principal: Principal,
    api_key_id: str,
    reason: str,
    *,
    alert_id: str | None = None,
    now_ms: int | None = None,
) -> LedgerRecord:
    """Lift every restriction on the key (an analyst or approver).

    The ``release`` entry refers to the newest restriction it lifts; ``params.alert_id``
    names the alert it answers, if any.

    Raises:
        ReviewError: Wrong role, or nothing restricts the key (enforced or in shadow).
    """
    _require(principal, *STEP_ROLES["release"])
    at = _now(now_ms)
    lifted = restrictions_in_force(ledger, api_key_id, at)
    if not lifted:
        raise ReviewError(f"key {api_key_id} has no restriction in force to release")
    return ledger.append(
        LedgerEntry(
            at,
            api_key_id,
            "release",
            principal.name,
            reason,
            params=_alert_params(alert_id),
            refers_to=max(m.seq for m in lifted),
        )
    )


def escalate(
    ledger: Ledger,
    principal: Principal,
    api_key_id: str,
    reason: str,
    *,
    alert_id: str | None = None,
    now_ms: int | None = None,
) -> LedgerRecord:
    """An analyst hands the key on to someone more senior; its access is unchanged."""
    _require(principal, *STEP_ROLES["escalate"])
    return ledger.append(
        LedgerEntry(
            _now(now_ms),
            api_key_id,
            "escalate",
            principal.name,
            reason,
            params=_alert_params(alert_id),
        )
    )


def mark_false_positive(
    ledger: Ledger,
    principal: Principal,
    api_key_id: str,
    reason: str,
    *,
    start_ms: int,
    end_ms: int,
    labels_path: Path,
    alert_id: str | None = None,
    now_ms: int | None = None,
) -> list[LedgerRecord]:
    """An analyst says the key's window ``[start_ms, end_ms)`` was legitimate use.

    Writes a ``label`` entry (kind :data:`FALSE_POSITIVE_KIND`) and, when something
    restricts the key, a ``release`` with it, in one append; then adds the label, as
    incident ``analyst-<seq of the label entry>``, to ``labels_path``.

    Returns:
        The label entry, and the release if there was one.

    Raises:
        ReviewError: Wrong role, an empty window, or a key id the labels contract refuses.
    """
    _require(principal, *STEP_ROLES["mark_false_positive"])
    label = _incident_label(FALSE_POSITIVE_KIND, api_key_id, start_ms, end_ms, reason)
    at = _now(now_ms)
    entries = [
        _label_entry(at, api_key_id, principal, reason, label.kind, start_ms, end_ms, alert_id)
    ]
    lifted = restrictions_in_force(ledger, api_key_id, at)
    if lifted:
        entries.append(
            LedgerEntry(
                at,
                api_key_id,
                "release",
                principal.name,
                reason,
                params=_alert_params(alert_id),
                refers_to=max(m.seq for m in lifted),
            )
        )
    written = ledger.append_many(entries)
    _add_label(label, written[0], labels_path)
    return written


def confirm_abuse(
    ledger: Ledger,
    principal: Principal,
    api_key_id: str,
    reason: str,
    *,
    start_ms: int,
    end_ms: int,
    labels_path: Path,
    kind: str = CONFIRMED_ABUSE_KIND,
    alert_id: str | None = None,
    now_ms: int | None = None,
) -> LedgerRecord:
    """An analyst confirms the key was abused in ``[start_ms, end_ms)``: an incident label.

    Writes a ``label`` entry of ``kind`` and adds the incident, as ``analyst-<seq>``, to
    ``labels_path``. Access is unchanged: what restricts the key stays.

    Raises:
        ReviewError: Wrong role, a benign ``kind``, an empty window, or a key id or kind
            the labels contract refuses.
    """
    _require(principal, *STEP_ROLES["confirm_abuse"])
    if kind in BENIGN_LABEL_KINDS:
        raise ReviewError(f"{kind!r} labels legitimate use, not abuse: give an incident kind")
    label = _incident_label(kind, api_key_id, start_ms, end_ms, reason)
    at = _now(now_ms)
    written = ledger.append(
        _label_entry(at, api_key_id, principal, reason, kind, start_ms, end_ms, alert_id)
    )
    _add_label(label, written, labels_path)
    return written


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


def _alert_params(alert_id: str | None) -> dict[str, Any]:
    return {} if alert_id is None else {"alert_id": alert_id}


def _label_entry(
    at_ms: int,
    api_key_id: str,
    principal: Principal,
    reason: str,
    kind: str,
    start_ms: int,
    end_ms: int,
    alert_id: str | None,
) -> LedgerEntry:
    params = {"kind": kind, "start_ms": start_ms, "end_ms": end_ms, **_alert_params(alert_id)}
    return LedgerEntry(at_ms, api_key_id, "label", principal.name, reason, params=params)


def _incident_label(
    kind: str, api_key_id: str, start_ms: int, end_ms: int, reason: str
) -> IncidentLabel:
    """The label, checked against the contract before anything is written.

    Its ``incident_id`` is a placeholder until the ledger gives the entry its seq.
    """
    if end_ms <= start_ms:
        raise ReviewError(f"the label's window is empty: it ends ({end_ms}) before it starts")
    try:
        return IncidentLabel(
            incident_id="analyst-pending",
            kind=kind,
            start=datetime.fromtimestamp(start_ms / 1000, UTC),
            end=datetime.fromtimestamp(end_ms / 1000, UTC),
            api_key_ids=(api_key_id,),
            notes=reason[:2000] or None,
        )
    except ValidationError as exc:
        raise ReviewError(f"not a valid incident label: {exc.errors()[0]['msg']}") from None


def _add_label(label: IncidentLabel, entry: LedgerRecord, labels_path: Path) -> None:
    # The ledger entry is the record; the file's line is named after it, so that each line
    # leads back to its entry, and adding it again (a retry) leaves one line.
    add_labels([label.model_copy(update={"incident_id": f"analyst-{entry.seq}"})], labels_path)


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


#: An alert's steps as the triage page's paths and ``qabuse alerts act`` name them -> the
#: workflow step (`act_on_alert`).
ALERT_STEPS: dict[str, str] = {
    "release": "release",
    "escalate": "escalate",
    "false-positive": "mark_false_positive",
    "confirm-abuse": "confirm_abuse",
}
#: What an analyst may do with an alert: the step -> the alert's status afterwards.
ALERT_STEP_STATUS: dict[str, str] = {
    "release": "released",
    "escalate": "escalated",
    "mark_false_positive": "false_positive",
    "confirm_abuse": "confirmed_abuse",
}


def act_on_alert(
    ledger: Ledger,
    alerts: AlertStore,
    principal: Principal,
    alert: Alert,
    step: str,
    reason: str,
    *,
    labels_path: Path,
    kind: str = CONFIRMED_ABUSE_KIND,
    now_ms: int | None = None,
) -> str:
    """One analyst step on an alert, as the triage page and ``qabuse alerts act`` take it.

    The step goes to the ledger (`release`, `escalate`, `mark_false_positive` or
    `confirm_abuse`); a label covers the hour the alert shows, up to now. Then the
    alert's triage status moves.

    Returns:
        The alert's new status.

    Raises:
        ReviewError: An unknown step, or one the workflow refuses (role, nothing in force).
    """
    if step not in ALERT_STEP_STATUS:
        raise ReviewError(f"unknown step {step!r}; expected one of {sorted(ALERT_STEP_STATUS)}")
    now = _now(now_ms)
    key, alert_id = alert.api_key_id, alert.alert_id
    start = alert.minutes[0].minute if alert.minutes else alert.decided_at
    window = {"start_ms": int(start.timestamp() * 1000), "end_ms": now}
    if step == "release":
        release(ledger, principal, key, reason, alert_id=alert_id, now_ms=now)
    elif step == "escalate":
        escalate(ledger, principal, key, reason, alert_id=alert_id, now_ms=now)
    elif step == "mark_false_positive":
        mark_false_positive(
            ledger,
            principal,
            key,
            reason,
            **window,
            labels_path=labels_path,
            alert_id=alert_id,
            now_ms=now,
        )
    else:
        confirm_abuse(
            ledger,
            principal,
            key,
            reason,
            **window,
            kind=kind,
            labels_path=labels_path,
            alert_id=alert_id,
            now_ms=now,
        )
    status = ALERT_STEP_STATUS[step]
    alerts.set_status(alert_id, status, principal.name, now_ms=now)
    return status
