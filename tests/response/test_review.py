"""Maker-checker approvals, reviews and appeals: every step in the ledger, every refusal named."""

from __future__ import annotations

from pathlib import Path

import pytest

from qabuse_dagster.response.auth import Principal
from qabuse_dagster.response.ledger import Ledger, open_ledger
from qabuse_dagster.response.records import LedgerEntry
from qabuse_dagster.response.review import (
    BENIGN_LABEL_KIND,
    CONFIRMED_ABUSE_KIND,
    FALSE_POSITIVE_KIND,
    ReviewError,
    appeal,
    approve,
    benign_labels,
    confirm_abuse,
    deny,
    escalate,
    mark_false_positive,
    propose,
    reject_appeal,
    release,
    restrictions_in_force,
    review_queue,
    uphold_appeal,
)
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.labels import read_labels

HASHER = KeyedHasher(b"test-hash-key-for-review-workflow-0123")
RAW_KEY = "qk_live_owner_key"
KEY = HASHER.hash(RAW_KEY, domain="api_key")
ALICE = Principal("alice", frozenset({"analyst", "approver"}))
BOB = Principal("bob", frozenset({"approver"}))
CAROL = Principal("carol", frozenset({"analyst"}))
OWNER = Principal("owner-1", frozenset({"owner"}), frozenset({KEY}))
STRANGER = Principal("owner-2", frozenset({"owner"}), frozenset({"cd" * 16}))


def _hash(raw: str) -> str:
    return HASHER.hash(raw, domain="api_key")


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", key=b"k" * 32) as opened:
        yield opened


def _system(ledger: Ledger, action: str, **params: object) -> int:
    entry = LedgerEntry(1_000, KEY, action, "system", "score over threshold", params=params)
    return ledger.append(entry).seq


def test_a_system_revocation_waits_for_an_approver(ledger: Ledger) -> None:
    seq = _system(ledger, "revoke", requires_approval=True)
    assert [(i.kind, i.seq) for i in review_queue(ledger)] == [("approval", seq)]
    (approval,) = approve(ledger, BOB, seq, "confirmed with the tenant", now_ms=2_000)
    assert approval.entry.refers_to == seq and approval.entry.actor == "bob"
    assert review_queue(ledger) == []


def test_the_proposer_cannot_approve_its_own_proposal(ledger: Ledger) -> None:
    proposal = propose(ledger, ALICE, KEY, "rotate", "leaked on a public repo", now_ms=1_000)
    with pytest.raises(ReviewError, match="second principal"):
        approve(ledger, ALICE, proposal.seq, "me again")
    # A forged self-approval written straight to the ledger resolves nothing either.
    ledger.append(LedgerEntry(1_500, KEY, "approve", "alice", "forged", refers_to=proposal.seq))
    ledger.append(LedgerEntry(1_600, KEY, "approve", "system", "forged", refers_to=proposal.seq))
    assert [i.seq for i in review_queue(ledger)] == [proposal.seq]
    approve(ledger, BOB, proposal.seq, "agreed")
    assert review_queue(ledger) == []


@pytest.mark.parametrize(
    ("who", "step"),
    [
        (CAROL, "approve"),  # an analyst is no approver
        (OWNER, "approve"),
        (OWNER, "propose"),
        (BOB, "uphold"),  # an approver is no analyst
    ],
)
def test_each_step_needs_its_role(ledger: Ledger, who: Principal, step: str) -> None:
    seq = _system(ledger, "revoke", requires_approval=True)
    with pytest.raises(ReviewError, match="needs the role"):
        if step == "approve":
            approve(ledger, who, seq, "x")
        elif step == "propose":
            propose(ledger, who, KEY, "revoke", "x")
        else:
            uphold_appeal(ledger, who, seq, "x")
    assert len(list(ledger.records())) == 1


def test_a_denied_proposal_leaves_the_queue_and_cannot_be_approved_later(ledger: Ledger) -> None:
    seq = _system(ledger, "revoke", requires_approval=True)
    deny(ledger, CAROL, seq, "a classroom, not a bot")
    assert review_queue(ledger) == []
    with pytest.raises(ReviewError, match="nothing waits"):
        approve(ledger, BOB, seq, "too late")


