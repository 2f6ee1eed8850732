"""``qabuse model promote|rollback``: @champion moved by hand, on a real registry and ledger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.cli_home import add_token, restore_home_after, run_qabuse

from models.ensemble import EnsembleDetector
from qabuse_dagster import model_registry, settings
from qabuse_dagster.response.decision_table import DecisionTable
from qabuse_dagster.response.ledger import open_ledger, verify_ledger

SIGNING_KEY = "model-test-signing-key-of-40-characters!"


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv(settings.SIGNING_KEY_ENV, SIGNING_KEY)
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    for name in (
        settings.LEDGER_URL_ENV,
        settings.TOKENS_FILE_ENV,
        settings.MLFLOW_URI_ENV,
        "QABUSE_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    restore_home_after(monkeypatch)
    # Two versions of the served ensemble, none promoted yet.
    detector = EnsembleDetector(["a", "b"], top_k=1).fit(
        np.random.default_rng(0).normal(size=(400, 2))
    )
    for run in ("first", "second"):
        model_registry.log_detector(
            detector, family="ensemble", params={}, metrics={}, run_name=run
        )
    return tmp_path


def _champion() -> str:
    return model_registry.resolve_alias(settings.CHAMPION_ALIAS).version


def test_promote_and_roll_back_with_a_ledger_entry_each(home: Path) -> None:
    carol = add_token(home, "carol", "approver")
    name = settings.model_name()

    code, output = run_qabuse(home, "model", "promote", "1", "--reason", "first", "--token", carol)
    assert code == 0, output
    assert "none -> v1" in output and _champion() == "1"
    code, output = run_qabuse(home, "model", "promote", "2", "--reason", "better", "--token", carol)
    assert code == 0, output
    assert "v1 -> v2" in output and _champion() == "2"
    code, output = run_qabuse(home, "model", "promote", "2", "--reason", "again", "--token", carol)
    assert code == 0 and "nothing changed" in output

    code, output = run_qabuse(home, "model", "rollback", "--reason", "regressed", "--token", carol)
    assert code == 0, output
    assert "v2 -> v1" in output and _champion() == "1"
    # v1 replaced no champion: nothing further back.
    code, output = run_qabuse(home, "model", "rollback", "--reason", "again", "--token", carol)
    assert code == 1 and "nothing to roll back to" in output
    assert _champion() == "1"

    with open_ledger() as ledger:
        entries = [record.entry for record in ledger.records()]
    assert [(e.action, e.params["from_version"], e.params["to_version"]) for e in entries] == [
        ("promote_model", None, "1"),
        ("promote_model", "1", "2"),
        ("rollback_model", "2", "1"),
    ]
    assert {(e.actor, e.api_key_id, e.model_name) for e in entries} == {
        ("carol", f"model:{name}", name)
    }
    assert [e.reason for e in entries] == ["first", "better", "regressed"]
    assert verify_ledger().ok
    # Model events are not about a key: the gateway's table names no key for them.
    with open_ledger() as ledger:
        assert DecisionTable.from_records(ledger.records()).api_keys() == []


def test_only_approvers_move_models_and_unknown_versions_are_refused(home: Path) -> None:
    dave = add_token(home, "dave", "analyst")
    carol = add_token(home, "carol", "approver")
    code, output = run_qabuse(home, "model", "promote", "1", "--reason", "x", "--token", dave)
    assert code == 2 and "not an approver" in output
    code, output = run_qabuse(home, "model", "promote", "9", "--reason", "x", "--token", carol)
    assert code == 1 and "no version '9'" in output
    code, output = run_qabuse(home, "model", "promote", "1", "--reason", "x")
    assert code == 2 and "token" in output
    code, output = run_qabuse(home, "model", "rollback", "--reason", "x", "--token", carol)
    assert code == 1 and "alias @champion" in output  # no champion yet
    with pytest.raises(model_registry.ModelNotFoundError):
        _champion()


def test_a_move_the_ledger_cannot_record_does_not_happen(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    carol = add_token(home, "carol", "approver")
    monkeypatch.setenv(settings.SIGNING_KEY_ENV, "too short")
    code, output = run_qabuse(home, "model", "promote", "1", "--reason", "x", "--token", carol)
    assert code == 1, output
    assert "the ledger cannot record the move" in output
    with pytest.raises(model_registry.ModelNotFoundError):
        _champion()
