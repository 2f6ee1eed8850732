"""Running ``qabuse`` in process with ``--home``, which pins QABUSE_HOME in os.environ."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qabuse_dagster import settings


def restore_home_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put QABUSE_HOME back as it is now (or unset) when the test ends."""
    home = os.environ.get(settings.HOME_ENV)
    if home is None:
        monkeypatch.delenv(settings.HOME_ENV, raising=False)
    else:
        monkeypatch.setenv(settings.HOME_ENV, home)


def run_qabuse(home: Path, *args: str) -> tuple[int, str]:
    """``qabuse --home HOME ARGS...`` in process: its exit code and output."""
    from click.testing import CliRunner

    from qabuse_dagster.cli import main

    result = CliRunner().invoke(main, ["--home", str(home), *args])
    return result.exit_code, result.output


def add_token(home: Path, name: str, *roles: str) -> str:
    """``qabuse tokens add NAME --role=...``: the printed token."""
    code, output = run_qabuse(home, "tokens", "add", name, *(f"--role={r}" for r in roles))
    assert code == 0, output
    return output.strip()