def test_an_approved_review_applies_the_held_challenge(ledger: Ledger) -> None:
    seq = _system(ledger, "review", instead_of="challenge")
    approval, challenge = approve(ledger, BOB, seq, "looks automated")
    assert approval.entry.action == "approve" and approval.entry.actor == "bob"
    assert challenge.entry.action == "challenge" and challenge.entry.refers_to == seq
    assert review_queue(ledger) == []


def test_an_upheld_appeal_releases_the_key_and_labels_the_window_benign(ledger: Ledger) -> None:
    throttle = ledger.append(LedgerEntry(1_000, KEY, "throttle", "system", "alert")).seq
    filed = appeal(ledger, OWNER, KEY, RAW_KEY, "it was our nightly benchmark", hash_key=_hash)
    assert filed.entry.refers_to == throttle
    assert [i.kind for i in review_queue(ledger)] == ["appeal"]
    steps = uphold_appeal(ledger, CAROL, filed.seq, "benchmark confirmed", now_ms=9_000)
    assert [r.entry.action for r in steps] == ["uphold_appeal", "release", "label"]
    (label,) = benign_labels(ledger.records())
    assert label["kind"] == BENIGN_LABEL_KIND and label["api_key_ids"] == [KEY]
    assert label["start"] < label["end"]
    assert review_queue(ledger) == []


def test_a_rejected_appeal_keeps_the_restriction(ledger: Ledger) -> None:
    ledger.append(LedgerEntry(1_000, KEY, "challenge", "system", "alert"))
    filed = appeal(ledger, OWNER, KEY, RAW_KEY, "not me", hash_key=_hash)
    reject_appeal(ledger, CAROL, filed.seq, "credential stuffing from one network")
    assert benign_labels(ledger.records()) == []
    actions = [r.entry.action for r in ledger.records()]
    assert actions == ["challenge", "appeal", "reject_appeal"]


@pytest.mark.parametrize(
    ("who", "raw", "match"),
    [
        (STRANGER, RAW_KEY, "not an owner"),
        (OWNER, "qk_live_someone_else", "does not hash"),
        (OWNER, "", "does not hash"),
    ],
)
def test_an_appeal_needs_the_owner_and_the_key(
    ledger: Ledger, who: Principal, raw: str, match: str
) -> None:
    ledger.append(LedgerEntry(1_000, KEY, "throttle", "system", "alert"))
    with pytest.raises(ReviewError, match=match):
        appeal(ledger, who, KEY, raw, "let me in", hash_key=_hash)
    assert len(list(ledger.records())) == 1


def test_there_is_nothing_to_appeal_on_a_released_or_expired_key(ledger: Ledger) -> None:
    with pytest.raises(ReviewError, match="no restriction"):
        appeal(ledger, OWNER, KEY, RAW_KEY, "x", hash_key=_hash)
    ledger.append(LedgerEntry(1_000, KEY, "throttle", "system", "alert", expires_at_ms=5_000))
    with pytest.raises(ReviewError, match="no restriction"):
        appeal(ledger, OWNER, KEY, RAW_KEY, "x", hash_key=_hash, now_ms=6_000)
    ledger.append(LedgerEntry(7_000, KEY, "cap", "system", "alert"))
    ledger.append(LedgerEntry(8_000, KEY, "release", "system", "quiet"))
    with pytest.raises(ReviewError, match="no restriction"):
        appeal(ledger, OWNER, KEY, RAW_KEY, "x", hash_key=_hash, now_ms=9_000)


def test_an_unflagged_revocation_waits_for_approval_too(ledger: Ledger) -> None:
    """The queue and the gateway's decision table agree: every revoke needs a checker."""
    seq = ledger.append(LedgerEntry(1_000, KEY, "revoke", "carol", "by hand")).seq
    assert [(i.kind, i.seq) for i in review_queue(ledger)] == [("approval", seq)]


