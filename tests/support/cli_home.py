"""Running ``qabuse`` in process with ``--home``, which pins QABUSE_HOME in os.environ."""

from __future__ import annotations

import os

import pytest

from qabuse_dagster import settings


def restore_home_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put QABUSE_HOME back as it is now (or unset) when the test ends."""
    home = os.environ.get(settings.HOME_ENV)
    if home is None:
        monkeypatch.delenv(settings.HOME_ENV, raising=False)
    else:
        monkeypatch.setenv(settings.HOME_ENV, home)
