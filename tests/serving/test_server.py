"""How many workers ``qabuse serve`` starts, and where the number comes from."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from qabuse_dagster.serving import server
from qabuse_dagster.serving.server import MAX_DEFAULT_WORKERS, WORKERS_ENV, scorer_workers


def test_workers_default_to_one_per_core_up_to_a_few(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert 1 <= scorer_workers() <= MAX_DEFAULT_WORKERS
    monkeypatch.setenv(WORKERS_ENV, "6")
    assert scorer_workers() == 6


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5"])
def test_a_bad_worker_count_is_refused_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv(WORKERS_ENV, text)
    with pytest.raises(ValueError, match=WORKERS_ENV):
        scorer_workers()


def test_qabuse_serve_passes_its_workers_to_bentoml(monkeypatch: pytest.MonkeyPatch) -> None:
    from qabuse_dagster.cli import main

    started: list[dict[str, str] | None] = []

    class Exited:
        def wait(self) -> int:
            return 0

    def start_server(*_args: object, env: dict[str, str] | None = None, **_kw: object) -> Exited:
        started.append(env)
        return Exited()

    monkeypatch.setattr(server, "start_server", start_server)
    result = CliRunner().invoke(main, ["serve", "--workers", "3"])
    assert result.exit_code == 0, result.output
    assert started == [{WORKERS_ENV: "3"}]
    assert CliRunner().invoke(main, ["serve", "--workers", "0"]).exit_code == 2