def test_a_release_lifts_what_is_in_force_and_refers_to_it(ledger: Ledger) -> None:
    with pytest.raises(ReviewError, match="no restriction in force"):
        release(ledger, CAROL, KEY, "nothing there")
    throttle = ledger.append(LedgerEntry(1_000, KEY, "throttle", "system", "alert")).seq
    cap = ledger.append(LedgerEntry(1_500, KEY, "cap", "system", "alert")).seq
    with pytest.raises(ReviewError, match="needs the role"):
        release(ledger, OWNER, KEY, "let me out")
    done = release(ledger, BOB, KEY, "a lab's course", alert_id="a" * 32, now_ms=2_000)
    assert (done.entry.action, done.entry.actor) == ("release", "bob")
    assert done.entry.refers_to == max(throttle, cap)
    assert done.entry.params == {"alert_id": "a" * 32}
    assert restrictions_in_force(ledger, KEY, 3_000) == []
    with pytest.raises(ReviewError, match="no restriction in force"):
        release(ledger, CAROL, KEY, "again", now_ms=3_000)


def test_an_expired_restriction_is_nothing_to_release(ledger: Ledger) -> None:
    ledger.append(LedgerEntry(1_000, KEY, "throttle", "system", "alert", expires_at_ms=5_000))
    with pytest.raises(ReviewError, match="no restriction in force"):
        release(ledger, CAROL, KEY, "late", now_ms=6_000)
    # A pending revocation is not in force either: it waits for its approver, not a release.
    _system(ledger, "revoke", requires_approval=True)
    with pytest.raises(ReviewError, match="no restriction in force"):
        release(ledger, CAROL, KEY, "late", now_ms=6_000)


def test_an_escalation_is_an_entry_that_changes_no_access(ledger: Ledger) -> None:
    ledger.append(LedgerEntry(1_000, KEY, "challenge", "system", "alert"))
    with pytest.raises(ReviewError, match="needs the role analyst"):
        escalate(ledger, BOB, KEY, "not mine to judge")
    done = escalate(ledger, CAROL, KEY, "looks like a campaign", now_ms=2_000)
    assert (done.entry.action, done.entry.actor) == ("escalate", "carol")
    assert [m.action for m in restrictions_in_force(ledger, KEY, 3_000)] == ["challenge"]
    assert review_queue(ledger) == []


def test_a_false_positive_labels_the_window_and_releases_the_key(
    ledger: Ledger, tmp_path: Path
) -> None:
    labels = tmp_path / "labels" / "analyst.jsonl"
    throttle = ledger.append(LedgerEntry(1_000, KEY, "throttle", "system", "alert")).seq
    label, released = mark_false_positive(
        ledger,
        CAROL,
        KEY,
        "a classroom",
        start_ms=60_000,
        end_ms=120_000,
        labels_path=labels,
        now_ms=130_000,
    )
    assert label.entry.action == "label" and label.entry.actor == "carol"
    assert label.entry.params == {
        "kind": FALSE_POSITIVE_KIND,
        "start_ms": 60_000,
        "end_ms": 120_000,
    }
    assert released.entry.action == "release" and released.entry.refers_to == throttle
    (line,) = read_labels(labels)
    assert (line.incident_id, line.kind) == (f"analyst-{label.seq}", FALSE_POSITIVE_KIND)
    assert line.api_key_ids == (KEY,) and line.notes == "a classroom"
    assert (line.start.timestamp(), line.end.timestamp()) == (60.0, 120.0)
    # Nothing in force any more: a second one labels, and releases nothing.
    (again,) = mark_false_positive(
        ledger, CAROL, KEY, "still", start_ms=0, end_ms=1_000, labels_path=labels
    )
    assert again.entry.action == "label" and len(read_labels(labels)) == 2


