"""The abuse scenario library: contract-valid records, labels and each scenario's signature."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
from jsonschema import Draft202012Validator

from qabuse_dagster.simulation import SimulationResult, simulate
from qabuse_dagster.simulation.circuits import circuit_catalogue
from qabuse_dagster.simulation.jobs import Horizon, sample_jobs
from qabuse_dagster.simulation.scenarios import (
    QUOTA_JOBS_PER_KEY_PER_DAY,
    SCENARIOS,
    AbuseScenario,
    CredentialStuffing,
    IncidentWindow,
    LowAndSlow,
    QuotaFarming,
    ScenarioContext,
    ScenarioJobs,
    place_incidents,
    register_scenario,
)
from qabuse_dagster.simulation.tenants import benign_roster, make_identity
from qabuse_dagster.simulation.twin import DEFAULT_START
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.labels import IncidentLabel, read_labels

_SCHEMAS = Path(__file__).resolve().parents[2] / "qabuse_dagster" / "telemetry" / "schemas"

HASHER = KeyedHasher(b"test-hash-key-for-the-twin-0123456789")
SEED = 3
HOURS = 48.0
BENIGN_KINDS = {
    "research_group",
    "variational_loop",
    "ci_suite",
    "classroom",
    "benchmarking",
}
ABUSE_KINDS = {
    "runaway_ci",
    "credential_stuffing",
    "key_leak",
    "credit_drain",
    "coordinated_botnet",
    "quota_farming",
    "low_and_slow",
}
# sha256 of the reference output (no scenarios) of hours=3, seed=11 with HASHER: a
# regression pin, re-taken only on purpose (last: a QPU runs one job at a time with a
# per-job overhead, jobs in flight at the end have no terminal record, Cirq and
# PennyLane jobs carry their own SDK's gate names, and Cirq circuits are compiled to one
# PhasedXZ layer around each CZ so their figures no longer depend on the BLAS kernel).
# Scenarios and look-alikes must not change a byte of it.
DEFAULT_TELEMETRY_SHA256 = "1fcd8a44034b43078e501ff9d9a6f81ce59430ef5fff28215bb68decf6434178"
DEFAULT_LABELS_SHA256 = "37a9718c88f93157ec62f0c0f8c9e98ea1663d75921cf39c80e6e403bcf48b81"


def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((_SCHEMAS / name).read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _frame(result: SimulationResult) -> pd.DataFrame:
    lines = result.telemetry_path.read_text(encoding="utf-8").splitlines()
    frame = pd.DataFrame([json.loads(line) for line in lines])
    frame["ts"] = pd.to_datetime(frame["timestamp"], utc=True)
    frame["kind"] = frame["api_key_id"].map(result.api_keys)
    return frame


def _label(result: SimulationResult, kind: str) -> IncidentLabel:
    (label,) = [label for label in result.incidents if label.kind == kind]
    return label


def _incident_rows(frame: pd.DataFrame, label: IncidentLabel) -> pd.DataFrame:
    keys = frame["api_key_id"].isin(label.api_key_ids or ())
    inside = (frame["ts"] >= label.start) & (frame["ts"] < label.end)
    return frame[keys & inside]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationResult, pd.DataFrame]:
    result = simulate(
        hours=HOURS,
        seed=SEED,
        out=tmp_path_factory.mktemp("library"),
        hasher=HASHER,
        scenarios=["all"],
    )
    return result, _frame(result)


def _context(hours: float) -> ScenarioContext:
    horizon = Horizon(start=DEFAULT_START, end=DEFAULT_START + timedelta(hours=hours))
    roster = benign_roster(HASHER, np.random.default_rng(1), seed=1)
    return ScenarioContext(hasher=HASHER, seed=1, horizon=horizon, tenants=tuple(roster))


def _day_long(scenario: AbuseScenario) -> pd.DataFrame:
    """The submissions of ``scenario`` over a full day, without the rest of the twin."""
    context = _context(26)
    window = IncidentWindow(
        "day-1", DEFAULT_START + timedelta(hours=1), DEFAULT_START + timedelta(hours=25)
    )
    jobs = scenario.generate(window, context, np.random.default_rng(9)).jobs
    frame = pd.DataFrame(
        {"api_key_id": jobs.api_key_id, "ts": pd.to_datetime(jobs.submit_ms, unit="ms", utc=True)}
    )
    assert frame["ts"].between(window.start, window.end, inclusive="left").all()
    return frame


def test_default_output_is_unchanged(tmp_path: Path) -> None:
    result = simulate(hours=3.0, seed=11, out=tmp_path, hasher=HASHER)
    assert hashlib.sha256(result.telemetry_path.read_bytes()).hexdigest() == (
        DEFAULT_TELEMETRY_SHA256
    )
    assert hashlib.sha256(result.labels_path.read_bytes()).hexdigest() == DEFAULT_LABELS_SHA256
    (label,) = result.incidents
    assert label.kind == "runaway_ci"
    assert result.incident_api_key_ids == list(label.api_key_ids or ())


def test_all_runs_every_registered_scenario_once(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, _ = library
    assert [label.kind for label in result.incidents] == list(SCENARIOS)
    assert {label.kind for label in result.incidents} == ABUSE_KINDS
    assert set(result.api_keys.values()) == BENIGN_KINDS | ABUSE_KINDS - {"key_leak"}
    named = [key for label in result.incidents for key in label.api_key_ids or ()]
    assert result.incident_api_key_ids == list(dict.fromkeys(named))
    assert set(result.incident_api_key_ids) <= set(result.api_keys)


def test_incidents_sit_apart_in_the_second_half(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, frame = library
    half = result.start + (result.end - result.start) / 2
    windows = sorted((label.start, label.end) for label in result.incidents)
    assert windows[0][0] >= half
    assert windows[-1][1] <= result.end
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert end <= start
    # The first half is clean history: no record of an incident key apart from the
    # leaked key's owner, who worked normally before the leak.
    leaked = set(_label(result, "key_leak").api_key_ids or ())
    scripted = set(result.incident_api_key_ids) - leaked
    assert not frame.loc[frame["ts"] < half, "api_key_id"].isin(scripted).any()


def test_records_satisfy_the_telemetry_contract(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, frame = library
    validator = _validator("telemetry-record.v1.schema.json")
    # A sample of every (tenant kind, status), incident keys and refusals included.
    shuffled = frame.sample(frac=1.0, random_state=0)
    rows = np.sort(shuffled.groupby(["kind", "status"]).head(150).index.to_numpy())
    assert set(frame.loc[rows, "kind"]) == set(result.api_keys.values())
    assert "rejected" in set(frame.loc[rows, "status"])
    lines = result.telemetry_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == result.n_records
    # Each line is exactly what json writes for its record (the writer builds text).
    for line in lines:
        assert json.dumps(json.loads(line), separators=(",", ":")) == line
    for row in rows.tolist():
        record = json.loads(lines[row])
        errors = sorted(validator.iter_errors(record), key=str)
        assert not errors, f"{record['job_id']}/{record['status']}: {errors[0].message}"
    assert not frame.duplicated(["job_id", "status"]).any()
    assert frame["ts"].is_monotonic_increasing


def test_labels_satisfy_the_incident_contract(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, _ = library
    validator = _validator("incident-labels.v1.schema.json")
    lines = result.labels_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(result.incidents)
    for line in lines:
        validator.validate(json.loads(line))
    assert read_labels(result.labels_path) == result.incidents


def test_every_incident_has_records_in_its_window(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, frame = library
    for label in result.incidents:
        rows = _incident_rows(frame, label)
        assert len(rows) >= 10, label.incident_id


def test_credential_stuffing_is_rejected_auth_from_few_networks(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, frame = library
    label = _label(result, "credential_stuffing")
    rows = frame[frame["api_key_id"].isin(label.api_key_ids or ())]
    refused = (rows["status"] == "rejected") & (rows["error_code"] == "auth_failed")
    assert refused.mean() >= 0.9
    assert rows["source_ip_hash"].nunique() <= 3
    assert rows["api_key_id"].nunique() >= 100
    assert rows["ts"].between(label.start, label.end, inclusive="left").all()
    # Refused submissions never ran: no queue or run time, no terminal record.
    assert rows.loc[refused, ["queue_time_s", "runtime_s"]].isna().all().all()
    assert rows.loc[refused, "submit_latency_s"].notna().all()
    # Bursts: most attempts fall in a few minutes.
    per_minute = rows[refused].groupby(rows["ts"].dt.floor("min")).size()
    assert per_minute.max() >= 50


def test_key_leak_spreads_one_key_over_many_networks_and_agents(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, frame = library
    label = _label(result, "key_leak")
    (key,) = list(label.api_key_ids or ())
    assert result.api_keys[key] == "research_group"
    own = frame[frame["api_key_id"] == key]
    before = own[own["ts"] < label.start]
    after = own[(own["ts"] >= label.start) & (own["ts"] < label.end)]
    assert len(before) > 100
    assert after["source_ip_hash"].nunique() >= 5 * before["source_ip_hash"].nunique()
    assert after["client_agent"].nunique() >= 5 * before["client_agent"].nunique()
    assert after["client_agent"].str.fullmatch(r"qabuse-(\w+)/[\d.]+ \1/[\d.]+").all()
    assert (after["client_agent"].str.split("/").str[-1] == after["sdk_version"]).all()


def test_credit_drain_is_far_above_every_benign_job(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, frame = library
    label = _label(result, "credit_drain")
    submitted = frame[frame["status"] == "submitted"]
    load = submitted["shots"] * submitted["depth"]
    benign_p99 = load[submitted["kind"].isin(BENIGN_KINDS)].quantile(0.99)
    drain = load[submitted["api_key_id"].isin(label.api_key_ids or ())]
    assert len(drain) >= 5
    assert drain.min() >= 5 * benign_p99
    assert drain.median() >= 10 * benign_p99


def test_botnet_keys_share_one_script_in_lockstep(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, frame = library
    label = _label(result, "coordinated_botnet")
    assert label.users is not None
    rows = frame[frame["api_key_id"].isin(label.api_key_ids or ())]
    submitted = rows[rows["status"] == "submitted"]
    (script,) = submitted["code_hash"].unique()
    assert submitted["api_key_id"].nunique() >= 10
    assert (
        not frame.loc[~frame["api_key_id"].isin(label.api_key_ids or ()), "code_hash"]
        .eq(script)
        .any()
    )
    # Waves: the submissions cluster; each wave spans seconds and holds >= 10 keys.
    ts = submitted["ts"].sort_values()
    wave = (ts.diff() > pd.Timedelta(seconds=30)).cumsum()
    waves = submitted.loc[ts.index].groupby(wave.to_numpy())
    spans = waves["ts"].agg(lambda t: (t.max() - t.min()).total_seconds())
    keys = waves["api_key_id"].nunique()
    assert len(spans) >= 5
    assert (spans <= 5).all()
    assert (keys >= 10).all()


def test_classrooms_share_a_notebook_without_lockstep(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, frame = library
    submitted = frame[(frame["status"] == "submitted") & (frame["kind"] == "classroom")]
    keys_per_script = submitted.groupby("code_hash")["api_key_id"].nunique()
    assert keys_per_script.max() >= 20
    assert not set(submitted["api_key_id"]) & set(result.incident_api_key_ids)
    # A lesson lasts one to two hours; students do not submit within seconds of each other.
    by_day = submitted.groupby([submitted["code_hash"], submitted["ts"].dt.date])["ts"]
    lesson_hours = by_day.agg(lambda t: (t.max() - t.min()).total_seconds() / 3600)
    assert lesson_hours.between(0.5, 2.0).all()
    gaps = submitted.sort_values("ts")["ts"].diff().dt.total_seconds().dropna()
    assert gaps[gaps < 60].median() > 1


def test_benchmarking_runs_large_deep_jobs_on_a_few_keys(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    _, frame = library
    submitted = frame[(frame["status"] == "submitted") & (frame["kind"] == "benchmarking")]
    assert 2 <= submitted["api_key_id"].nunique() <= 3
    assert (submitted["shots"] >= 10_000).all()
    assert submitted["depth"].median() >= 40


def test_quota_farming_stays_just_under_the_daily_quota() -> None:
    quota = QUOTA_JOBS_PER_KEY_PER_DAY
    for stealth, floor in ((0.0, 0.95), (1.0, 0.8)):
        daily = _day_long(QuotaFarming(stealth=stealth)).groupby("api_key_id").size()
        assert len(daily) >= 10
        assert daily.between(floor * quota - 1, quota - 1).all(), stealth


def test_low_and_slow_polls_steadily_for_a_day() -> None:
    submitted = _day_long(LowAndSlow())
    assert submitted["api_key_id"].nunique() == 1
    hourly = submitted.groupby(submitted["ts"].dt.floor("h")).size()
    assert len(hourly) >= 24
    assert hourly.max() <= 1.3 * hourly.min()
    assert hourly.mean() <= 60 / 3
    # Never more than a couple of jobs in any minute: no burst to catch.
    assert submitted.groupby(submitted["ts"].dt.floor("min")).size().max() <= 2
    gaps = submitted["ts"].sort_values().diff().dt.total_seconds().dropna()
    assert gaps.max() <= 10 * 60


def test_low_and_slow_and_quota_farming_run_in_the_twin(
    library: tuple[SimulationResult, pd.DataFrame],
) -> None:
    result, frame = library
    for kind in ("quota_farming", "low_and_slow"):
        label = _label(result, kind)
        rows = _incident_rows(frame, label)
        assert rows["api_key_id"].nunique() == len(label.api_key_ids or ()), kind


def test_same_seed_same_bytes_with_scenarios(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {
        "hours": 8.0,
        "seed": 21,
        "hasher": HASHER,
        "scenarios": ["credential_stuffing", "coordinated_botnet", "key_leak"],
    }
    a = simulate(out=tmp_path / "a", **kwargs)
    b = simulate(out=tmp_path / "b", **kwargs)
    assert a.telemetry_path.read_bytes() == b.telemetry_path.read_bytes()
    assert a.labels_path.read_bytes() == b.labels_path.read_bytes()
    assert a.incidents == b.incidents
    c = simulate(out=tmp_path / "c", **{**kwargs, "seed": 22})
    assert c.telemetry_path.read_bytes() != a.telemetry_path.read_bytes()


def test_unknown_scenario_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown scenario 'nope'") as error:
        simulate(hours=1, seed=1, out=tmp_path, hasher=HASHER, scenarios=["key_leak", "nope"])
    for name in SCENARIOS:
        assert name in str(error.value)


@pytest.mark.parametrize(
    "kwargs", [{}, {"hours": 1, "days": 1}, {"days": 0}, {"hours": 10, "scenarios": "all"}]
)
def test_rejects_bad_lengths_and_scenario_lists(kwargs: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises((ValueError, TypeError)):
        simulate(seed=1, out=tmp_path, hasher=HASHER, **kwargs)


@dataclass(frozen=True, kw_only=True)
class _Scraper(AbuseScenario):
    """A scenario defined outside the library: one new key, 2 jobs a minute."""

    kind: ClassVar[str] = "test_scraper"
    notes: ClassVar[str] = "test scenario"
    duration: float | timedelta = 0.1

    def generate(
        self, window: IncidentWindow, context: ScenarioContext, rng: np.random.Generator
    ) -> ScenarioJobs:
        identity = make_identity(
            context.hasher, rng, raw_api_key="scraper", raw_users=["scraper"], n_scripts=1
        )
        start_ms = int(window.start.timestamp() * 1000)
        end_ms = int(window.end.timestamp() * 1000)
        submit_ms = np.arange(start_ms, end_ms, 30_000, dtype=np.int64)
        n = len(submit_ms)
        jobs = sample_jobs(
            identity,
            rng,
            submit_ms=submit_ms,
            circuit=np.zeros(n, dtype=np.int64),
            shots=np.full(n, 10, dtype=np.int64),
            num_circuits=np.ones(n, dtype=np.int64),
            code_index=np.zeros(n, dtype=np.int64),
            failure_rate=0.0,
        )
        key = identity.api_key_id
        return ScenarioJobs(jobs=jobs, new_api_keys={key: self.kind}, api_key_ids=(key,))


@pytest.fixture
def scraper_registered() -> Iterator[None]:
    before = list(SCENARIOS)
    register_scenario("test_scraper", _Scraper)
    try:
        yield
    finally:
        SCENARIOS.pop("test_scraper")
    assert list(SCENARIOS) == before


def test_a_registered_scenario_plugs_in(scraper_registered: None, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already taken"):
        register_scenario("test_scraper", _Scraper)
    result = simulate(
        hours=6, seed=2, out=tmp_path, hasher=HASHER, scenarios=["low_and_slow", "test_scraper"]
    )
    assert [label.kind for label in result.incidents] == ["low_and_slow", "test_scraper"]
    (key,) = list(_label(result, "test_scraper").api_key_ids or ())
    assert result.api_keys[key] == "test_scraper"
    assert _frame(result)["api_key_id"].eq(key).sum() >= 10


def test_placement_never_overlaps_and_stays_in_the_second_half() -> None:
    lengths = [timedelta(hours=h) for h in (4, 2, 8, 3, 3, 24, 24)]
    names = [f"s{i}" for i in range(len(lengths))]
    for hours in (1, 6, 24, 168, 720):
        horizon = Horizon(start=DEFAULT_START, end=DEFAULT_START + timedelta(hours=hours))
        windows = place_incidents(names, lengths, horizon)
        assert windows[0].start >= DEFAULT_START + timedelta(hours=hours / 2)
        assert windows[-1].end <= horizon.end
        for w in windows:
            assert w.end > w.start
        for a, b in itertools.pairwise(windows):
            assert a.end <= b.start
    horizon = Horizon(start=DEFAULT_START, end=DEFAULT_START + timedelta(minutes=10))
    with pytest.raises(ValueError, match="too short"):
        place_incidents(names, lengths, horizon)


def test_knobs_are_checked_and_stealth_makes_it_quieter() -> None:
    with pytest.raises(ValueError, match="stealth"):
        CredentialStuffing(stealth=1.5)
    with pytest.raises(ValueError, match="intensity"):
        CredentialStuffing(intensity=0)
    with pytest.raises(ValueError, match="duration"):
        CredentialStuffing(duration=1.5)
    context = _context(4)
    horizon = context.horizon
    window = IncidentWindow("cs-1", DEFAULT_START + timedelta(hours=2), horizon.end)
    sizes = {
        stealth: len(
            CredentialStuffing(stealth=stealth)
            .generate(window, context, np.random.default_rng(5))
            .jobs
        )
        for stealth in (0.0, 1.0)
    }
    assert sizes[1.0] * 5 < sizes[0.0]
    louder = CredentialStuffing(intensity=2.0).generate(window, context, np.random.default_rng(5))
    assert len(louder.jobs) > 1.5 * sizes[0.0]
    assert circuit_catalogue()  # the catalogue the jobs index into is built
