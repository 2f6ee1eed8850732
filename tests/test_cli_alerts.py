"""``qabuse alerts``: list, show and act on the alerts of a home, as the triage page does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.cli_home import restore_home_after, run_qabuse

from qabuse_dagster import settings
from qabuse_dagster.response.alert_store import AlertStore, alerts_path
from qabuse_dagster.response.alerts import Alert, alert_id, example_alert
from qabuse_dagster.response.ledger import open_ledger
from qabuse_dagster.response.records import LedgerEntry
from qabuse_dagster.telemetry.labels import read_labels

SIGNING_KEY = "alerts-test-signing-key-of-40-characters"


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv(settings.SIGNING_KEY_ENV, SIGNING_KEY)
    for name in (settings.LEDGER_URL_ENV, settings.TOKENS_FILE_ENV, "QABUSE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    restore_home_after(monkeypatch)
    return tmp_path


def _alerts(home: Path) -> tuple[Alert, Alert]:
    throttled = Alert.model_validate(example_alert())
    decided_ms = int(throttled.decided_at.timestamp() * 1000)
    other_key = "5e" * 8
    other = throttled.model_copy(
        update={
            "alert_id": alert_id(other_key, "challenge", decided_ms),
            "api_key_id": other_key,
            "action": "challenge",
            "score": 1.5,
        }
    )
    with AlertStore(alerts_path(settings.Paths(home))) as store:
        store.add(throttled, sinks=["jsonl"])
        store.add(other, sinks=["jsonl"])
    url = f"sqlite:///{home / 'ledger' / 'decisions.db'}"
    with open_ledger(url, key=SIGNING_KEY.encode()) as ledger:
        ledger.append(
            LedgerEntry(decided_ms, throttled.api_key_id, "throttle", "system", throttled.reason)
        )
    return throttled, other


def test_list_show_and_act_on_alerts(home: Path) -> None:
    throttled, other = _alerts(home)
    code, token = run_qabuse(home, "tokens", "add", "ada", "--role=analyst")
    assert code == 0, token
    code, output = run_qabuse(home, "alerts", "list", "--json")
    assert code == 0, output
    # By score, highest first.
    assert [json.loads(line)["alert_id"] for line in output.splitlines()] == [
        throttled.alert_id,
        other.alert_id,
    ]
    code, output = run_qabuse(home, "alerts", "list", "--action", "challenge")
    assert code == 0 and other.alert_id[:12] in output and throttled.alert_id[:12] not in output
    code, output = run_qabuse(home, "alerts", "show", throttled.alert_id[:10])
    assert code == 0 and Alert.model_validate_json(output) == throttled

    code, output = run_qabuse(
        home, "alerts", "act", throttled.alert_id, "release", "--token", token.strip()
    )
    assert code == 0 and "released by ada" in output, output
    code, output = run_qabuse(
        home,
        "alerts",
        "act",
        other.alert_id,
        "false-positive",
        "--token",
        token.strip(),
        "--reason",
        "a workshop",
    )
    assert code == 0 and "false_positive by ada" in output, output
    with open_ledger(
        f"sqlite:///{home / 'ledger' / 'decisions.db'}", key=SIGNING_KEY.encode()
    ) as ledger:
        steps = [(r.entry.action, r.entry.actor) for r in ledger.records()]
    assert ("release", "ada") in steps and ("label", "ada") in steps
    (label,) = read_labels(settings.Paths(home).analyst_labels)
    assert label.kind == "false_positive" and list(label.api_key_ids or ()) == [other.api_key_id]
    code, output = run_qabuse(home, "alerts", "list")
    assert code == 0 and output.startswith("no open alerts")
    code, output = run_qabuse(home, "alerts", "list", "--status", "all", "--json")
    assert len(output.splitlines()) == 2
    code, output = run_qabuse(home, "alerts", "outbox")
    assert code == 0 and "jsonl: 2 waiting, 0 delivered" in output


def test_acting_needs_a_known_token_and_alert(home: Path) -> None:
    throttled, _ = _alerts(home)
    code, output = run_qabuse(home, "alerts", "act", throttled.alert_id, "release")
    assert code != 0 and "give your token" in output
    code, token = run_qabuse(home, "tokens", "add", "gate", "--role=gateway")
    code, output = run_qabuse(
        home, "alerts", "act", throttled.alert_id, "release", "--token", token.strip()
    )
    assert code != 0 and "gate needs the role" in output
    code, output = run_qabuse(home, "alerts", "show", "0123456789")
    assert code != 0 and "no alert '0123456789'" in output
    code, output = run_qabuse(home, "alerts", "list", "--status", "maybe")
    assert code != 0 and "--status" in output