@pytest.mark.parametrize(
    ("who", "kind", "window", "match"),
    [
        (BOB, "confirmed_abuse", (0, 1_000), "needs the role analyst"),
        (CAROL, "false_positive", (0, 1_000), "legitimate use"),
        (CAROL, BENIGN_LABEL_KIND, (0, 1_000), "legitimate use"),
        (CAROL, "confirmed_abuse", (1_000, 1_000), "window is empty"),
        (CAROL, "x" * 65, (0, 1_000), "not a valid incident label"),
    ],
)
def test_confirming_abuse_refuses_what_no_incident_label_could_be(
    ledger: Ledger, tmp_path: Path, who: Principal, kind: str, window: tuple[int, int], match: str
) -> None:
    labels = tmp_path / "analyst.jsonl"
    with pytest.raises(ReviewError, match=match):
        confirm_abuse(
            ledger,
            who,
            KEY,
            "x",
            kind=kind,
            start_ms=window[0],
            end_ms=window[1],
            labels_path=labels,
        )
    assert list(ledger.records()) == [] and not labels.exists()


def test_confirmed_abuse_is_an_incident_label_and_keeps_the_restriction(
    ledger: Ledger, tmp_path: Path
) -> None:
    labels = tmp_path / "analyst.jsonl"
    ledger.append(LedgerEntry(1_000, KEY, "challenge", "system", "alert"))
    done = confirm_abuse(
        ledger,
        CAROL,
        KEY,
        "stuffing",
        start_ms=0,
        end_ms=2_000,
        labels_path=labels,
        alert_id="b" * 32,
    )
    assert done.entry.params == {
        "kind": CONFIRMED_ABUSE_KIND,
        "start_ms": 0,
        "end_ms": 2_000,
        "alert_id": "b" * 32,
    }
    (line,) = read_labels(labels)
    assert (line.incident_id, line.kind) == (f"analyst-{done.seq}", CONFIRMED_ABUSE_KIND)
    assert [m.action for m in restrictions_in_force(ledger, KEY, 3_000)] == ["challenge"]


def test_an_upheld_appeal_can_write_its_benign_label_line(ledger: Ledger, tmp_path: Path) -> None:
    labels = tmp_path / "analyst.jsonl"
    ledger.append(LedgerEntry(1_000, KEY, "throttle", "system", "alert"))
    filed = appeal(ledger, OWNER, KEY, RAW_KEY, "our benchmark", hash_key=_hash)
    steps = uphold_appeal(ledger, CAROL, filed.seq, "confirmed", labels_path=labels, now_ms=9_000)
    (line,) = read_labels(labels)
    assert (line.incident_id, line.kind) == (f"analyst-{steps[-1].seq}", BENIGN_LABEL_KIND)
    assert (line.start.timestamp(), line.end.timestamp()) == (1.0, 9.0)


def test_a_release_reads_the_key_among_others_without_complaint(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    other = "cd" * 16
    ledger.append(LedgerEntry(1_000, other, "throttle", "system", "alert"))
    ledger.append(LedgerEntry(1_000, KEY, "cap", "system", "alert"))
    ledger.append(LedgerEntry(1_000, other, "challenge", "system", "alert"))
    with caplog.at_level("WARNING"):
        release(ledger, CAROL, KEY, "fine", now_ms=2_000)
    assert caplog.records == []
    assert [m.action for m in restrictions_in_force(ledger, other, 3_000)] == [
        "throttle",
        "challenge",
    ]
    assert restrictions_in_force(ledger, KEY, 3_000) == []


def test_a_release_clears_the_keys_pending_proposals_as_the_decision_table_does(
    ledger: Ledger,
) -> None:
    from qabuse_dagster.response.decision_table import DecisionTable

    other = "cd" * 16
    ledger.append(LedgerEntry(1_000, KEY, "throttle", "system", "alert"))
    proposal = _system(ledger, "revoke", requires_approval=True)
    review = _system(ledger, "review", instead_of="challenge")
    elsewhere = ledger.append(
        LedgerEntry(1_000, other, "revoke", "system", "x", params={"requires_approval": True})
    ).seq
    assert {i.seq for i in review_queue(ledger)} == {proposal, review, elsewhere}
    release(ledger, CAROL, KEY, "a lab's course", now_ms=2_000)
    # The other key's proposal still waits; this key's are gone, here and at the gateway.
    assert [i.seq for i in review_queue(ledger)] == [elsewhere]
    state = DecisionTable.from_records(ledger.records()).state(KEY, 3_000)
    assert not state.in_force
    with pytest.raises(ReviewError, match="nothing waits"):
        approve(ledger, BOB, proposal, "too late")
