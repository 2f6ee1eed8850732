"""The ``qabuse`` command line, in process, on its error paths and small happy paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.cli_home import restore_home_after

from qabuse_dagster import settings
from qabuse_dagster.cli import main
from qabuse_dagster.simulation import SCENARIOS
from qabuse_dagster.telemetry.hashing import HASH_KEY_ENV


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv(HASH_KEY_ENV, raising=False)
    restore_home_after(monkeypatch)  # `qabuse --home` pins QABUSE_HOME in os.environ
    return CliRunner()


def test_simulate_without_a_hash_key_says_what_to_do(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["--home", str(tmp_path), "simulate", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert HASH_KEY_ENV in result.output
    assert "--demo-key" in result.output
    assert not (tmp_path / "telemetry.jsonl").exists()


def test_simulate_with_a_key_from_the_environment(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HASH_KEY_ENV, "k" * 40)
    out = tmp_path / "sim"
    result = runner.invoke(
        main,
        ["--home", str(tmp_path), "simulate", "--hours", "2", "--seed", "4", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    lines = (out / "telemetry.jsonl").read_text().splitlines()
    assert len(lines) > 100
    assert f"{len(lines)} records" in result.output


def test_ingest_counts_quarantines_and_exits_1_on_rejections(
    runner: CliRunner, tmp_path: Path
) -> None:
    sim = tmp_path / "sim"
    assert (
        runner.invoke(
            main,
            ["--home", str(tmp_path), "simulate", "--hours", "1", "--out", str(sim), "--demo-key"],
        ).exit_code
        == 0
    )
    good = (sim / "telemetry.jsonl").read_text().splitlines()
    bad = dict(json.loads(good[0]), shots=-5, job_id="bad-1")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([*good[:50], json.dumps(bad), "{not json", *good[:2]]) + "\n")

    result = runner.invoke(main, ["--home", str(tmp_path / "home"), "ingest", str(mixed)])

    assert result.exit_code == 1
    assert "54 lines: 50 accepted, 2 duplicates, 2 rejected" in result.output
    assert f"{mixed}:51: shots: must be >= 0" in result.output
    assert f"{mixed}:52: <line>: not JSON" in result.output
    quarantined = list((tmp_path / "home" / "quarantine").glob("*.jsonl"))
    assert len(quarantined) == 1
    assert len(quarantined[0].read_text().splitlines()) == 2


def test_ingest_of_a_clean_file_with_labels_exits_0(runner: CliRunner, tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    runner.invoke(
        main, ["--home", str(tmp_path), "simulate", "--hours", "1", "--out", str(sim), "--demo-key"]
    )
    home = tmp_path / "home"
    result = runner.invoke(
        main,
        [
            "--home",
            str(home),
            "ingest",
            str(sim / "telemetry.jsonl"),
            "--labels",
            str(sim / "incidents.jsonl"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "0 rejected" in result.output
    assert (home / "labels" / "incidents.jsonl").exists()
    assert settings.Paths(home).landing.exists()


def test_ingest_refuses_a_malformed_labels_file_naming_the_line(
    runner: CliRunner, tmp_path: Path
) -> None:
    telemetry = tmp_path / "empty.jsonl"
    telemetry.write_text("")
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"incident_id": "a", "kind": "x"}\n')
    result = runner.invoke(
        main, ["--home", str(tmp_path), "ingest", str(telemetry), "--labels", str(labels)]
    )
    assert result.exit_code == 1
    assert f"{labels}:1:" in result.output


def test_materialize_with_nothing_landed_says_so(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["--home", str(tmp_path), "materialize"])
    assert result.exit_code == 1
    assert "run `qabuse ingest` first" in result.output


def test_simulate_with_scenarios_writes_every_kind_and_the_key_kinds(
    runner: CliRunner, tmp_path: Path
) -> None:
    out = tmp_path / "sim"
    result = runner.invoke(
        main,
        [
            "--home",
            str(tmp_path),
            "simulate",
            "--days",
            "1",
            "--seed",
            "2",
            "--scenarios",
            "credit_drain,key_leak",
            "--out",
            str(out),
            "--demo-key",
        ],
    )
    assert result.exit_code == 0, result.output
    kinds = {
        json.loads(line)["kind"] for line in (out / "incidents.jsonl").read_text().splitlines()
    }
    assert kinds == {"credit_drain", "key_leak"}
    key_kinds = json.loads((out / "key_kinds.json").read_text())
    assert "classroom" in set(key_kinds.values())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], set(SCENARIOS)),  # the default: the whole library
        (["--scenarios", "reference"], {"runaway_ci"}),
    ],
)
def test_simulate_runs_every_scenario_by_default_or_the_reference_deployment(
    runner: CliRunner, tmp_path: Path, args: list[str], expected: set[str]
) -> None:
    out = tmp_path / "sim"
    result = runner.invoke(
        main,
        [
            "--home",
            str(tmp_path),
            "simulate",
            "--hours",
            "6",
            "--out",
            str(out),
            "--demo-key",
            *args,
        ],
    )
    assert result.exit_code == 0, result.output
    lines = (out / "incidents.jsonl").read_text().splitlines()
    assert {json.loads(line)["kind"] for line in lines} == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenarios", "nope"], "unknown scenario(s) ['nope']"),
        (["--hours", "2", "--days", "1"], "not both"),
    ],
)
def test_simulate_refuses_bad_options(
    runner: CliRunner, tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(
        main, ["--home", str(tmp_path), "simulate", "--out", str(tmp_path), "--demo-key", *args]
    )
    assert result.exit_code == 2
    assert message in result.output


def test_features_lists_the_catalogue_as_a_table_and_as_json(runner: CliRunner) -> None:
    from qabuse_dagster.features.definitions import FEATURES, FEATURES_BY_WINDOW

    table = runner.invoke(main, ["features"])
    as_json = runner.invoke(main, ["features", "--json", "--window", "1h"])

    assert table.exit_code == 0, table.output
    assert "median_runtime_s_1h" in table.output and "submissions_1m *" in table.output
    assert as_json.exit_code == 0, as_json.output
    listed = json.loads(as_json.output)
    assert [f["name"] for f in listed] == list(FEATURES_BY_WINDOW["1h"])
    assert {"unit", "description", "low", "high", "integer"} <= set(listed[0])
    assert len(FEATURES) > len(listed)
