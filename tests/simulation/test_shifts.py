"""Population shifts: benign tenants change their use mid horizon, with no abuse and no label."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from qabuse_dagster.simulation import SimulationResult, simulate
from qabuse_dagster.simulation.jobs import Horizon
from qabuse_dagster.simulation.scenarios import SCENARIOS, register_scenario, resolve_scenarios
from qabuse_dagster.simulation.shifts import NEXT_RELEASE, SHIFTS, SdkRelease, register_shift
from qabuse_dagster.simulation.twin import DEFAULT_START
from qabuse_dagster.telemetry.hashing import KeyedHasher

HASHER = KeyedHasher(b"test-hash-key-for-the-twin-0123456789")
HOURS = 24.0
SEED = 5
SUBMISSIONS = ("submitted", "rejected")


def _frame(result: SimulationResult) -> pd.DataFrame:
    lines = result.telemetry_path.read_text(encoding="utf-8").splitlines()
    frame = pd.DataFrame([json.loads(line) for line in lines])
    frame["ts"] = pd.to_datetime(frame["timestamp"], utc=True)
    return frame


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationResult, SimulationResult]:
    """The same seed without and with an SDK release at half the horizon."""
    out = tmp_path_factory.mktemp("shift")
    plain = simulate(
        hours=HOURS, seed=SEED, out=out / "plain", hasher=HASHER, scenarios=["key_leak"]
    )
    shifted = simulate(
        hours=HOURS,
        seed=SEED,
        out=out / "shifted",
        hasher=HASHER,
        scenarios=["sdk_release", "key_leak"],
    )
    return plain, shifted


def test_the_release_changes_only_what_comes_after_it(
    twins: tuple[SimulationResult, SimulationResult],
) -> None:
    plain, shifted = twins
    onset = SdkRelease().onset_at(Horizon(plain.start, plain.end))
    before = [_frame(r) for r in twins]
    submitted = [f[f["status"].isin(SUBMISSIONS) & (f["ts"] < onset)] for f in before]
    columns = ["job_id", "timestamp", "api_key_id", "shots", "num_circuits", "code_hash"]
    pd.testing.assert_frame_equal(
        submitted[0][columns].reset_index(drop=True), submitted[1][columns].reset_index(drop=True)
    )
    # No label: a release is not abuse. The key leak's label is the same in both twins.
    assert [label.kind for label in shifted.incidents] == ["key_leak"]
    assert shifted.incidents == plain.incidents
    assert set(shifted.api_keys) == set(plain.api_keys)


def test_most_tenants_upgrade_to_fewer_larger_jobs(
    twins: tuple[SimulationResult, SimulationResult],
) -> None:
    plain, shifted = twins
    release = SdkRelease()
    settled = release.onset_at(Horizon(plain.start, plain.end)) + release.ramp
    incident_keys = set(shifted.incident_api_key_ids)
    frames = {}
    for name, result in (("plain", plain), ("shifted", shifted)):
        frame = _frame(result)
        frame = frame[~frame["api_key_id"].isin(incident_keys) & frame["status"].isin(SUBMISSIONS)]
        frames[name] = frame[frame["ts"] >= settled]
    after = frames["shifted"]
    upgraded = after["sdk_version"].isin(set(NEXT_RELEASE.values()))
    keys = after.groupby("api_key_id")["sdk_version"].agg(
        lambda v: v.isin(set(NEXT_RELEASE.values())).all()
    )
    # Each tenant upgrades with probability 0.7: over 30+ tenants the share lies inside
    # [0.4, 0.95] (a binomial tail of about 1e-4 on either side).
    assert len(keys) >= 30
    assert 0.4 <= keys.mean() <= 0.95
    # A tenant upgrades once, for good: each key is wholly on one side after the ramp.
    mixed = after.groupby("api_key_id")["sdk_version"].agg(
        lambda v: 0 < v.isin(set(NEXT_RELEASE.values())).sum() < len(v)
    )
    assert not mixed.any()
    assert after.loc[upgraded, "client_agent"].str.contains("/3.0.0|/2.0.0|/0.50.0").all()
    # Fewer, larger jobs: a third of the submissions, 3x the circuits, 4x the shots.
    moved = keys.index[keys]
    before_jobs = frames["plain"][frames["plain"]["api_key_id"].isin(moved)]
    after_jobs = after[after["api_key_id"].isin(moved)]
    assert len(after_jobs) < 0.45 * len(before_jobs)
    assert after_jobs["num_circuits"].mean() > 2.5 * before_jobs["num_circuits"].mean()
    assert after_jobs["shots"].median() > 3.0 * before_jobs["shots"].median()
    # Rewritten scripts: none of the old code hashes survives on an upgraded key.
    old_hashes = set(before_jobs["code_hash"])
    assert not set(after_jobs["code_hash"]) & old_hashes


def test_the_release_is_a_scenario_by_name_never_part_of_all() -> None:
    assert resolve_scenarios(["sdk_release", "key_leak"]) == ["sdk_release", "key_leak"]
    assert "sdk_release" not in resolve_scenarios(["all"])
    assert resolve_scenarios(["all"]) == list(SCENARIOS)
    with pytest.raises(ValueError, match="sdk_release"):
        resolve_scenarios(["sdk_relaese"])  # the message lists the shifts too
    with pytest.raises(ValueError, match="already taken"):
        register_scenario("sdk_release", SdkRelease)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already taken"):
        register_shift("key_leak", SdkRelease)
    assert set(SHIFTS) == {"sdk_release"}


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"onset": 1.0}, "onset"),
        ({"onset": -0.1}, "onset"),
        ({"adoption": 0.0}, "adoption"),
        ({"ramp": timedelta(minutes=-1)}, "ramp"),
        ({"batching": 0}, "batching"),
        ({"shots_factor": 0.0}, "shots_factor"),
    ],
)
def test_bad_knobs_are_refused_by_name(knobs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SdkRelease(**knobs)  # type: ignore[arg-type]


def test_the_same_seed_gives_the_same_shifted_twin(tmp_path: Path) -> None:
    runs = [
        simulate(
            hours=6,
            seed=SEED,
            out=tmp_path / str(i),
            hasher=HASHER,
            start=DEFAULT_START,
            scenarios=["sdk_release"],
        )
        for i in range(2)
    ]
    assert runs[0].telemetry_path.read_bytes() == runs[1].telemetry_path.read_bytes()
