"""Settings read from the environment and the home: the generated signing key."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from qabuse_dagster import settings


def test_processes_starting_together_on_a_fresh_home_share_one_whole_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stream worker and the gateway start together under `qabuse up`: none may read
    # the key file while it is still empty, and all must keep the same key.
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    monkeypatch.delenv(settings.SIGNING_KEY_ENV, raising=False)
    start = threading.Barrier(16)
    keys: list[bytes] = []
    errors: list[BaseException] = []

    def read() -> None:
        start.wait()
        try:
            keys.append(settings.signing_key())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    secrets_dir = settings.paths().secrets
    assert [p.name for p in secrets_dir.iterdir()] == ["signing.key"]  # no draft left
    assert (secrets_dir / "signing.key").stat().st_mode & 0o777 == 0o600
