"""Maker-checker approvals, reviews and appeals: every step in the ledger, every refusal named."""

from __future__ import annotations

from pathlib import Path

import pytest

from qabuse_dagster.response.auth import Principal
from qabuse_dagster.response.ledger import Ledger, open_ledger
from qabuse_dagster.response.records import LedgerEntry
from qabuse_dagster.response.review import (
    BENIGN_LABEL_KIND,
    ReviewError,
    appeal,
    approve,
    benign_labels,
    deny,
    propose,
    reject_appeal,
    review_queue,
    uphold_appeal,
)
from qabuse_dagster.telemetry.hashing import KeyedHasher

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
