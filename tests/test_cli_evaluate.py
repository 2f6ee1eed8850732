"""``qabuse evaluate``: the report written and printed, and clear failures naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qabuse_dagster import settings
from qabuse_dagster.cli import main
from qabuse_dagster.evaluation.families import resolve_names
from qabuse_dagster.simulation import SimulationResult, simulate
from qabuse_dagster.telemetry.hashing import KeyedHasher


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    out = tmp_path_factory.mktemp("twin")
    return simulate(hours=8, seed=5, out=out, hasher=KeyedHasher.demo())


def _evaluate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["evaluate", *args])
    return result.exit_code, result.output


def test_happy_path_writes_json_html_and_prints_every_detector(
    twin: SimulationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(settings.MLFLOW_URI_ENV, raising=False)
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    code, output = _evaluate(
        "--telemetry",
        str(twin.telemetry_path),
        "--labels",
        str(twin.labels_path),
        "--json",
        str(out_json),
        "--html",
        str(out_html),
    )
    assert code == 0, output
    report = json.loads(out_json.read_text())
    # --detector all: the champion at the top, then every family, then the baseline.
    assert report["detector"] == "ensemble"
    assert list(report["detectors"]) == ["ensemble", *resolve_names("all"), "baseline"]
    assert report["baseline"] == report["detectors"]["baseline"]
    top = {k: v for k, v in report.items() if k not in ("detectors", "baseline", "closed_loop")}
    assert top == report["detectors"]["ensemble"]
    assert {
        "recall",
        "precision_at_k",
        "pr_auc",
        "benign_key_day_alert_rate",
        "benign_row_alert_rate",
    } <= set(report["overall"])
    assert report["incidents"][0]["kind"] == "runaway_ci"
    assert "runaway_ci" in report["per_kind"]
    rows = [line for line in output.splitlines() if "runaway_ci" in line]
    for name in report["detectors"]:
        assert any(name in r for r in rows), name
    page = out_html.read_text()
    assert "data:image/png;base64," in page
    # twin.json sits beside the telemetry: the twin is rerun with qabuse mitigating.
    loop = report["closed_loop"]
    assert loop["legit_wait_with"]["jobs"] > 0 and loop["legit_wait_without"]["jobs"] > 0
    assert [i["kind"] for i in loop["incidents"]] == ["runaway_ci"]
    assert loop["incidents"][0]["mitigated_after_s"] is not None
    assert "Closed loop" in output and "legitimate keys mitigated" in output
    assert "Closed loop" in page


def test_no_closed_loop_skips_the_rerun(twin: SimulationResult, tmp_path: Path) -> None:
    out_json = tmp_path / "r.json"
    code, output = _evaluate(
        "--telemetry",
        str(twin.telemetry_path),
        "--labels",
        str(twin.labels_path),
        "--json",
        str(out_json),
        "--detector",
        "isolation_forest,baseline",
        "--no-closed-loop",
    )
    assert code == 0, output
    report = json.loads(out_json.read_text())
    assert "closed_loop" not in report
    # A list: its first detector at the top, in the order given.
    assert report["detector"] == "isolation_forest"
    assert list(report["detectors"]) == ["isolation_forest", "baseline"]
    assert report["baseline"]["detector"] == "baseline"


def test_the_alert_budget_sets_each_familys_threshold(
    twin: SimulationResult, tmp_path: Path
) -> None:
    thresholds = {}
    for budget in ("0.2", "0.001"):
        out_json = tmp_path / f"r{budget}.json"
        code, output = _evaluate(
            "--telemetry",
            str(twin.telemetry_path),
            "--labels",
            str(twin.labels_path),
            "--json",
            str(out_json),
            "--detector",
            "isolation_forest",
            "--no-closed-loop",
            "--alert-budget",
            budget,
        )
        assert code == 0, output
        report = json.loads(out_json.read_text())
        assert "baseline" not in report
        thresholds[budget] = report["threshold"]
    assert thresholds["0.2"] < thresholds["0.001"]


@pytest.mark.parametrize("budget", ["0", "1", "-0.1", "lots"])
def test_an_alert_budget_outside_0_1_is_refused(
    twin: SimulationResult, tmp_path: Path, budget: str
) -> None:
    output = _fail(
        [
            "--telemetry",
            str(twin.telemetry_path),
            "--labels",
            str(twin.labels_path),
            "--json",
            str(tmp_path / "r.json"),
            "--alert-budget",
            budget,
        ]
    )
    assert "--alert-budget" in output
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("spec", ["nope", "isolation_forest,nope", "lof,lof"])
def test_an_unknown_or_repeated_detector_is_refused(
    twin: SimulationResult, tmp_path: Path, spec: str
) -> None:
    output = _fail(
        [
            "--telemetry",
            str(twin.telemetry_path),
            "--labels",
            str(twin.labels_path),
            "--json",
            str(tmp_path / "r.json"),
            "--detector",
            spec,
        ]
    )
    assert "--detector" in output
    if "nope" in spec:
        assert "nope" in output and "isolation_forest" in output  # the known ones are listed
    assert not (tmp_path / "r.json").exists()


def test_closed_loop_without_a_twin_manifest_says_what_is_missing(
    twin: SimulationResult, tmp_path: Path
) -> None:
    telemetry = tmp_path / "telemetry.jsonl"
    telemetry.write_bytes(twin.telemetry_path.read_bytes())
    output = _fail(
        [
            "--telemetry",
            str(telemetry),
            "--labels",
            str(twin.labels_path),
            "--json",
            str(tmp_path / "r.json"),
            "--detector",
            "isolation_forest",
            "--closed-loop",
        ]
    )
    assert "twin.json" in output and "qabuse simulate" in output


def test_a_twin_whose_hash_key_is_not_set_skips_the_closed_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = simulate(
        hours=4, seed=6, out=tmp_path, hasher=KeyedHasher(b"a-private-key-0123456789abcdef")
    )
    monkeypatch.delenv("QABUSE_HASH_KEY", raising=False)
    out_json = tmp_path / "r.json"
    code, output = _evaluate(
        "--telemetry",
        str(private.telemetry_path),
        "--labels",
        str(private.labels_path),
        "--json",
        str(out_json),
        "--detector",
        "isolation_forest",
    )
    assert code == 0, output
    assert "closed loop skipped" in output and "QABUSE_HASH_KEY" in output
    assert "closed_loop" not in json.loads(out_json.read_text())


def _fail(args: list[str]) -> str:
    code, output = _evaluate(*args)
    assert code != 0
    return output


def test_labels_naming_an_absent_key_fail(twin: SimulationResult, tmp_path: Path) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        json.dumps(
            {
                "incident_id": "ghost-7",
                "kind": "key_leak",
                "start": "2026-11-02T05:00:00Z",
                "end": "2026-11-02T06:00:00Z",
                "api_key_ids": ["ab" * 8],
            }
        )
        + "\n"
    )
    output = _fail(
        [
            "--telemetry",
            str(twin.telemetry_path),
            "--labels",
            str(labels),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert "ghost-7" in output and "absent from the telemetry" in output
    assert not (tmp_path / "r.json").exists()


def test_empty_telemetry_fails(twin: SimulationResult, tmp_path: Path) -> None:
    empty = tmp_path / "telemetry.jsonl"
    empty.write_text("")
    output = _fail(
        [
            "--telemetry",
            str(empty),
            "--labels",
            str(twin.labels_path),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert "telemetry.jsonl" in output and "empty" in output


def test_malformed_telemetry_line_names_the_line(twin: SimulationResult, tmp_path: Path) -> None:
    bad = tmp_path / "telemetry.jsonl"
    lines = twin.telemetry_path.read_text().splitlines()[:3]
    bad.write_text("\n".join([*lines, '{"schema_version": 1,', lines[0]]) + "\n")
    output = _fail(
        [
            "--telemetry",
            str(bad),
            "--labels",
            str(twin.labels_path),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert f"{bad}:4:" in output and "not JSON" in output


def test_malformed_labels_line_names_the_line(twin: SimulationResult, tmp_path: Path) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_text(twin.labels_path.read_text() + "{oops\n")
    output = _fail(
        [
            "--telemetry",
            str(twin.telemetry_path),
            "--labels",
            str(labels),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert f"{labels}:2:" in output and "malformed JSON" in output


def test_analyst_feedback_from_the_triage_workflow_is_counted(
    twin: SimulationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A false positive and a confirmed abuse, given as the triage page gives them."""
    from qabuse_dagster.response.auth import Principal
    from qabuse_dagster.response.ledger import open_ledger
    from qabuse_dagster.response.review import confirm_abuse, mark_false_positive
    from qabuse_dagster.telemetry.labels import read_labels

    monkeypatch.delenv(settings.MLFLOW_URI_ENV, raising=False)
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path / "home"))
    (incident,) = read_labels(twin.labels_path)
    abusive = incident.api_key_ids[0]
    records = [json.loads(line) for line in twin.telemetry_path.read_text().splitlines()]
    benign = sorted({r["api_key_id"] for r in records} - set(incident.api_key_ids))[0]
    start_ms = int(incident.start.timestamp() * 1000)
    end_ms = int(incident.end.timestamp() * 1000)
    analyst = Principal("ada", frozenset({"analyst"}))
    labels_path = settings.paths().analyst_labels
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", key=b"k" * 32) as ledger:
        mark_false_positive(
            ledger,
            analyst,
            benign,
            "a course's homework burst",
            start_ms=start_ms,
            end_ms=end_ms,
            labels_path=labels_path,
        )
        confirm_abuse(
            ledger,
            analyst,
            abusive,
            "a loop in CI, confirmed with the tenant",
            start_ms=start_ms,
            end_ms=end_ms,
            labels_path=labels_path,
        )
    out_json = tmp_path / "r.json"
    # The default: the home's analyst labels, beside --labels.
    code, output = _evaluate(
        "--telemetry",
        str(twin.telemetry_path),
        "--labels",
        str(twin.labels_path),
        "--detector",
        "isolation_forest",
        "--no-closed-loop",
        "--json",
        str(out_json),
    )
    assert code == 0, output
    assert "2 of 2 name keys of this telemetry (1 false positive, 1 confirmed abuse)" in output
    report = json.loads(out_json.read_text())
    feedback = report["analyst_feedback"]
    assert feedback["confirmed"] == 1 and feedback["false_positives"] == 1
    assert feedback["alerted_confirmed"] == 1  # the runaway is caught in its window
    assert feedback["precision"] == 1 / (1 + feedback["alerted_false_positives"])
    assert "confirmed_abuse" in report["per_kind"]
    assert f"alerts on 1 of 1 confirmed and {feedback['alerted_false_positives']} of 1" in output
    # A labels file that does not exist, named, is an error; one that is not a labels file too.
    code, output = _evaluate(
        "--telemetry",
        str(twin.telemetry_path),
        "--labels",
        str(twin.labels_path),
        "--analyst-labels",
        str(tmp_path / "nope.jsonl"),
        "--json",
        str(out_json),
    )
    assert code != 0 and "nope.jsonl does not exist" in output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"incident_id": "x"}\n')
    code, output = _evaluate(
        "--telemetry",
        str(twin.telemetry_path),
        "--labels",
        str(twin.labels_path),
        "--analyst-labels",
        str(bad),
        "--no-closed-loop",
        "--json",
        str(out_json),
    )
    assert code != 0 and "bad.jsonl:1: kind: missing required field" in output
