"""``qabuse tokens``, ``qabuse review`` and ``qabuse response report`` on a real ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.cli_home import add_token, restore_home_after, run_qabuse

from qabuse_dagster import settings
from qabuse_dagster.response.ledger import open_ledger
from qabuse_dagster.response.records import LedgerEntry

SIGNING_KEY = "review-test-signing-key-of-40-characters"
KEY, OTHER = "ab" * 16, "cd" * 16


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv(settings.SIGNING_KEY_ENV, SIGNING_KEY)
    for name in (settings.LEDGER_URL_ENV, settings.TOKENS_FILE_ENV, "QABUSE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    restore_home_after(monkeypatch)  # `qabuse --home` pins QABUSE_HOME in os.environ
    return tmp_path


def _append(home: Path, *entries: LedgerEntry) -> None:
    url = f"sqlite:///{home / 'ledger' / 'decisions.db'}"
    with open_ledger(url, key=SIGNING_KEY.encode()) as ledger:
        ledger.append_many(entries)


def test_tokens_are_printed_once_and_stored_as_hashes(home: Path) -> None:
    token = add_token(home, "alice", "analyst", "approver")
    assert len(token) >= 32
    stored = (home / "secrets" / "tokens.json").read_text()
    assert token not in stored and "alice" in stored
    code, output = run_qabuse(home, "tokens", "add", "bob", "--role=owner", "--key=nothex")
    assert code == 2 and "hex" in output


def test_the_queue_is_listed_and_a_second_principal_approves(home: Path) -> None:
    alice = add_token(home, "alice", "analyst", "approver")
    bob = add_token(home, "bob", "approver")
    _append(home, LedgerEntry(1_000, KEY, "revoke", "system", "20 failed challenges"))
    code, output = run_qabuse(home, "review", "list", "--json")
    assert code == 0, output
    (item,) = json.loads(output)
    assert (item["seq"], item["waits_for"], item["api_key_id"]) == (1, "approval", KEY)

    code, output = run_qabuse(
        home, "review", "propose", OTHER, "--token", alice, "--reason", "leak"
    )
    assert code == 0, output
    code, output = run_qabuse(home, "review", "approve", "2", "--token", alice)
    assert code == 1 and "second principal" in output
    code, output = run_qabuse(home, "review", "approve", "2", "--token", bob, "--reason", "agreed")
    assert code == 0 and "approve" in output and "by bob" in output
    code, output = run_qabuse(home, "review", "approve", "1", "--token", bob)
    assert code == 0, output
    assert run_qabuse(home, "review")[1].strip() == "the review queue is empty"
    assert run_qabuse(home, "audit", "verify")[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["approve", "1"], "QABUSE_TOKEN"),
        (["approve", "1", "--token", "not-a-token"], "unknown"),
        (["approve", "one", "--token", "{alice}"], "ledger entry number"),
        (["approve", "--token", "{alice}"], "needs a TARGET"),
        (["approve", "9", "--token", "{bob}"], "nothing waits"),
    ],
)
def test_review_refusals_say_why(home: Path, args: list[str], message: str) -> None:
    tokens = {
        "{alice}": add_token(home, "alice", "analyst"),
        "{bob}": add_token(home, "bob", "approver"),
    }
    _append(home, LedgerEntry(1_000, KEY, "revoke", "system", "x"))
    code, output = run_qabuse(home, "review", *(tokens.get(a, a) for a in args))
    assert code != 0 and message in output


def test_the_shadow_report_counts_legitimate_keys_from_labels(home: Path) -> None:
    _append(
        home,
        LedgerEntry(60_000, KEY, "throttle", "system", "alert", mode="shadow"),
        LedgerEntry(120_000, OTHER, "throttle", "system", "alert", mode="shadow"),
        LedgerEntry(180_000, KEY, "challenge", "system", "alert", mode="shadow"),
    )
    labels = home / "incidents.jsonl"
    label = {
        "incident_id": "i1",
        "kind": "runaway_ci",
        "start": "1970-01-01T00:00:00Z",
        "end": "1970-01-02T00:00:00Z",
        "api_key_ids": [KEY],
    }
    labels.write_text(json.dumps(label) + "\n")
    out = home / "shadow.json"
    code, output = run_qabuse(
        home, "response", "report", "--labels", str(labels), "--json", str(out)
    )
    assert code == 0, output
    assert "throttle" in output and "challenge" in output
    rows = {row["action"]: row for row in json.loads(out.read_text())["rows"]}
    assert (rows["throttle"]["keys"], rows["throttle"]["legit_keys"]) == (2, 1)
    assert rows["challenge"]["legit_keys"] == 0
