"""The workload twin: contract-valid, deterministic telemetry with a detectable incident."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from jsonschema import Draft202012Validator

from qabuse_dagster.simulation import SimulationResult, simulate
from qabuse_dagster.simulation.tenants import MAX_BENIGN_JOBS_PER_MINUTE
from qabuse_dagster.simulation.twin import DEFAULT_START
from qabuse_dagster.telemetry.contract import format_rfc3339_utc, validate_record
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.labels import read_labels

_REPO = Path(__file__).resolve().parents[2]
_PACKAGED_SCHEMAS = _REPO / "qabuse_dagster" / "telemetry" / "schemas"
_SHARED_CONTRACTS = Path("/work/shared/contracts")

HASHER = KeyedHasher(b"test-hash-key-for-the-twin-0123456789")
SEED = 11
HOURS = 3.0


def _validator(packaged: str, shared: str) -> Draft202012Validator:
    for path in (_PACKAGED_SCHEMAS / packaged, _SHARED_CONTRACTS / shared):
        if path.exists():
            schema = json.loads(path.read_text())
            Draft202012Validator.check_schema(schema)
            return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    raise FileNotFoundError(f"contract {packaged} is neither packaged nor in {_SHARED_CONTRACTS}")


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _frame(result: SimulationResult) -> pd.DataFrame:
    frame = pd.DataFrame(_lines(result.telemetry_path))
    frame["ts"] = pd.to_datetime(frame["timestamp"], utc=True)
    frame["kind"] = frame["api_key_id"].map(result.api_keys)
    return frame


def _submissions_per_minute(frame: pd.DataFrame) -> pd.Series:
    """Jobs submitted per (api key, minute), over minutes with at least one job."""
    submitted = frame[frame["status"] == "submitted"]
    return submitted.groupby(["api_key_id", submitted["ts"].dt.floor("min")]).size()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return simulate(hours=HOURS, seed=SEED, out=tmp_path_factory.mktemp("twin"), hasher=HASHER)


@pytest.fixture(scope="module")
def frame(run: SimulationResult) -> pd.DataFrame:
    return _frame(run)


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationResult, pd.DataFrame]:
    result = simulate(hours=24, seed=5, out=tmp_path_factory.mktemp("day"), hasher=HASHER)
    return result, _frame(result)


@pytest.fixture(scope="module")
def label(run: SimulationResult) -> dict[str, Any]:
    (only,) = _lines(run.labels_path)
    return only


def test_every_record_satisfies_the_telemetry_contract(run: SimulationResult) -> None:
    validator = _validator("telemetry-record.v1.schema.json", "telemetry-record.schema.json")
    records = _lines(run.telemetry_path)
    # Two records a job, but a job still running when the horizon ends has only one.
    assert len(records) == run.n_records
    assert run.n_jobs < run.n_records <= 2 * run.n_jobs
    for record in records:
        errors = sorted(validator.iter_errors(record), key=str)
        assert not errors, f"{record['job_id']}/{record['status']}: {errors[0].message}"


def test_records_and_labels_load_with_the_contract_models(run: SimulationResult) -> None:
    records = _lines(run.telemetry_path)
    for record in records:
        validate_record(record)
    assert records[0]["timestamp"] == format_rfc3339_utc(
        datetime.fromisoformat(records[0]["timestamp"])
    )
    (label,) = read_labels(run.labels_path)
    assert list(label.api_key_ids or ()) == run.incident_api_key_ids


def test_labels_satisfy_the_incident_contract(run: SimulationResult) -> None:
    validator = _validator("incident-labels.v1.schema.json", "incident-labels.schema.json")
    labels = _lines(run.labels_path)
    assert labels
    for label in labels:
        validator.validate(label)


def test_timestamps_are_utc_z_sorted_and_inside_the_horizon(
    run: SimulationResult, frame: pd.DataFrame
) -> None:
    assert frame["timestamp"].str.endswith("Z").all()
    assert frame["ts"].is_monotonic_increasing
    assert run.start == DEFAULT_START
    assert run.end == DEFAULT_START + timedelta(hours=HOURS)
    assert frame["ts"].min() >= run.start
    assert frame["ts"].max() < run.end


def test_same_seed_gives_identical_bytes(run: SimulationResult, tmp_path: Path) -> None:
    again = simulate(hours=HOURS, seed=SEED, out=tmp_path, hasher=HASHER)
    assert again.telemetry_path.read_bytes() == run.telemetry_path.read_bytes()
    assert again.labels_path.read_bytes() == run.labels_path.read_bytes()
    assert (again.n_records, again.api_keys, again.incident_api_key_ids) == (
        run.n_records,
        run.api_keys,
        run.incident_api_key_ids,
    )


def test_different_seed_gives_different_telemetry(run: SimulationResult, tmp_path: Path) -> None:
    other = simulate(hours=HOURS, seed=SEED + 1, out=tmp_path, hasher=HASHER)
    assert other.telemetry_path.read_bytes() != run.telemetry_path.read_bytes()
    assert set(other.api_keys).isdisjoint(run.api_keys)


def test_identifiers_come_from_the_hasher(tmp_path: Path) -> None:
    a = simulate(hours=1, seed=3, out=tmp_path / "a", hasher=HASHER)
    b = simulate(hours=1, seed=3, out=tmp_path / "b", hasher=KeyedHasher(b"another-key" * 3))
    assert a.n_records == b.n_records
    assert set(a.api_keys).isdisjoint(b.api_keys)
    assert sorted(a.api_keys.values()) == sorted(b.api_keys.values())


def test_each_job_has_one_submitted_then_at_most_one_terminal_record(
    frame: pd.DataFrame, run: SimulationResult
) -> None:
    assert not frame.duplicated(["job_id", "status"]).any()
    per_job = frame.groupby("job_id")["status"].agg(list)
    assert per_job.map(len).isin([1, 2]).all()
    assert per_job.map(lambda s: s[0] == "submitted").all()
    assert per_job.map(lambda s: len(s) == 1 or s[1] in {"completed", "failed"}).all()
    assert frame["job_id"].str.fullmatch(rf"job-{SEED}-\d{{9}}").all()
    # Only jobs still in flight at the end lack a terminal record: the runaway CI's
    # backlog on its QPU, and a few others' last jobs.
    in_flight = per_job.index[per_job.map(len) == 1]
    submitted_at = frame[frame["status"] == "submitted"].set_index("job_id")
    assert len(in_flight) < 0.5 * len(per_job)
    runaway = {key for key, kind in run.api_keys.items() if kind == "runaway_ci"}
    assert submitted_at.loc[in_flight, "api_key_id"].isin(runaway).mean() > 0.9

    terminal = frame[frame["status"] != "submitted"]
    assert terminal["queue_time_s"].notna().all()
    assert terminal["runtime_s"].notna().all()
    failed = terminal["status"] == "failed"
    assert terminal.loc[failed, "error_code"].notna().all()
    assert terminal.loc[~failed, "error_code"].isna().all()
    submitted = frame[frame["status"] == "submitted"].set_index("job_id")
    delay = (terminal.set_index("job_id")["ts"] - submitted["ts"]).dt.total_seconds().dropna()
    assert (delay >= 0).all()
    # The runaway CI overloads its QPU and waits behind its own backlog; under fair
    # share, the benign tenants' jobs mostly finish within seconds.
    benign = {key for key, kind in run.api_keys.items() if kind != "runaway_ci"}
    benign_jobs = submitted.index[submitted["api_key_id"].isin(benign)].intersection(delay.index)
    assert delay[benign_jobs].median() < 10


def test_fixed_fields(frame: pd.DataFrame) -> None:
    assert (frame["schema_version"] == 1).all()
    assert (frame["retry_count"] == 0).all()  # nobody mitigates in the open loop
    assert set(frame["sdk"]) <= {"qiskit", "cirq", "pennylane"}
    assert frame["client_agent"].str.fullmatch(r"qabuse-(\w+)/0\.1\.0 \1/[\d.]+").all()
    for counts in frame["gate_counts"]:
        assert all(name == name.lower() for name in counts)


def test_roster_has_8_to_15_benign_keys_and_one_incident_key(run: SimulationResult) -> None:
    kinds = list(run.api_keys.values())
    benign = [k for k in kinds if k != "runaway_ci"]
    assert 8 <= len(benign) <= 15
    assert {"research_group", "variational_loop", "ci_suite"} <= set(benign)
    assert kinds.count("runaway_ci") == 1
    assert [run.api_keys[k] for k in run.incident_api_key_ids] == ["runaway_ci"]


def test_benign_keys_stay_within_normal_limits(run: SimulationResult, frame: pd.DataFrame) -> None:
    benign = frame[frame["kind"] != "runaway_ci"]
    assert benign["shots"].between(100, 8000).all()
    per_minute = _submissions_per_minute(benign)
    assert per_minute.max() <= MAX_BENIGN_JOBS_PER_MINUTE


def test_incident_rate_is_far_above_every_benign_key(
    run: SimulationResult, frame: pd.DataFrame, label: dict[str, Any]
) -> None:
    per_minute = _submissions_per_minute(frame)
    (incident_key,) = run.incident_api_key_ids
    benign_p99 = max(
        per_minute.loc[key].quantile(0.99)
        for key, kind in run.api_keys.items()
        if kind != "runaway_ci" and key in per_minute.index.get_level_values(0)
    )
    window_minutes = (
        pd.Timestamp(label["end"]) - pd.Timestamp(label["start"])
    ).total_seconds() / 60
    incident_jobs = per_minute.loc[incident_key].sum()
    incident_rate = incident_jobs / window_minutes
    assert 30 <= incident_rate <= 90
    assert incident_rate >= 5 * benign_p99


def test_incident_key_is_one_script_one_agent_one_network(
    run: SimulationResult, frame: pd.DataFrame
) -> None:
    incident = frame[frame["api_key_id"].isin(run.incident_api_key_ids)]
    assert len(incident) > 1000
    for column in ("code_hash", "client_agent", "source_ip_hash", "user"):
        assert incident[column].nunique() == 1, column
    assert incident["shots"].between(1, 16).all()
    terminal = incident[incident["status"] != "submitted"]
    failure_rate = (terminal["status"] == "failed").mean()
    assert 0.05 <= failure_rate <= 0.2
    # Its user and script appear nowhere else.
    others = frame[~frame["api_key_id"].isin(run.incident_api_key_ids)]
    assert not others["user"].isin(incident["user"]).any()
    assert not others["code_hash"].isin(incident["code_hash"]).any()


def test_label_window_matches_incident_records(
    run: SimulationResult, frame: pd.DataFrame, label: dict[str, Any]
) -> None:
    assert label["kind"] == "runaway_ci"
    assert label["api_key_ids"] == run.incident_api_key_ids
    start = datetime.fromisoformat(label["start"])
    end = datetime.fromisoformat(label["end"])
    assert end == run.end
    onset = run.start + timedelta(minutes=round(0.7 * HOURS * 60))
    assert start == onset
    incident = frame[frame["api_key_id"].isin(run.incident_api_key_ids)]
    first, last = incident["ts"].min(), incident["ts"].max()
    assert start <= first < start + timedelta(minutes=1)
    assert end - timedelta(minutes=1) < last < end


def test_research_groups_work_in_the_day(day: tuple[SimulationResult, pd.DataFrame]) -> None:
    result, frame = day
    submitted = frame[(frame["status"] == "submitted") & (frame["kind"] == "research_group")]
    hour = submitted["ts"].dt.hour
    for key, jobs in submitted.groupby("api_key_id"):
        in_hours = jobs["ts"].dt.hour
        working = in_hours.between(9, 16).sum()
        night = (in_hours < 6).sum()
        assert working >= 3 * max(night, 1), key
        assert jobs["code_hash"].nunique() >= 2, key
    assert hour.between(9, 16).sum() > 5 * (hour < 6).sum()
    assert result.n_records > 20_000


def test_ci_suites_run_every_hour_in_short_bursts(
    day: tuple[SimulationResult, pd.DataFrame],
) -> None:
    _, frame = day
    submitted = frame[(frame["status"] == "submitted") & (frame["kind"] == "ci_suite")]
    for key, jobs in submitted.groupby("api_key_id"):
        assert jobs["ts"].dt.minute.nunique() <= 5, key
        assert jobs["ts"].dt.hour.nunique() >= 20, key


def test_variational_loops_reuse_one_script_per_burst(
    day: tuple[SimulationResult, pd.DataFrame],
) -> None:
    _, frame = day
    submitted = frame[(frame["status"] == "submitted") & (frame["kind"] == "variational_loop")]
    for key, jobs in submitted.groupby("api_key_id"):
        per_minute = jobs.groupby(jobs["ts"].dt.floor("min")).size()
        # Bursts: most jobs fall in minutes shared with other jobs of the key.
        assert per_minute[per_minute >= 2].sum() >= 0.7 * len(jobs), key
        scripts_per_minute = jobs.groupby(jobs["ts"].dt.floor("min"))["code_hash"].nunique()
        assert (scripts_per_minute[per_minute >= 2] == 1).mean() >= 0.9, key


def test_progress_bar_and_custom_start(tmp_path: Path) -> None:
    start = datetime(2027, 1, 4, 6, 30, tzinfo=UTC)
    result = simulate(hours=0.5, seed=1, out=tmp_path, hasher=HASHER, start=start, progress=True)
    assert result.start == start
    records = _lines(result.telemetry_path)
    assert records
    assert datetime.fromisoformat(records[0]["timestamp"]) >= start


@pytest.mark.parametrize(
    ("hours", "start"),
    [(0, DEFAULT_START), (-1, DEFAULT_START), (1, datetime(2026, 11, 2))],
)
def test_rejects_bad_arguments(hours: float, start: datetime, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        simulate(hours=hours, seed=1, out=tmp_path, hasher=HASHER, start=start)


def test_a_replay_is_the_same_twin_moved_to_end_at_the_given_minute(tmp_path: Path) -> None:
    from qabuse_dagster.simulation.twin import replay_at

    result = simulate(hours=HOURS, seed=SEED, out=tmp_path / "sim", hasher=HASHER)
    end = datetime(2026, 12, 7, 21, 33, 42, tzinfo=UTC)
    replay = replay_at(result, end, tmp_path / "replay")
    assert replay.end == datetime(2026, 12, 7, 21, 33, tzinfo=UTC)  # floored to the minute
    shift = replay.end - result.end
    assert replay.start == result.start + shift and shift % timedelta(minutes=1) == timedelta(0)
    before, after = _lines(result.telemetry_path), _lines(replay.telemetry_path)
    assert len(after) == len(before) == replay.n_records
    for old, new in zip(before, after, strict=True):
        validate_record(new)  # still a contract record
        moved = pd.Timestamp(new.pop("timestamp")) - pd.Timestamp(old.pop("timestamp"))
        assert moved == shift and new == old  # the time moves, nothing else
    labels = read_labels(replay.labels_path)
    assert [(label.start, label.end) for label in labels] == [
        (label.start + shift, label.end + shift) for label in result.incidents
    ]
    assert result.telemetry_path.exists()  # the simulated twin is left as it was
