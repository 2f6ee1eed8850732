"""The review workflow and the gateway's decision table agree, through one real ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qabuse_dagster.response.auth import Principal
from qabuse_dagster.response.decision_table import DecisionTable
from qabuse_dagster.response.ledger import Ledger, open_ledger
from qabuse_dagster.response.records import LedgerEntry
from qabuse_dagster.response.review import ReviewError, appeal, approve, uphold_appeal
from qabuse_dagster.telemetry.hashing import KeyedHasher

HASHER = KeyedHasher(b"test-hash-key-for-the-workflow-0123456")
RAW = "qk_live_workflow"
KEY = HASHER.hash(RAW, domain="api_key")
BOB = Principal("bob", frozenset({"approver"}))
ALICE = Principal("alice", frozenset({"approver", "analyst"}))
OWNER = Principal("owner", frozenset({"owner"}), frozenset({KEY}))
NOW = 10_000


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", key=b"w" * 32) as opened:
        yield opened


def _status(ledger: Ledger) -> int:
    return DecisionTable.from_records(ledger.records()).lookup(KEY, NOW).status


def test_a_system_revocation_takes_effect_only_once_another_principal_approves(
    ledger: Ledger,
) -> None:
    proposal = ledger.append(
        LedgerEntry(1_000, KEY, "revoke", "system", "failed challenges", {"requires_approval": 1})
    )
    assert _status(ledger) == 200
    (approval,) = approve(ledger, BOB, proposal.seq, "confirmed", now_ms=2_000)
    assert approval.entry.actor == "bob"
    assert _status(ledger) == 403


def test_a_proposer_approving_its_own_revocation_changes_nothing_at_the_gateway(
    ledger: Ledger,
) -> None:
    proposal = ledger.append(LedgerEntry(1_000, KEY, "revoke", "alice", "leaked"))
    with pytest.raises(ReviewError, match="second principal"):
        approve(ledger, ALICE, proposal.seq, "mine")
    ledger.append(LedgerEntry(1_500, KEY, "approve", "alice", "forged", refers_to=proposal.seq))
    assert _status(ledger) == 200


def test_an_approved_review_revokes_at_the_gateway(ledger: Ledger) -> None:
    review = ledger.append(
        LedgerEntry(1_000, KEY, "review", "system", "high-impact", {"instead_of": "revoke"})
    )
    assert _status(ledger) == 200
    approve(ledger, BOB, review.seq, "looked at the whole key", now_ms=2_000)
    assert _status(ledger) == 403


def test_an_upheld_appeal_lets_the_key_through_again(ledger: Ledger) -> None:
    ledger.append(LedgerEntry(1_000, KEY, "challenge", "system", "alert"))
    assert _status(ledger) == 403
    filed = appeal(ledger, OWNER, KEY, RAW, "our benchmark", hash_key=_hash, now_ms=2_000)
    uphold_appeal(ledger, ALICE, filed.seq, "confirmed", now_ms=3_000)
    assert _status(ledger) == 200
    assert ledger.verify().ok


def _hash(raw: str) -> str:
    return HASHER.hash(raw, domain="api_key")
