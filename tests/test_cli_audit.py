"""``qabuse audit verify``: ok on an intact ledger, one line per problem and exit 1 otherwise."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.cli_home import restore_home_after

from qabuse_dagster import settings
from qabuse_dagster.cli import main
from qabuse_dagster.response.ledger import open_ledger
from qabuse_dagster.response.records import LedgerEntry

SIGNING_KEY = "audit-test-signing-key-of-40-characters!"


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv(settings.SIGNING_KEY_ENV, SIGNING_KEY)
    monkeypatch.delenv(settings.LEDGER_URL_ENV, raising=False)
    restore_home_after(monkeypatch)  # `qabuse --home` pins QABUSE_HOME in os.environ
    return CliRunner()


def write_ledger(path: Path, n: int) -> str:
    url = f"sqlite:///{path}"
    with open_ledger(url, key=SIGNING_KEY.encode()) as ledger:
        head = ledger.append_many(
            LedgerEntry(60_000 * (i + 1), f"{i:016x}", "throttle", "system", f"score {i}")
            for i in range(n)
        )[-1]
    return head.hash


def test_an_intact_ledger_is_ok(runner: CliRunner, tmp_path: Path) -> None:
    # The default ledger: the embedded one under --home.
    head = write_ledger(tmp_path / "ledger" / "decisions.db", 4)
    result = runner.invoke(main, ["--home", str(tmp_path), "audit", "verify"])
    assert result.exit_code == 0, result.output
    assert result.output == f"ok: 4 entries, head {head[:12]}\n"


def test_a_tampered_ledger_exits_1_naming_each_problem(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.db"
    write_ledger(path, 5)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "UPDATE ledger_records SET entry = replace(entry, 'score 1', 'fine') WHERE seq = 2"
        )
        conn.execute("DELETE FROM ledger_records WHERE seq = 4")
    conn.close()
    result = runner.invoke(
        main, ["--home", str(tmp_path), "audit", "verify", "--ledger", f"sqlite:///{path}"]
    )
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("seq 2: edited: ")
    assert lines[1] == "seq 4: missing: record 4 is missing (deleted)"


def test_no_ledger_is_an_error_not_an_empty_ledger(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["--home", str(tmp_path), "audit", "verify"])
    assert result.exit_code == 1
    assert "no ledger at" in result.output
    assert not (tmp_path / "ledger").exists()
    result = runner.invoke(
        main, ["--home", str(tmp_path), "audit", "verify", "--ledger", "mysql://host/db"]
    )
    assert result.exit_code == 2
    assert "unsupported ledger URL" in result.output
